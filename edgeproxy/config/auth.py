# -*- test-case-name: tests.test_config_security -*-
"""
Reading the C{[auth:NAME]} sections (L{readAuth}): the keys of each
C{type} (C{basic}, C{jwt}, C{forward}, C{oidc}) and only those, the URLs
that must be https, the algorithms a token may be signed with, the secret
files; and the files the sections name, read and checked here with the
rest of the configuration (an htpasswd file's users, L{htpasswdUsers}; a
JWKS file, L{checkJWKS}), so that C{edgeproxy check} refuses a bad one,
and a start or a reload never meets it, for L{edgeproxy.security.auth}.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edgeproxy.config import syntax
from edgeproxy.config.files import PEM_LIMIT, readRegularFile
from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.config.section import Section
from edgeproxy.config.securityvalues import (
    NO_NAMES,
    NO_PAIRS,
    TOKEN,
    fieldName,
    fieldPairs,
    secretText,
)

__all__ = ["AUTH_KEYS", "checkJWKS", "htpasswdUsers", "readAuth"]

T = TypeVar("T")

_COMMON_AUTH = ("type", "pass_authorization")
_AUTH_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "basic": ("htpasswd", "realm", "user_header"),
    "jwt": (
        "jwks",
        "jwks_ca",
        "issuer",
        "audience",
        "algorithms",
        "secret_file",
        "leeway",
        "token_from",
        "claims_to_headers",
        "jwks_refresh",
    ),
    "forward": (
        "url",
        "ca",
        "copy_request_headers",
        "copy_response_headers",
        "pass_cookies",
        "cache_ttl",
        "cache_size",
        "timeout",
    ),
    "oidc": (
        "issuer",
        "ca",
        "client_id",
        "client_secret_file",
        "scopes",
        "callback_path",
        "logout_path",
        "cookie_secret_file",
        "cookie_name",
        "session_ttl",
        "allow_emails",
        "allow_domains",
        "allow_claim",
        "claims_to_headers",
        "leeway",
        "timeout",
    ),
}
AUTH_KEYS = _COMMON_AUTH + tuple(
    sorted({key for keys in _AUTH_TYPE_KEYS.values() for key in keys})
)
_DEFAULT_SCOPES: tuple[str, ...] = ("openid", "email", "profile")
_DEFAULT_CLAIMS_TO_HEADERS: tuple[tuple[str, str], ...] = (
    ("sub", "x-auth-subject"), ("email", "x-auth-email"),
)


def _fieldNames(text: str) -> tuple[str, ...]:
    return tuple(fieldName(entry) for entry in syntax.splitList(text))


def _checkHTTPSURL(text: str, loopbackHTTP: bool = True) -> str:
    parts = urlsplit(text.strip())
    if not parts.hostname or parts.scheme not in ("https", "http"):
        raise ValueError(f"expected an https URL, got {text!r}")
    if parts.scheme == "http" and not (loopbackHTTP and _isLoopback(parts.hostname)):
        # A key set, a discovery document or a token fetched in clear text
        # can be replaced by anyone on the path.
        raise ValueError(f"expected an https URL (http only on a loopback address), got {text!r}")
    return text.strip()


def _isLoopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key(section: Section, key: str, minimum: int) -> bytes | None:
    text = secretText(section, key, minimum)
    return None if text is None else text.encode("utf-8")


_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA", "HS256", "HS384", "HS512")


def _algorithms(text: str) -> tuple[str, ...]:
    known = {name.lower(): name for name in _JWT_ALGORITHMS}
    chosen: list[str] = []
    for entry in syntax.splitList(text):
        name = known.get(entry.lower())
        if name is None:
            # "none" among them: RFC 8725 3.1, never accept unsigned tokens.
            raise ValueError(f"expected algorithms from {', '.join(_JWT_ALGORITHMS)}, got {entry!r}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError("expected at least one algorithm")
    return tuple(chosen)


def _tokenFrom(text: str) -> str:
    value = text.strip()
    if value.lower() == "header":
        return "header"
    kind, colon, name = value.partition(":")
    if colon and kind.lower() == "cookie" and TOKEN.match(name.strip()):
        return f"cookie:{name.strip()}"
    raise ValueError(f"expected header or cookie:NAME, got {text!r}")


def _claim(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:/-]+", text):
        raise ValueError(f"expected a claim name, got {text!r}")
    return text


def _callbackPath(text: str) -> str:
    path = syntax.checkOriginPath(text)
    if "?" in path:
        raise ValueError(f"expected a path without a query, got {text!r}")
    return path


def _allowClaim(text: str) -> tuple[str, str]:
    claim, colon, value = text.strip().partition(":")
    if not colon or not claim or not value:
        raise ValueError(f"expected CLAIM:VALUE such as groups:admins, got {text!r}")
    return _claim(claim.strip()), value.strip()


def _domains(text: str) -> tuple[str, ...]:
    return tuple(syntax.checkHostname(entry.lstrip("@")) for entry in syntax.splitList(text))


def _emails(text: str) -> tuple[str, ...]:
    emails = []
    for entry in syntax.splitList(text):
        if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", entry):
            raise ValueError(f"expected e-mail addresses, got {entry!r}")
        emails.append(entry.lower())
    return tuple(emails)


def readAuth(section: Section, name: str) -> AuthSettings:
    """An C{[auth:NAME]} section; the keys of its C{type} only."""
    kind = section.require("type", "basic, jwt, forward or oidc").lower()
    if kind not in _AUTH_TYPE_KEYS:
        raise section.error("type", f"expected basic, jwt, forward or oidc, got {kind!r}")
    for key in section.values:
        if key in AUTH_KEYS and key not in _COMMON_AUTH and key not in _AUTH_TYPE_KEYS[kind]:
            users = [t for t, keys in _AUTH_TYPE_KEYS.items() if key in keys]
            section.report(key, f"not used with type = {kind} (only with type = {' or '.join(users)})")
    common: dict[str, Any] = {"name": name, "type": kind,
              "pass_authorization": section.boolean("pass_authorization", False)}
    reader = {"basic": _readBasic, "jwt": _readJWT, "forward": _readForward, "oidc": _readOIDC}[kind]
    return AuthSettings(**common, **reader(section))


_Users = tuple[tuple[str, bytes], ...]


def _readFile(section: Section, text: str, check: Callable[[bytes], T]) -> tuple[str | None, T]:
    """The path C{text} names and C{check} of its contents; a problem
    with either is a C{ValueError} naming the file."""
    path = section.checkedPath(text, "file")
    try:
        return path, check(readRegularFile(path, PEM_LIMIT))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _users(data: bytes) -> _Users:
    return tuple(htpasswdUsers(data).items())


def _readBasic(section: Section) -> dict[str, Any]:
    htpasswd = section.require("htpasswd", "a file of user:hash lines (bcrypt or argon2)")
    realm = section.convert("realm", "edgeproxy", _realm)
    none: tuple[str | None, _Users] = (None, ())
    path, users = (
        section.convert("htpasswd", none, lambda t: _readFile(section, t, _users)) if htpasswd else none
    )
    return {
        "htpasswd": path,
        "users": users,
        "realm": realm,
        "user_header": section.convert("user_header", "x-auth-user", fieldName),
    }


def _realm(text: str) -> str:
    if '"' in text or "\\" in text or not text.isprintable():
        raise ValueError(f"expected printable text without quotes or backslashes, got {text!r}")
    return text


def _readJWT(section: Section) -> dict[str, Any]:
    algorithms: tuple[str, ...] = section.convert("algorithms", ("RS256", "ES256", "EdDSA"), _algorithms)
    secret = _key(section, "secret_file", 32)
    hmac = [a for a in algorithms if a.startswith("HS")]
    if hmac and secret is None and section.ok("algorithms"):
        section.report("algorithms", f"{', '.join(hmac)} needs secret_file (a shared key)")
    if secret is not None and not hmac and section.ok("algorithms"):
        section.report("secret_file", "only used with an HS256 (HMAC) algorithm")
    if hmac and len(hmac) != len(algorithms) and section.ok("algorithms"):
        # RFC 8725 2.1 / 3.1: an HMAC key beside public keys is the key
        # confusion attack's door; one kind of key per section.
        section.report("algorithms", "HMAC (HS*) and public-key algorithms cannot be mixed")
    none: tuple[str | None, bytes | None] = (None, None)
    jwks, document = none
    if not hmac:
        section.require("jwks", "a JWKS file or an https URL of one")

        def read(text: str) -> tuple[str | None, bytes | None]:
            if "://" in text:
                return _checkHTTPSURL(text), None
            return _readFile(section, text, checkJWKS)

        jwks, document = section.convert("jwks", none, read)
    elif section.has("jwks"):
        section.report("jwks", "not used with HMAC algorithms (the key is secret_file)")
    return {
        "jwks": jwks,
        "jwks_document": document,
        "jwks_ca": section.optionalFile("jwks_ca"),
        "issuer": section.convert("issuer", None, lambda t: t.strip()),
        "audience": section.convert("audience", NO_NAMES, lambda t: tuple(syntax.splitList(t))),
        "algorithms": algorithms,
        "secret": secret,
        "leeway": section.duration("leeway", 0.0, allowZero=True),
        "token_from": section.convert("token_from", "header", _tokenFrom),
        "claims_to_headers": section.convert(
            "claims_to_headers", NO_PAIRS, lambda t: fieldPairs(t, "claim", _claim)
        ),
        "jwks_refresh": section.duration("jwks_refresh", 3600.0),
    }


def _readForward(section: Section) -> dict[str, Any]:
    section.require("url", "the URL of the auth service")
    return {
        "url": section.convert("url", None, _checkHTTPSURL),
        "ca": section.optionalFile("ca"),
        "copy_request_headers": section.convert("copy_request_headers", NO_NAMES, _fieldNames),
        "copy_response_headers": section.convert("copy_response_headers", NO_NAMES, _fieldNames),
        "pass_cookies": section.boolean("pass_cookies", True),
        "cache_ttl": section.duration("cache_ttl", 0.0, allowZero=True),
        "cache_size": section.integer("cache_size", 10000, minimum=1),
        "timeout": section.duration("timeout", 5.0),
    }


def _readOIDC(section: Section) -> dict[str, Any]:
    section.require("issuer", "the provider's issuer URL (its discovery document)")
    section.require("client_id", "the client id registered at the provider")
    section.require("cookie_secret_file", "a file of at least 32 random characters")
    callback = section.convert("callback_path", "/.edgeproxy/oidc/callback", _callbackPath)
    logout = section.convert("logout_path", "/.edgeproxy/oidc/logout", _callbackPath)
    if callback == logout and section.ok("callback_path", "logout_path"):
        section.report("logout_path", "must differ from callback_path")
    return {
        "issuer": section.convert("issuer", None, _checkHTTPSURL),
        "ca": section.optionalFile("ca"),
        "client_id": section.convert("client_id", None, lambda t: t.strip()),
        "client_secret": secretText(section, "client_secret_file"),
        "scopes": section.convert("scopes", _DEFAULT_SCOPES, _scopes),
        "callback_path": callback,
        "logout_path": logout,
        "cookie_secret": _key(section, "cookie_secret_file", 32),
        "cookie_name": section.convert("cookie_name", "edgeproxy_session", syntax.checkToken),
        "session_ttl": section.duration("session_ttl", 8 * 3600.0),
        "allow_emails": section.convert("allow_emails", NO_NAMES, _emails),
        "allow_domains": section.convert("allow_domains", NO_NAMES, _domains),
        "allow_claim": section.convert("allow_claim", None, _allowClaim),
        "claims_to_headers": section.convert(
            "claims_to_headers", _DEFAULT_CLAIMS_TO_HEADERS,
            lambda t: fieldPairs(t, "claim", _claim),
        ),
        "leeway": section.duration("leeway", 60.0, allowZero=True),
        "timeout": section.duration("timeout", 5.0),
    }


def _scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(entry for part in syntax.splitList(text) for entry in part.split())
    for scope in scopes:
        if not re.fullmatch(r"[\x21\x23-\x5B\x5D-\x7E]+", scope):
            raise ValueError(f"invalid scope {scope!r}")
    if "openid" not in scopes:
        # OpenID Connect Core 3.1.2.1: without it the provider does plain
        # OAuth and sends no ID token.
        scopes = ("openid",) + scopes
    return scopes


def checkJWKS(data: bytes) -> bytes:
    """
    C{data} when it is a JWKS document (RFC 7517 5): a JSON object whose
    C{keys} is a list of JWKs (objects with a C{kty}).

    @raise ValueError: saying what is wrong.
    """
    try:
        document = json.loads(data)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no keys list)")
    for number, key in enumerate(document["keys"], 1):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ValueError(f"key {number} is not a JWK (an object with kty)")
    return data


def htpasswdUsers(data: bytes) -> dict[str, bytes]:
    """
    The users of an htpasswd file: C{user:hash} lines, C{#} comments and
    blank lines ignored.

    @raise ValueError: a line that is not C{user:hash}, or a hash that is
        neither bcrypt (C{$2a$}, C{$2b$}, C{$2y$}) nor argon2
        (C{$argon2id$}, C{$argon2i$}, C{$argon2d$}): MD5, SHA-1 and
        crypt(3) hashes are too cheap to brute-force to be accepted.
    """
    users: dict[str, bytes] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        if not colon or not user:
            raise ValueError(f"line {number}: expected user:hash")
        if not hashed.startswith((b"$2a$", b"$2b$", b"$2y$", b"$argon2")):
            raise ValueError(
                f"line {number}: user {user.decode('utf-8', 'replace')!r} has a hash that is neither "
                "bcrypt nor argon2 (htpasswd -B makes bcrypt)"
            )
        users[user.decode("utf-8", "replace")] = hashed
    return users
