# -*- test-case-name: tests.test_acme_config -*-
"""
Reading the C{[acme]} section (L{readACME}): the CA, the account, where
certificates are kept, challenges, names and on-demand issuance.  Part of
L{edgeproxy.config.parse}.
"""

from __future__ import annotations

import os
import re
from typing import Any

from edgeproxy.config import syntax
from edgeproxy.config.files import TOKEN_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.acmemodel import (
    LETS_ENCRYPT_DIRECTORY,
    ACMEChallenge,
    ACMEKeyType,
    ACMESettings,
)
from edgeproxy.config.section import Section

__all__ = ["ACME_KEYS", "defaultACMEStorage", "readACME"]

ACME_KEYS = (
    "directory",
    "email",
    "storage",
    "directory_ca",
    "challenges",
    "key_type",
    "renew_before",
    "eab_kid",
    "eab_hmac_key_file",
    "names",
    "on_demand",
    "ask",
    "on_demand_burst",
    "on_demand_interval",
)
"""The keys of C{[acme]}."""


def defaultACMEStorage(environ: Any = os.environ) -> str:
    """
    Where C{[acme] storage} points by default: C{acme} under the first
    directory of systemd's C{StateDirectory=} (C{$STATE_DIRECTORY}), else
    under C{/var/lib/edgeproxy}.
    """
    state = (environ.get("STATE_DIRECTORY") or "").split(":")[0]
    return os.path.join(state or "/var/lib/edgeproxy", "acme")


def _checkURL(text: str, schemes: tuple[str, ...] = ("https", "http")) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError(f"expected an {' or '.join(schemes)} URL, got {text!r}")
    return text.strip()


def _checkEmail(text: str) -> str:
    value = text.strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if not re.fullmatch(r"[^@\s,]+@[^@\s,]+\.[^@\s,]+", value):
        raise ValueError(f"expected an e-mail address such as ops@example.com, got {text!r}")
    return value


def _checkChallenges(text: str) -> tuple[ACMEChallenge, ...]:
    known = {c.value: c for c in ACMEChallenge}
    chosen: list[ACMEChallenge] = []
    for entry in syntax.splitList(text):
        challenge = known.get(entry.lower())
        if challenge is None:
            raise ValueError(f"expected challenge types from {', '.join(known)}, got {entry!r}")
        if challenge in chosen:
            raise ValueError(f"challenge {entry!r} is listed twice")
        chosen.append(challenge)
    if not chosen:
        raise ValueError("expected at least one challenge type")
    return tuple(chosen)


def _checkACMENames(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "auto":
        return None
    # RFC 8555 §7.1.4 / 8737: one DNS name per certificate; wildcards need
    # DNS-01, which edgeproxy does not do.
    names = syntax.uniqueList(text, syntax.checkHostname, "name")
    return names


def readACME(section: Section) -> ACMESettings:
    if section.has("storage"):
        storage = section.resolve(section.raw("storage"))
    else:
        storage = defaultACMEStorage()
    if os.path.exists(storage) and not os.path.isdir(storage):
        raise section.error("storage", f"{storage} exists and is not a directory")
    parent = storage
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise section.error(
            "storage",
            f"{storage} cannot be created or written by this user ({parent} is not writable)",
        )
    if section.has("eab_kid") != section.has("eab_hmac_key_file"):
        missing = "eab_hmac_key_file" if section.has("eab_kid") else "eab_kid"
        present = "eab_kid" if section.has("eab_kid") else "eab_hmac_key_file"
        raise section.error(present, f"external account binding needs both eab_kid and {missing}")
    hmacKey = None
    if section.has("eab_hmac_key_file"):
        try:
            path = section.checkedPath(section.raw("eab_hmac_key_file"), "file")
        except ValueError as e:
            raise section.error("eab_hmac_key_file", str(e)) from None
        try:
            hmacKey = readRegularFile(path, TOKEN_LIMIT).decode("ascii").strip()
        except (FileProblem, UnicodeDecodeError) as e:
            raise section.error("eab_hmac_key_file", f"cannot read {path}: {e}") from None
        if not re.fullmatch(r"[A-Za-z0-9_-]+=*", hmacKey or ""):
            raise section.error(
                "eab_hmac_key_file", "expected the base64url HMAC key the CA gave, on one line"
            )
    onDemand = section.boolean("on_demand", False)
    if onDemand and not section.has("ask"):
        # Without it, anyone pointing a name at this address makes the
        # proxy order certificates for it until the CA's limits stop it.
        raise section.error("on_demand", "on_demand = yes needs ask = URL (which names are allowed)")
    for key in ("ask", "on_demand_burst", "on_demand_interval"):
        if section.has(key) and not onDemand:
            raise section.error(key, "only used with on_demand = yes")
    defaults = ACMESettings(storage=storage)
    return ACMESettings(
        storage=storage,
        directory=section.convert("directory", LETS_ENCRYPT_DIRECTORY, _checkURL),
        email=section.convert("email", None, _checkEmail),
        directory_ca=section.optionalFile("directory_ca"),
        challenges=section.convert("challenges", defaults.challenges, _checkChallenges),
        key_type=section.choice("key_type", defaults.key_type, {k.value: k for k in ACMEKeyType}),
        renew_before=section.duration("renew_before", defaults.renew_before),
        eab_kid=section.convert("eab_kid", None, lambda text: text.strip()),
        eab_hmac_key=hmacKey,
        names=section.convert("names", None, _checkACMENames),
        on_demand=onDemand,
        ask=section.convert("ask", None, _checkURL),
        on_demand_burst=section.integer("on_demand_burst", defaults.on_demand_burst, minimum=1),
        on_demand_interval=section.duration("on_demand_interval", defaults.on_demand_interval),
    )
