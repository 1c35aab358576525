# -*- test-case-name: tests.test_routing -*-
"""
Which route serves a request: host first, then the longest path prefix.

L{Router} is built once per configuration from the C{[route:NAME]} sections
and answers L{Router.match} with dictionary lookups only.

Host selection (most specific host set wins, no fall-through):
  1. exact names and IP literals (C{example.com}, C{192.0.2.1},
     C{2001:db8::1});
  2. one-label wildcards: C{*.example.com} matches C{a.example.com}, but
     neither C{example.com} nor C{a.b.example.com} (the nginx/Caddy and TLS
     certificate meaning of a wildcard);
  3. the catch-all C{*}.
Within the chosen host set the longest matching prefix across all its routes
wins; if none matches the result is L{None} even when a less specific host
set has a matching prefix: a known site never silently falls through to
another site's backend (the caller answers 404).

The request host is compared without its port, lower-cased, without a
trailing dot, and IPv6 literals in canonical form, so C{[2001:DB8:0::1]:443}
is C{2001:db8::1}.

Path prefixes match on segment boundaries: C{/api} matches C{/api} and
C{/api/x} but not C{/apix}; a prefix ending in C{/} (C{/api/}, C{/}) matches
every path that starts with it.  Prefixes are normalised like request paths
(L{edgeproxy.targets.normaliseTarget}) so they compare like with like.

Pure: no Twisted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgeproxy.config.model import Route
from edgeproxy.errors import BadRequest, ConfigError
from edgeproxy.targets import normaliseTarget


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route a request goes to, and the configured prefix that chose it."""

    route: Route
    prefix: bytes
    """The matched path prefix (normalised), e.g. for C{strip_prefix}."""


def normaliseHost(host: bytes | str) -> str | None:
    """
    The comparable form of a C{Host} value or configured name: no port, no
    brackets, lower case, no trailing dot, canonical IPv6.

    @return: The name, C{""} for an empty host, or L{None} when C{host}
        cannot be a host (non-ASCII, unbalanced brackets).
    """
    if isinstance(host, bytes):
        try:
            text = host.decode("ascii")
        except UnicodeDecodeError:
            return None
    else:
        text = host
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        try:
            return str(ipaddress.IPv6Address(text[1:end]))
        except ValueError:
            return None
    if text.count(":") > 1:
        # A configured IPv6 literal written without brackets.
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    name = text.partition(":")[0].lower()
    return name[:-1] if name.endswith(".") else name


class _PrefixTable:
    """Longest segment-boundary prefix lookup for one host set."""

    __slots__ = ("segment", "slash")

    def __init__(self) -> None:
        self.segment: dict[bytes, RouteMatch] = {}
        """Prefixes not ending in C{/}: match the path or the path + C{/}..."""
        self.slash: dict[bytes, RouteMatch] = {}
        """Prefixes ending in C{/}: match any path starting with them."""

    def add(self, prefix: bytes, match: RouteMatch) -> None:
        table = self.slash if prefix.endswith(b"/") else self.segment
        # The first route to claim a prefix for a host keeps it (the
        # configuration parser reports duplicates; this keeps lookups
        # deterministic if one slips through).
        table.setdefault(prefix, match)

    def lookup(self, path: bytes) -> RouteMatch | None:
        segment, slash = self.segment, self.slash
        found = segment.get(path)
        if found is not None:
            return found
        # Walk the slashes from the right.  At each one the candidates are
        # the prefix through it (slash table) and the prefix before it
        # (segment table): lengths strictly decrease, so the first hit is the
        # longest match.
        end = path.rfind(b"/")
        while end >= 0:
            found = slash.get(path[: end + 1])
            if found is not None:
                return found
            if end:
                found = segment.get(path[:end])
                if found is not None:
                    return found
            end = path.rfind(b"/", 0, end)
        return None


_UNKNOWN: Any = object()
_MAX_HOST_TABLES = 4096


class Router:
    """
    Host and longest-prefix routing over a sequence of L{Route}s.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self._exact: dict[str, _PrefixTable] = {}
        self._wildcard: dict[str, _PrefixTable] = {}
        self._any: _PrefixTable | None = None
        for route in routes:
            prefixes = [(self._prefix(route, p), route) for p in route.paths]
            for host in route.hosts:
                table = self._tableFor(route, host)
                for prefix, _ in prefixes:
                    table.add(prefix, RouteMatch(route, prefix))
        self.hosts: frozenset[str] = frozenset(self._exact)
        """The exact names and IP literals routed (for 421 decisions)."""
        self._tables: dict[bytes, _PrefixTable | None] = {}
        """C{Host} values already looked up, to their table: the same few
        values come on every request, and normalising one (decode, IPv6
        check, port, case) cost more than the lookup.  Bounded."""

    @staticmethod
    def _prefix(route: Route, prefix: str) -> bytes:
        try:
            path, query = normaliseTarget(prefix.encode("ascii"))
        except (UnicodeEncodeError, BadRequest) as e:
            raise ConfigError(f"invalid path prefix {prefix!r}: {e}", section=f"route:{route.name}", key="paths")
        if query:
            raise ConfigError(f"path prefix {prefix!r} has a query", section=f"route:{route.name}", key="paths")
        return path

    def _tableFor(self, route: Route, host: str) -> _PrefixTable:
        if host == "*":
            if self._any is None:
                self._any = _PrefixTable()
            return self._any
        if host.startswith("*."):
            suffix = normaliseHost(host[2:])
            if not suffix:
                raise ConfigError(f"invalid wildcard {host!r}", section=f"route:{route.name}", key="hosts")
            return self._wildcard.setdefault(suffix, _PrefixTable())
        name = normaliseHost(host)
        if not name or "*" in name:
            raise ConfigError(f"invalid host {host!r}", section=f"route:{route.name}", key="hosts")
        return self._exact.setdefault(name, _PrefixTable())

    def _hostTable(self, host: bytes) -> _PrefixTable | None:
        name = normaliseHost(host)
        if name is None:
            return None
        if name:
            table = self._exact.get(name)
            if table is not None:
                return table
            label, dot, parent = name.partition(".")
            if label and dot and ":" not in name:
                table = self._wildcard.get(parent)
                if table is not None:
                    return table
        return self._any

    def match(self, host: bytes, path: bytes) -> RouteMatch | None:
        """
        The route for a request.

        @param host: The C{Host} value (port allowed); C{b""} when the
            request had none (only the catch-all C{*} applies).
        @param path: The normalised path (L{normaliseTarget}), no query.
        @return: The match, or L{None}: no host set matches, or the chosen
            host set has no prefix for C{path}.
        """
        tables = self._tables
        table = tables.get(host, _UNKNOWN)
        if table is _UNKNOWN:
            table = self._hostTable(host)
            if len(tables) >= _MAX_HOST_TABLES:
                tables.clear()
            tables[host] = table
        if table is None:
            return None
        return table.lookup(path)
