# -*- test-case-name: tests.test_config_security -*-
"""
The values several sections of the security layer share: header field
names (L{fieldName}), C{NAME:Header-Name} lists (L{fieldPairs}: client
certificate facts of a route, claims of an C{[auth:NAME]}) and secret
files (L{secretText}: the passwords, client secrets and keys of
C{[auth:NAME]} and C{[redis]}, read here through L{readRegularFile} so
that a configuration that loads has them).
"""

from __future__ import annotations

import re
from typing import Any

from edgeproxy.config import syntax
from edgeproxy.config.files import readSecretText
from edgeproxy.config.section import Section

# RFC 9110 5.6.2: a token (methods and header field names are tokens).
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
NO_NAMES: tuple[str, ...] = ()
NO_PAIRS: tuple[tuple[str, str], ...] = ()


def fieldName(text: str) -> str:
    """A header field name, lower case."""
    name = text.strip()
    if not TOKEN.match(name):
        raise ValueError(f"expected a header field name (an HTTP token), got {text!r}")
    return name.lower()


def fieldPairs(text: str, left: str, check: Any = None) -> tuple[tuple[str, str], ...]:
    """C{a:X-A, b:X-B} into ((a, x-a), (b, x-b))."""
    pairs: list[tuple[str, str]] = []
    for entry in syntax.splitList(text):
        name, colon, field = entry.partition(":")
        name = name.strip()
        if not colon or not name:
            raise ValueError(f"expected {left}:Header-Name entries, got {entry!r}")
        if check is not None:
            name = check(name)
        pairs.append((name, fieldName(field)))
    if not pairs:
        raise ValueError(f"expected at least one {left}:Header-Name entry")
    return tuple(pairs)


def secretText(section: Section, key: str, minimum: int = 1) -> str | None:
    """
    The text of the secret file C{key} names (stripped, at least
    C{minimum} characters), or L{None} when C{key} is not set.
    """
    if not section.has(key):
        return None

    def read(text: str) -> str:
        path = section.resolve(text)
        value = readSecretText(path)
        if len(value) < minimum:
            raise ValueError(f"{path} holds {len(value)} characters; at least {minimum} are needed")
        return value

    return section.convert(key, None, read)
