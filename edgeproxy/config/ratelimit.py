# -*- test-case-name: tests.test_config_security -*-
"""
Reading the C{[ratelimit:NAME]} sections (L{readRateLimit}: a rate and
its burst, a concurrency bound, the key requests are counted by, where the
counts are kept) and the C{[redis]} section the shared ones are kept in
(L{readRedis}: its URL, credentials, CA, timeout and key prefix), for
L{edgeproxy.security.ratelimit} and L{edgeproxy.security.redisstore}.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeproxy.config import syntax
from edgeproxy.config.stagemodel import RateLimit, RedisSettings
from edgeproxy.config.section import Section
from edgeproxy.config.securityvalues import secretText

__all__ = ["RATELIMIT_KEYS", "REDIS_KEYS", "readRateLimit", "readRedis"]

RATELIMIT_KEYS = ("rate", "burst", "key", "concurrency", "store", "on_store_error")
REDIS_KEYS = ("url", "username", "password_file", "ca", "timeout", "prefix")

_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(s|sec|second|m|min|minute|h|hour)\s*\Z", re.I)
_WINDOWS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0}


def _rate(text: str) -> tuple[int, float]:
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"expected a rate such as 100/s, 30/m or 1000/h, got {text!r}")
    count, multiple, unit = match.groups()
    window = _WINDOWS[unit.lower()] * (int(multiple) if multiple else 1)
    if int(count) < 1 or window <= 0:
        raise ValueError(f"expected a rate of at least 1 request per window, got {text!r}")
    return int(count), window


def _rateKey(text: str) -> str:
    value = text.strip()
    if value.lower() in ("client_ip", "route", "identity"):
        return value.lower()
    return syntax.checkHashKey(value) if ":" in value else _badKey(text)


def _badKey(text: str) -> str:
    raise ValueError(
        f"expected client_ip, route, identity, header:NAME or cookie:NAME, got {text!r}"
    )


def readRateLimit(section: Section, name: str) -> RateLimit:
    """A C{[ratelimit:NAME]} section."""
    if not section.has("rate") and not section.has("concurrency"):
        raise section.error(None, "needs rate = N/s (or /m, /h), concurrency = N, or both")
    count, window = section.convert("rate", (1, 1.0), _rate)
    hasRate = section.has("rate")
    burst = section.integer("burst", max(1, count) if hasRate else 1, minimum=1)
    if section.has("burst") and not hasRate:
        section.report("burst", "only used with rate")
    store = section.choice("store", "local", {"local": "local", "redis": "redis"})
    onError = section.choice("on_store_error", "open", {"open": "open", "closed": "closed"})
    if section.has("on_store_error") and store != "redis" and section.ok("store"):
        section.report("on_store_error", "only used with store = redis")
    return RateLimit(
        name=name,
        count=count,
        window=window,
        burst=burst,
        key=section.convert("key", "client_ip", _rateKey),
        concurrency=section.integer("concurrency", 0, minimum=1),
        store=store,
        on_store_error=onError,
        rate_enabled=hasRate,
    )


def readRedis(section: Section) -> RedisSettings:
    """The C{[redis]} section."""
    url = section.require("url", "redis://HOST:PORT/DB, rediss://... for TLS, or unix:/PATH")
    try:
        parsed = _parseRedisURL(url, section)
    except ValueError as e:
        raise section.error("url", str(e)) from None
    password = secretText(section, "password_file")
    if password is None and parsed.get("password"):
        # A password in the URL is refused: it would be shown by `check`
        # and kept in the configuration file for anyone who reads it.
        section.report("url", "put the password in password_file, not in the URL")
    parsed.pop("password", None)
    ca = section.optionalFile("ca")
    if ca is not None and not parsed.get("tls"):
        section.report("ca", "only used with a rediss:// URL (TLS)")
    return RedisSettings(
        url=url,
        password=password,
        username=section.convert("username", parsed.pop("username", None), lambda t: t.strip()),
        ca=ca,
        timeout=section.duration("timeout", 0.25),
        prefix=section.convert("prefix", "edgeproxy", _prefix),
        **parsed,
    )


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text.strip()):
        raise ValueError(f"expected a key prefix of letters, digits, '_', '.', ':' or '-', got {text!r}")
    return text.strip()


def _parseRedisURL(url: str, section: Section) -> dict[str, Any]:
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        path, _, query = path.partition("?")
        if not path:
            raise ValueError(f"expected unix:/path/to/redis.sock, got {url!r}")
        db = 0
        for part in query.split("&") if query else ():
            key, _, value = part.partition("=")
            if key == "db" and value.isdigit():
                db = int(value)
            else:
                raise ValueError(f"unknown parameter {part!r} (only db=N)")
        return {"path": section.resolve(path), "db": db}
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:/PATH, got {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    number = parts.path.strip("/") or "0"
    if not number.isdigit():
        raise ValueError(f"expected a database number after the port, got {parts.path!r}")
    return {
        "host": parts.hostname,
        "port": port,
        "db": int(number),
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username) if parts.username else None,
        "password": parts.password,
    }
