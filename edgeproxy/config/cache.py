# -*- test-case-name: tests.test_config_cache -*-
"""
Reading the HTTP cache's keys: the C{[cache]} section (L{readCache}: the
stores every route with C{cache = yes} shares) and a route's cache keys
(L{readRouteCache}).  Part of L{edgeproxy.config.parse}; the cache itself
is L{edgeproxy.cache}.
"""

from __future__ import annotations

import os

from edgeproxy.config import syntax
from edgeproxy.config.section import Section
from edgeproxy.config.stagemodel import CacheSettings, RouteCache

__all__ = ["CACHE_KEYS", "ROUTE_CACHE_KEYS", "readCache", "readRouteCache"]

ROUTE_CACHE_KEYS = ("cache", "stale_while_revalidate", "stale_if_error", "default_ttl", "cache_cookies")
"""The cache keys of C{[route:NAME]}."""

CACHE_KEYS = (
    "memory",
    "disk",
    "disk_size",
    "max_object_size",
    "heuristic_max",
    "targeted_field",
    "key_includes",
    "purge_from",
    "name",
    "collapse_timeout",
)
"""The keys of C{[cache]}."""


def readRouteCache(section: Section) -> RouteCache | None:
    """The cache keys of a route (C{cache = yes} and its defaults)."""
    if not section.boolean("cache", False):
        for key in ROUTE_CACHE_KEYS[1:]:
            if section.has(key) and section.ok("cache"):
                section.report(key, "only used with cache = yes")
        return None
    defaults = RouteCache()
    return RouteCache(
        stale_while_revalidate=section.duration(
            "stale_while_revalidate", defaults.stale_while_revalidate, allowZero=True
        ),
        stale_if_error=section.duration("stale_if_error", defaults.stale_if_error, allowZero=True),
        default_ttl=section.duration("default_ttl", 0.0) if section.has("default_ttl") else None,
        cache_cookies=section.boolean("cache_cookies", defaults.cache_cookies),
    )


def readCache(section: Section) -> CacheSettings:
    """The C{[cache]} section."""
    defaults = CacheSettings()
    memory = section.size("memory", defaults.memory)
    disk = section.convert("disk", None, lambda text: _cacheDirectory(section, text))
    if section.has("disk_size") and not section.has("disk"):
        section.report("disk_size", "only used with disk = PATH")
    if memory == 0 and not section.has("disk") and section.ok("memory"):
        section.report("memory", "memory = 0 needs disk = PATH (the cache would have nowhere to store)")
    return CacheSettings(
        memory=memory,
        disk=disk,
        disk_size=section.size("disk_size", defaults.disk_size, minimum=1024 * 1024),
        max_object_size=section.size("max_object_size", defaults.max_object_size, minimum=1),
        heuristic_max=section.duration("heuristic_max", defaults.heuristic_max, allowZero=True),
        targeted_field=section.convert("targeted_field", defaults.targeted_field, _targetedField),
        key_includes=section.convert(
            "key_includes", (), lambda text: syntax.uniqueList(text, _checkKeyPart, "key part")
        ),
        purge_from=section.convert(
            "purge_from",
            (),
            lambda text: tuple(syntax.checkNetwork(entry) for entry in syntax.splitList(text)),
        ),
        name=section.convert("name", defaults.name, syntax.checkToken),
        collapse_timeout=section.duration("collapse_timeout", defaults.collapse_timeout),
    )


def _checkKeyPart(text: str) -> str:
    kind, colon, _ = text.strip().partition(":")
    # Before checkHashKey, whose message would offer client_ip and path.
    if not colon or kind.strip().lower() not in ("header", "cookie"):
        raise ValueError(f"expected header:NAME or cookie:NAME, got {text!r}")
    return syntax.checkHashKey(text)


def _cacheDirectory(section: Section, text: str) -> str:
    path = section.resolve(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be created or written by this user ({parent} is not writable)")
    return path


def _targetedField(text: str) -> str | None:
    if text.strip().lower() in ("off", "none"):
        return None
    return syntax.checkToken(text)
