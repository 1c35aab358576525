# -*- test-case-name: tests.test_security_auth -*-
"""
C{type = basic}: HTTP Basic authentication (RFC 7617) against an htpasswd
file of bcrypt or argon2 hashes.

Hashes are checked with the C{bcrypt} and C{argon2-cffi} libraries, whose
comparisons are constant-time; an unknown user is checked against a dummy
hash of the same cost, so that the answer's timing does not tell which
user names exist.  Both hashes are slow on purpose (tens of milliseconds),
so they run in the reactor's thread pool, never on the reactor, and a
successful check is remembered for L{CACHE_SECONDS} under a keyed hash of
the credentials (never the password itself), bounded to L{CACHE_SIZE}
entries: a browser sends the same credentials with every request.

The file is read and checked with the configuration
(L{edgeproxy.config.auth}): at start, by C{edgeproxy check} and on every
reload (SIGHUP), so an edited file takes effect on reload, and a file with
a line it cannot use keeps the previous configuration serving.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool

from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import Unauthorized
from edgeproxy.pipeline.values import Request
from edgeproxy.security.auth.base import Allowed, Outcome, Refused

__all__ = ["BasicAuthenticator", "basicCredentials", "checkHash"]

CACHE_SECONDS = 300.0
CACHE_SIZE = 10_000

_DUMMY_BCRYPT = b"$2b$12$C6UzMDM.H6dfI/f/IKxGhuIYV6Hq9pjW6yM2Xr5hPgkb1s6IyiYC6"


def basicCredentials(request: Request) -> tuple[str, str] | None:
    """
    The user and password of an C{Authorization: Basic} field, or L{None}
    (none, two of them, not Basic, not base64, no colon, not UTF-8).
    """
    values = request.fields.getAll(b"authorization")
    if len(values) != 1:
        return None
    scheme, _, encoded = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password


def checkHash(hashed: bytes, password: str) -> bool:
    """Whether C{password} matches a bcrypt or argon2 C{hashed} (blocking)."""
    secret = password.encode("utf-8")
    if hashed.startswith(b"$argon2"):
        from argon2 import PasswordHasher
        from argon2.exceptions import Argon2Error, InvalidHashError

        try:
            return bool(PasswordHasher().verify(hashed.decode("ascii"), secret))
        except (Argon2Error, InvalidHashError, ValueError):
            return False
    import bcrypt

    if hashed.startswith(b"$2y$"):
        # Apache's htpasswd writes $2y$, the same algorithm as $2b$.
        hashed = b"$2b$" + hashed[4:]
    try:
        return bool(bcrypt.checkpw(secret, hashed))
    except ValueError:
        return False


class BasicAuthenticator:
    """One C{type = basic} section with its users."""

    identityFields: frozenset[bytes]
    credentialCookies: frozenset[bytes] = frozenset()
    credentialPaths: frozenset[bytes] = frozenset()

    def __init__(
        self,
        users: dict[str, bytes],
        realm: str,
        userHeader: str,
        clock: Any,
        run: Callable[[Callable[[], bool]], Deferred[bool]],
    ) -> None:
        """
        @param run: runs a blocking check and fires with its result (the
            thread pool; tests run it at once).
        """
        self.users = users
        self.clock = clock
        self.run = run
        self.userHeader = userHeader.encode("ascii")
        self.identityFields = frozenset((self.userHeader,))
        challenge = b'Basic realm="%s", charset="UTF-8"' % (realm.encode("utf-8"),)
        self._challenge = ((b"www-authenticate", challenge),)
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()

    @classmethod
    def fromSettings(cls, settings: AuthSettings, reactor: Any) -> BasicAuthenticator:
        users = dict(settings.users)

        def run(check: Callable[[], bool]) -> Deferred[bool]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), check)

        return cls(users, settings.realm, settings.user_header, reactor, run)

    def _refused(self, why: str) -> Refused:
        error = Unauthorized(why)
        error.fields = self._challenge
        return Refused(error, why)

    def authenticate(self, request: Request) -> Outcome | Deferred[Outcome]:
        credentials = basicCredentials(request)
        if credentials is None:
            return self._refused("missing credentials")
        user, password = credentials
        token = hmac.new(self._key, f"{user}\0{password}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        now = self.clock.seconds()
        cached = self._cache.get(token)
        if cached is not None and cached > now:
            return Allowed(user, ((self.userHeader, user.encode("utf-8")),))
        hashed = self.users.get(user)
        known = hashed is not None
        target = hashed if hashed is not None else _DUMMY_BCRYPT

        def decided(ok: bool) -> Outcome:
            if not (ok and known):
                return self._refused("wrong user or password")
            cache = self._cache
            cache[token] = self.clock.seconds() + CACHE_SECONDS
            cache.move_to_end(token)
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
            return Allowed(user, ((self.userHeader, user.encode("utf-8")),))

        d = self.run(lambda: checkHash(target, password))
        return d.addCallback(decided)


def runNow(check: Callable[[], bool]) -> Deferred[bool]:
    """Run a check synchronously (for tests and tools)."""
    return succeed(check())
