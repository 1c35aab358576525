# -*- test-case-name: tests.test_balance -*-
"""
Balancing policies: which server of an upstream gets the next request.

A L{Balancer} knows the members of one upstream (configuration L{Server}s
in tests, L{edgeproxy.upstream.backend.Backend}s in the pool: anything with
C{weight}, C{backup} and C{address}), how many requests each has in flight
(the pool reports L{Balancer.acquired} and L{Balancer.released} around
every request) and, through an injected predicate, which are available.  It owns nothing else: no
timers, no I/O, no Twisted; randomness is an injected C{random.Random} so
tests replay exactly.

Availability: a member the predicate rejects (by default: a server marked
C{down} in the configuration; in the pool: L{Backend.isAvailable}) is never picked;
C{backup} servers are picked only when no primary is available.  When no
server at all is available L{Balancer.pick} returns L{None} and the caller
answers 503 at once.

Policies (C{balance =} in an C{[upstream:NAME]} section):

  - C{round_robin}: smooth weighted round robin (the nginx algorithm).
  - C{least_conn}: fewest requests in flight per unit of weight; ties are
    broken by smooth weighted round robin so an idle fleet is spread, not
    piled on the first server.
  - C{p2c}: power of two random choices; two distinct servers drawn by
    weight, the one with less in-flight load per unit of weight wins.
  - C{hash}: consistent hashing of a request key on a ring with
    L{POINTS_PER_WEIGHT} points per unit of weight, so removing or adding a
    server moves only that server's share of keys.

Slow start (C{slow_start}): a member with an C{effectiveWeight()} method
(a L{edgeproxy.upstream.backend.Backend}) is weighed by it rather than by
its configured C{weight}, so a recovering backend's share ramps up.  The
hash ring is not rebuilt for that: a ramping server keeps its ring points
and accepts only the keys whose own hash falls below its ramp fraction; the
others walk on to the next server, and come back as the fraction grows.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any

from edgeproxy.config.model import BALANCE_POLICIES
from edgeproxy.h1 import Fields

__all__ = [
    "POLICIES",
    "POINTS_PER_WEIGHT",
    "Balancer",
    "ConsistentHashBalancer",
    "LeastConnBalancer",
    "PowerOfTwoBalancer",
    "RoundRobinBalancer",
    "makeBalancer",
    "requestHashKey",
    "weightOf",
]

POINTS_PER_WEIGHT = 100
"""Ring points per unit of weight for C{hash}: with 100, each server's share
of keys stays within a few percent of its weight's share."""


def _ringHash(data: bytes) -> int:
    # A stable hash (unlike hash(), which is salted per process): the same
    # key must reach the same server after a restart and on every worker.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def weightOf(member: Any) -> float:
    """
    @return: the weight C{member} is balanced by now: its
        C{effectiveWeight()} when it has one (slow start), else its
        configured C{weight}.
    """
    effective = getattr(member, "effectiveWeight", None)
    return member.weight if effective is None else effective()


def _rampFactor(member: Any) -> float:
    ramp = getattr(member, "rampFactor", None)
    return 1.0 if ramp is None else ramp()


