# -*- test-case-name: tests.test_security_auth -*-
"""
What every authentication type shares: the outcomes an L{Authenticator}
gives, and the pure helpers that read credentials from a request and write
identity facts into fields.

An authenticator looks at the request (never changes it) and answers, at
once or through a Deferred, with one of:

  - L{Allowed}: who the client is, and the fields the backend gets about
    it (C{X-Auth-Subject}...);
  - L{Refused}: the error the client gets (401 with its challenge, 403),
    and why, for the access log (never the credential);
  - L{Answer}: a whole response for the client (a login redirect, the
    OpenID Connect callback's cookie, an auth service's own answer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred

from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import Request, Response

__all__ = [
    "Allowed",
    "Answer",
    "Authenticator",
    "Outcome",
    "Refused",
    "bearerToken",
    "cookieValue",
    "fieldValue",
    "withoutCookies",
]


class Allowed(NamedTuple):
    identity: str
    """The subject (user name, C{sub} claim...)."""
    fields: tuple[tuple[bytes, bytes], ...] = ()
    """Set on the request to the backend."""
    setCookies: tuple[bytes, ...] = ()
    """C{Set-Cookie} values added to the client's response (a forward auth
    service refreshing its session)."""


class Refused(NamedTuple):
    error: ProxyError
    why: str
    """For the access log: what was wrong, never the credential."""


class Answer(NamedTuple):
    response: Response
    why: str
    identity: str | None = None


Outcome = Allowed | Refused | Answer


class Authenticator(Protocol):
    """One C{[auth:NAME]} section, ready to authenticate requests."""

    identityFields: frozenset[bytes]
    """The fields this type sets from the identity: any copy the client
    sent is removed before the backend sees the request."""
    credentialCookies: frozenset[bytes]
    """Cookies that carry this type's credential: removed from the
    request to the backend."""
    credentialPaths: frozenset[bytes]
    """Paths whose query carries a credential (the OpenID Connect
    callback's C{code}): the access log records their target without
    its query."""

    def authenticate(self, request: Request) -> Outcome | Deferred[Outcome]: ...


_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)\Z")


def bearerToken(fields: Fields) -> bytes | None:
    """
    The token of an C{Authorization: Bearer} field (RFC 6750 2.1), or
    L{None}; two C{Authorization} fields are no token (which one would
    the backend read?).
    """
    values = fields.getAll(b"authorization")
    if len(values) != 1:
        return None
    match = _BEARER.match(values[0].strip())
    return match.group(1) if match else None


def cookieValue(fields: Fields, name: bytes) -> bytes | None:
    """
    The value of cookie C{name} (RFC 6265 5.4; HTTP/2 may split C{Cookie}
    over several field lines), or L{None}.  Two cookies of that name are
    none: a client (or a script on a sibling domain) that set a second
    one must not choose which is read.
    """
    found = None
    for line in fields.getAll(b"cookie"):
        for pair in line.split(b";"):
            cookieName, equals, value = pair.strip().partition(b"=")
            if equals and cookieName.strip() == name:
                if found is not None:
                    return None
                found = value.strip()
    return found


def withoutCookies(fields: Fields, names: frozenset[bytes]) -> Fields:
    """C{fields} without the cookies C{names} (the proxy's own credentials)."""
    lines = fields.getAll(b"cookie")
    if not lines or not names:
        return fields
    kept = []
    for line in lines:
        for pair in line.split(b";"):
            cookieName = pair.strip().partition(b"=")[0].strip()
            if pair.strip() and cookieName not in names:
                kept.append(pair.strip())
    if not kept:
        return fields.without(b"cookie")
    return fields.withField(b"cookie", b"; ".join(kept))


_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]")


def fieldValue(value: Any) -> bytes:
    """
    A claim or identity value as a field value: text as UTF-8, a list
    comma-joined, anything else as JSON; control characters removed so
    that a claim can never add a field line.
    """
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(item) for item in value)
    elif isinstance(value, bool):
        value = "true" if value else "false"
    elif not isinstance(value, str):
        import json

        value = json.dumps(value, separators=(",", ":"))
    return _UNSAFE.sub(b"", value.encode("utf-8")).strip()


def claimFields(
    claims: dict[str, Any], pairs: Iterable[tuple[str, str]]
) -> tuple[tuple[bytes, bytes], ...]:
    """The fields of C{claims_to_headers} for these claims (absent claims
    give no field)."""
    out = []
    for claim, name in pairs:
        if claim in claims and claims[claim] is not None:
            out.append((name.encode("ascii"), fieldValue(claims[claim])))
    return tuple(out)
