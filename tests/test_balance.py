"""
Tests for L{edgeproxy.upstream.balance}: the balancing policies, in memory,
with seeded randomness.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from edgeproxy.config.model import Server
from edgeproxy.h1 import Fields
from edgeproxy.upstream.balance import (
    POINTS_PER_WEIGHT,
    POLICIES,
    ConsistentHashBalancer,
    LeastConnBalancer,
    PowerOfTwoBalancer,
    RoundRobinBalancer,
    makeBalancer,
    requestHashKey,
)

A, B, C = Server("a", 1), Server("b", 1), Server("c", 1)


def weighted() -> tuple[Server, ...]:
    return (Server("w1", 1, weight=1), Server("w2", 1, weight=2), Server("w3", 1, weight=3))


def shares(picks: list[Server | None]) -> dict[str, float]:
    counts = Counter(server.host for server in picks if server is not None)
    return {host: count / len(picks) for host, count in counts.items()}


def test_policiesAreTheConfigValues() -> None:
    assert POLICIES == ("round_robin", "least_conn", "p2c", "hash")
    for policy in POLICIES:
        assert makeBalancer(policy, (A,)).policy == policy
    with pytest.raises(ValueError, match="unknown balancing policy 'random'"):
        makeBalancer("random", (A,))


# round_robin -------------------------------------------------------------


def test_smoothRoundRobinExactSequence() -> None:
    balancer = RoundRobinBalancer((Server("a", 1, weight=5), B, C))
    picks = [balancer.pick().host for _ in range(14)]  # type: ignore[union-attr]
    assert picks[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert picks[7:] == picks[:7]


def test_roundRobinEqualWeightsAlternate() -> None:
    balancer = RoundRobinBalancer((A, B, C))
    assert [balancer.pick() for _ in range(6)] == [A, B, C, A, B, C]


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "p2c"])
def test_weightsGiveShares(policy: str) -> None:
    balancer = makeBalancer(policy, weighted(), random.Random(7))
    picks = [balancer.pick() for _ in range(60000)]
    got = shares(picks)
    for host, expected in (("w1", 1 / 6), ("w2", 2 / 6), ("w3", 3 / 6)):
        assert abs(got[host] - expected) < 0.02, (host, got)


def test_hashWeightsGiveShares() -> None:
    # Ring points are pseudo-random, so shares are close to, not exactly,
    # the weights' shares: within 5 points at 100 points per weight.
    balancer = ConsistentHashBalancer(weighted())
    picks = [balancer.pick(b"user-%d" % i) for i in range(60000)]
    got = shares(picks)
    for host, expected in (("w1", 1 / 6), ("w2", 2 / 6), ("w3", 3 / 6)):
        assert abs(got[host] - expected) < 0.05, (host, got)


# least_conn --------------------------------------------------------------


def test_leastConnPrefersIdle() -> None:
    balancer = LeastConnBalancer((A, B, C))
    balancer.acquired(A)
    balancer.acquired(C)
    assert [balancer.pick() for _ in range(3)] == [B, B, B]
    balancer.released(A)
    assert balancer.pick() == A


def test_leastConnRespectsWeight() -> None:
    heavy = Server("heavy", 1, weight=4)
    balancer = LeastConnBalancer((heavy, A))
    # heavy with 3 in flight (3/4) is lighter than A with 1 (1/1).
    for _ in range(3):
        balancer.acquired(heavy)
    balancer.acquired(A)
    assert balancer.pick() == heavy
    balancer.acquired(heavy)  # 4/4 == 1/1: a tie, broken round robin
    assert {balancer.pick() for _ in range(5)} == {heavy, A}


def test_leastConnSpreadsLoadAsRequestsStart() -> None:
    balancer = LeastConnBalancer((A, B, C))
    for _ in range(9):
        server = balancer.pick()
        assert server is not None
        balancer.acquired(server)
    assert [balancer.inFlight(s) for s in (A, B, C)] == [3, 3, 3]


def test_releaseMoreThanAcquiredIsABug() -> None:
    balancer = LeastConnBalancer((A,))
    with pytest.raises(ValueError, match="released more often"):
        balancer.released(A)


# p2c ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_p2cNeverPicksTheBusiest(seed: int) -> None:
    balancer = PowerOfTwoBalancer((A, B, C), random.Random(seed))
    for _ in range(5):
        balancer.acquired(B)
    picks = [balancer.pick() for _ in range(500)]
    assert B not in picks
    assert set(picks) == {A, C}


def test_p2cIsReproducibleWithASeed() -> None:
    first = PowerOfTwoBalancer((A, B, C), random.Random(3))
    second = PowerOfTwoBalancer((A, B, C), random.Random(3))
    first.acquired(A)
    second.acquired(A)
    assert [first.pick() for _ in range(50)] == [second.pick() for _ in range(50)]


def test_p2cSingleCandidate() -> None:
    assert PowerOfTwoBalancer((A, Server("b", 1, down=True))).pick() == A


# hash ---------------------------------------------------------------------

KEYS = [b"client-%d" % i for i in range(20000)]


def mapping(servers: tuple[Server, ...]) -> dict[bytes, Server | None]:
    balancer = ConsistentHashBalancer(servers)
    return {key: balancer.pick(key) for key in KEYS}


def test_hashIsStableAndIgnoresTheOrder() -> None:
    five = tuple(Server(f"10.0.0.{i}", 80) for i in range(5))
    assert mapping(five) == mapping(tuple(reversed(five)))


def test_removingABackendMovesOnlyItsKeys() -> None:
    five = tuple(Server(f"10.0.0.{i}", 80) for i in range(5))
    before = mapping(five)
    after = mapping(five[:2] + five[3:])
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[key] == five[2] for key in moved)
    assert all(after[key] != five[2] for key in KEYS)
    assert 0.14 < len(moved) / len(KEYS) < 0.26


def test_downBackendMovesOnlyItsKeysToo() -> None:
    five = tuple(Server(f"10.0.0.{i}", 80) for i in range(5))
    withDown = five[:2] + (Server("10.0.0.2", 80, down=True),) + five[3:]
    removed = five[:2] + five[3:]
    assert mapping(withDown) == mapping(removed)


def test_addingABackendMovesAboutASixth() -> None:
    five = tuple(Server(f"10.0.0.{i}", 80) for i in range(5))
    six = five + (Server("10.0.0.5", 80),)
    before = mapping(five)
    after = mapping(six)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == six[5] for key in moved)
    assert 0.11 < len(moved) / len(KEYS) < 0.22


def test_hashWithoutKeyIsRoundRobin() -> None:
    balancer = ConsistentHashBalancer((A, B, C))
    assert [balancer.pick(None) for _ in range(3)] == [A, B, C]


def test_ringSize() -> None:
    balancer = ConsistentHashBalancer(weighted())
    assert len(balancer._rings[False][0]) == POINTS_PER_WEIGHT * 6


# backup and down -----------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_downIsNeverPicked(policy: str) -> None:
    off = Server("off", 1, weight=10, down=True)
    balancer = makeBalancer(policy, (off, A, B), random.Random(1))
    picks = [balancer.pick(b"k%d" % i) for i in range(1000)]
    assert off not in picks
    assert set(picks) == {A, B}


@pytest.mark.parametrize("policy", POLICIES)
def test_backupOnlyWhenNoPrimary(policy: str) -> None:
    spare = Server("spare", 1, backup=True)
    balancer = makeBalancer(policy, (A, spare, B), random.Random(1))
    assert spare not in {balancer.pick(b"k%d" % i) for i in range(1000)}

    primariesDown = makeBalancer(
        policy,
        (Server("a", 1, down=True), spare, Server("b", 1, down=True)),
        random.Random(1),
    )
    assert {primariesDown.pick(b"k%d" % i) for i in range(100)} == {spare}


@pytest.mark.parametrize("policy", POLICIES)
def test_nothingAvailable(policy: str) -> None:
    balancer = makeBalancer(
        policy, (Server("a", 1, down=True), Server("b", 1, backup=True, down=True))
    )
    assert balancer.pick(b"key") is None
    assert balancer.pick(None) is None


# hash_key ------------------------------------------------------------------


def test_hashKeyVariants() -> None:
    headers = Fields(
        [
            (b"X-User", b"alice"),
            (b"Cookie", b"theme=dark; session=s3cr3t"),
            (b"Cookie", b"other=1"),
        ]
    )
    assert requestHashKey("client_ip", "192.0.2.7", headers, b"/a") == b"192.0.2.7"
    assert requestHashKey("path", "192.0.2.7", headers, b"/a/b") == b"/a/b"
    assert requestHashKey("header:x-user", "192.0.2.7", headers, b"/") == b"alice"
    assert requestHashKey("cookie:session", "192.0.2.7", headers, b"/") == b"s3cr3t"
    assert requestHashKey("cookie:other", "192.0.2.7", headers, b"/") == b"1"


def test_hashKeyRepeatedHeaderIsOneValue() -> None:
    headers = Fields([(b"X-User", b"a"), (b"x-user", b"b")])
    assert requestHashKey("header:x-user", "ip", headers, b"/") == b"a, b"


def test_hashKeyMissingFallsBackToClientIP() -> None:
    headers = Fields([(b"Cookie", b"Session=x; sessionid=y")])
    assert requestHashKey("header:x-user", "2001:db8::1", headers, b"/") == b"2001:db8::1"
    # Cookie names are case-sensitive and matched whole.
    assert requestHashKey("cookie:session", "10.0.0.1", headers, b"/") == b"10.0.0.1"


# Slow start: members weighed by effectiveWeight() -----------------------------------


def rampingPair(now: list[float]) -> tuple[Any, Any]:
    from edgeproxy.upstream.backend import Backend

    steady = Backend(Server("steady", 1), "10.0.0.1", 1, clock=lambda: now[0])
    ramping = Backend(Server("ramping", 1), "10.0.0.2", 1, clock=lambda: now[0])
    ramping.startSlowStart(10.0)
    return steady, ramping


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "p2c"])
def test_slowStartShareGrowsWithTheRamp(policy: str) -> None:
    now = [0.0]
    steady, ramping = rampingPair(now)
    balancer = makeBalancer(policy, [steady, ramping], random.Random(3), available=lambda s: True)
    observed = []
    for _ in range(3):
        picks = [balancer.pick() for _ in range(2000)]
        observed.append(picks.count(ramping) / len(picks))
        now[0] += 4.5
    # weights 0.1, 0.505, 0.91 against 1: shares 0.09, 0.34, 0.48
    expected = [w / (1 + w) for w in (0.1, 0.505, 0.91)]
    assert observed == pytest.approx(expected, abs=0.03)
    now[0] += 10
    picks = [balancer.pick() for _ in range(2000)]
    assert picks.count(ramping) / len(picks) == pytest.approx(0.5, abs=0.03)


def test_leastConnLoadUsesTheRampedWeight() -> None:
    now = [0.0]
    steady, ramping = rampingPair(now)
    balancer = makeBalancer("least_conn", [steady, ramping], available=lambda s: True)
    for _ in range(5):
        balancer.acquired(steady)
    # 5 in flight on weight 1 is less than 1 in flight on weight 0.1.
    balancer.acquired(ramping)
    assert balancer.pick() is steady