class Balancer:
    """
    The common part of every policy: in-flight accounting, availability
    (C{down}, C{backup}) and smooth weighted round robin, which subclasses
    use as their tie-breaker or fallback.

    @ivar servers: every configured server, in configuration order.
    """

    policy = "round_robin"

    def __init__(
        self,
        servers: Sequence[Any],
        rng: random.Random | None = None,
        available: Callable[[Any], bool] | None = None,
    ) -> None:
        """
        @param servers: the members, each with C{weight}, C{backup} and
            C{address}.
        @param available: whether a member may be picked now; by default
            C{not member.down}.
        """
        self._random = rng if rng is not None else random.Random()
        self._available = available if available is not None else _notDown
        self.servers: tuple[Any, ...] = ()
        self._inFlight: dict[Any, int] = {}
        self._currentWeights: dict[Any, float] = {}
        self.setServers(servers)

    def setServers(self, servers: Sequence[Any]) -> None:
        """
        Replace the members (a host name re-resolved to other addresses).
        Members kept keep their in-flight count; a removed member's requests
        still in flight may be released afterwards without error.
        """
        self.servers = tuple(servers)
        self._inFlight = {s: self._inFlight.get(s, 0) for s in self.servers}
        self._currentWeights = {s: self._currentWeights.get(s, 0) for s in self.servers}
        self._membersChanged()

    def _membersChanged(self) -> None:
        """Hook for policies with derived structures (the hash ring)."""

    # Accounting -----------------------------------------------------------

    def acquired(self, server: Any) -> None:
        """A request to C{server} started."""
        self._inFlight[server] += 1

    def released(self, server: Any) -> None:
        """A request to C{server} ended (body complete, failed or cancelled)."""
        if server not in self._inFlight:
            return  # removed by setServers while the request was in flight
        if self._inFlight[server] <= 0:
            raise ValueError(f"{server.address} released more often than acquired")
        self._inFlight[server] -= 1

    def inFlight(self, server: Any) -> int:
        """@return: the requests to C{server} now in flight."""
        return self._inFlight[server]

    # Availability ---------------------------------------------------------

    def isAvailable(self, server: Any) -> bool:
        """
        Whether C{server} may be picked at all (the injected predicate).
        """
        return self._available(server)

    def candidates(self) -> list[Any]:
        """
        @return: the available primaries, or when there are none the
            available backups (possibly none).
        """
        primaries = [s for s in self.servers if not s.backup and self.isAvailable(s)]
        if primaries:
            return primaries
        return [s for s in self.servers if s.backup and self.isAvailable(s)]

    # Choice ---------------------------------------------------------------

    def pick(self, key: bytes | None = None) -> Any | None:
        """
        Choose the server for the next request.

        @param key: the request's hash key; only the C{hash} policy uses it.
        @return: an available server, or L{None} when there is none.
        """
        candidates = self.candidates()
        if not candidates:
            return None
        return self._smooth(candidates)

    def _smooth(self, candidates: Sequence[Any]) -> Any:
        """
        Smooth weighted round robin over C{candidates}: each pick raises
        every candidate's current weight by its weight and lowers the
        winner's by the total, so a 5:1:1 split comes out a a b a c a a, not
        a a a a a b c.
        """
        total: float = 0
        best = candidates[0]
        for server in candidates:
            weight = weightOf(server)
            self._currentWeights[server] += weight
            total += weight
            if self._currentWeights[server] > self._currentWeights[best]:
                best = server
        self._currentWeights[best] -= total
        return best

    def _load(self, server: Any) -> tuple[int, float]:
        """In-flight per weight as a fraction, compared without division
        (exact for integer weights, the common case)."""
        return self._inFlight[server], weightOf(server)


def _notDown(server: Any) -> bool:
    return not server.down


def _lighter(a: tuple[int, float], b: tuple[int, float]) -> int:
    """-1, 0 or 1 as load C{a} is below, equal to or above load C{b}."""
    left = a[0] * b[1]
    right = b[0] * a[1]
    return (left > right) - (left < right)


class RoundRobinBalancer(Balancer):
    """C{balance = round_robin}: L{Balancer.pick} as it is."""


class LeastConnBalancer(Balancer):
    """C{balance = least_conn}: the lowest in-flight/weight wins."""

    policy = "least_conn"

    def pick(self, key: bytes | None = None) -> Any | None:
        candidates = self.candidates()
        if not candidates:
            return None
        best = [candidates[0]]
        for server in candidates[1:]:
            order = _lighter(self._load(server), self._load(best[0]))
            if order < 0:
                best = [server]
            elif order == 0:
                best.append(server)
        if len(best) == 1:
            return best[0]
        return self._smooth(best)


class PowerOfTwoBalancer(Balancer):
    """C{balance = p2c}: the lighter of two servers drawn at random by weight."""

    policy = "p2c"

    def pick(self, key: bytes | None = None) -> Any | None:
        candidates = self.candidates()
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        weights = [weightOf(s) for s in candidates]
        first = self._random.choices(candidates, weights=weights)[0]
        rest = [s for s in candidates if s is not first]
        second = self._random.choices(
            rest, weights=[w for s, w in zip(candidates, weights) if s is not first]
        )[0]
        # On a tie the first draw wins: it was drawn by weight, so an idle
        # fleet still gets each server's weighted share.
        if _lighter(self._load(second), self._load(first)) < 0:
            return second
        return first


class ConsistentHashBalancer(Balancer):
    """
    C{balance = hash}: the first server clockwise from the key's point on
    a ring.  Unavailable servers are skipped by walking on, so a server
    going away moves only its own keys, to its ring neighbours.  A request
    without a key (a WebSocket handshake today) gets smooth round robin.
    """

    policy = "hash"

    def _membersChanged(self) -> None:
        self._rings = {
            backup: self._buildRing([s for s in self.servers if s.backup == backup])
            for backup in (False, True)
        }

    @staticmethod
    def _buildRing(servers: Sequence[Any]) -> tuple[list[int], list[Any]]:
        points: list[tuple[int, str, Any]] = []
        for server in servers:
            for index in range(POINTS_PER_WEIGHT * server.weight):
                label = f"{server.address}#{index}".encode("ascii")
                # The address breaks the (astronomically rare) tie of two
                # equal points deterministically.
                points.append((_ringHash(label), server.address, server))
        points.sort(key=lambda point: (point[0], point[1]))
        return [p[0] for p in points], [p[2] for p in points]

    def _walk(
        self, ring: tuple[list[int], list[Any]], point: int, admission: float
    ) -> Any | None:
        """
        @param admission: the key's second hash in [0, 1): a server in slow
            start takes the key only when this is below its ramp fraction,
            so each key's answer is stable while the fraction grows.
        """
        hashes, owners = ring
        if not hashes:
            return None
        start = bisect.bisect_left(hashes, point)
        seen: set[Any] = set()
        fallback: Any | None = None
        for offset in range(len(hashes)):
            server = owners[(start + offset) % len(hashes)]
            if server in seen:
                continue
            seen.add(server)
            if self.isAvailable(server):
                if admission < _rampFactor(server):
                    return server
                if fallback is None:
                    # Every available server ramping and refusing the key:
                    # the first one clockwise still takes it.
                    fallback = server
        return fallback

    def pick(self, key: bytes | None = None) -> Any | None:
        if key is None:
            return super().pick(None)
        point = _ringHash(key)
        admission = _ringHash(b"slow-start\0" + key) / 2.0**64
        chosen = self._walk(self._rings[False], point, admission)
        if chosen is None:
            chosen = self._walk(self._rings[True], point, admission)
        return chosen


_POLICIES: dict[str, type[Balancer]] = {
    "round_robin": RoundRobinBalancer,
    "least_conn": LeastConnBalancer,
    "p2c": PowerOfTwoBalancer,
    "hash": ConsistentHashBalancer,
}

POLICIES: tuple[str, ...] = BALANCE_POLICIES
"""The values C{balance =} accepts: the configuration model's names
(L{edgeproxy.config.model.BALANCE_POLICIES}), which this module implements."""


def makeBalancer(
    policy: str,
    servers: Sequence[Any],
    rng: random.Random | None = None,
    available: Callable[[Any], bool] | None = None,
) -> Balancer:
    """
    @param policy: one of L{POLICIES}.
    @param available: see L{Balancer.__init__}.
    @raise ValueError: for any other policy.
    """
    try:
        factory = _POLICIES[policy]
    except KeyError:
        raise ValueError(
            f"unknown balancing policy {policy!r} (expected one of {', '.join(POLICIES)})"
        ) from None
    return factory(servers, rng, available)


def requestHashKey(spec: str, clientIP: str, fields: Fields, path: bytes) -> bytes:
    """
    The C{hash} policy's key for one request.

    @param spec: the upstream's C{hash_key} as parsed (C{client_ip}, C{path},
        C{header:name} lower-cased, C{cookie:Name}).
    @param clientIP: the client's address as seen by the listener.
    @param fields: the client's request fields.
    @param path: the request's normalised path (without the query).
    @return: the key; a missing header or cookie falls back to the client
        address, so clients without it are still spread, and each one stays
        on its server.
    """
    if spec == "path":
        return path
    kind, _, name = spec.partition(":")
    if kind == "header":
        values = fields.getAll(name.encode("ascii"))
        if values:
            # RFC 9110 §5.3: repeated field lines are one comma-joined value.
            return b", ".join(values)
    elif kind == "cookie":
        wanted = name.encode("ascii")
        # RFC 6265 §5.4: "name=value" pairs separated by "; "; HTTP/2 may
        # split them over several field lines (RFC 9113 §8.2.3).
        for line in fields.getAll(b"cookie"):
            for pair in line.split(b";"):
                cookieName, equals, value = pair.strip().partition(b"=")
                if equals and cookieName.strip() == wanted:
                    return value.strip()
    return clientIP.encode("ascii", "replace")
