"""
L{edgeproxy.acme.policy}: the pure decisions of automatic certificates,
as tables, with the time passed in.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edgeproxy.acme.policy import (
    FIRST_RETRY,
    MAX_RETRY,
    RenewalWindow,
    TokenBucket,
    decide,
    renewalTime,
    retryDelay,
    wantedNames,
)
from edgeproxy.config import load

DAY = 86400.0


def config(tmp_path: Path, acme: str, hosts: list[str]) -> object:
    (tmp_path / "site.pem").write_text("x\n")
    routes = "".join(
        f"\n[route:r{index}]\nhosts = {host}\nupstream = app\n" for index, host in enumerate(hosts)
    )
    (tmp_path / "edge.ini").write_text(f"""
[tls]
certificates = site.pem
[acme]
storage = state
{acme}
[listen:https]
endpoint = tcp:443
tls = yes
[upstream:app]
servers = 127.0.0.1:80
{routes}""")
    return load(str(tmp_path / "edge.ini"))


@pytest.mark.parametrize(
    "hosts, files, wanted",
    [
        (["a.example"], [], ("a.example",)),
        # Wildcards need DNS-01; IP literals and * cannot be ordered.
        (["*.b.example, c.example", "192.0.2.1, *"], [], ("c.example",)),
        # Names a file covers (exactly or by a one-label wildcard) are not ordered.
        (["a.example, www.example, x.y.example"], ["www.example", "*.y.example"], ("a.example",)),
        (["B.example.", "a.example"], [], ("b.example", "a.example")),
        # A wildcard file does not cover two labels down.
        (["x.y.z.example"], ["*.z.example"], ("x.y.z.example",)),
    ],
)
def test_wantedNamesAuto(tmp_path: Path, hosts: list[str], files: list[str], wanted: tuple[str, ...]) -> None:
    assert wantedNames(config(tmp_path, "", hosts), files) == wanted  # type: ignore[arg-type]


def test_wantedNamesListed(tmp_path: Path) -> None:
    """An explicit list is ordered as listed, whatever routes and files say."""
    loaded = config(tmp_path, "names = b.example, a.example", ["c.example"])
    assert wantedNames(loaded, ["b.example"]) == ("b.example", "a.example")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "notBefore, notAfter, renewBefore, expected",
    [
        (0, 90 * DAY, 30 * DAY, 60 * DAY),
        (0, 90 * DAY, 89 * DAY, 1 * DAY),
        # A margin as long as the lifetime (or longer): two thirds in.
        (0, 6 * DAY, 30 * DAY, 4 * DAY),
        (0, 90 * DAY, 90 * DAY, 60 * DAY),
    ],
)
def test_renewalTimeByMargin(notBefore: float, notAfter: float, renewBefore: float, expected: float) -> None:
    assert renewalTime(notBefore, notAfter, renewBefore) == expected


def test_renewalTimeByWindow() -> None:
    """An ARI window wins, later or earlier than the margin; a point inside it."""
    later = RenewalWindow(70 * DAY, 72 * DAY)
    for seed in range(20):
        when = renewalTime(0, 90 * DAY, 30 * DAY, later, random.Random(seed))
        assert later.start <= when <= later.end
    earlier = RenewalWindow(10 * DAY, 10 * DAY)
    assert renewalTime(0, 90 * DAY, 30 * DAY, earlier, random.Random(1)) == 10 * DAY
    # Never past the end of validity.
    assert renewalTime(0, 90 * DAY, 30 * DAY, RenewalWindow(95 * DAY, 99 * DAY)) == 90 * DAY


@pytest.mark.parametrize(
    "failures, retryAfter, delay",
    [
        (0, None, 0.0),
        (1, None, FIRST_RETRY),
        (2, None, 2 * FIRST_RETRY),
        (5, None, 16 * FIRST_RETRY),
        (40, None, MAX_RETRY),
        # Retry-After is never cut short...
        (1, 3600.0, 3600.0),
        # ...and a shorter one does not shorten the back-off.
        (3, 10.0, 4 * FIRST_RETRY),
        # A week at most, whatever the CA says.
        (1, 30 * DAY, 7 * DAY),
    ],
)
def test_retryDelay(failures: int, retryAfter: float | None, delay: float) -> None:
    assert retryDelay(failures, retryAfter) == delay


@pytest.mark.parametrize(
    "now, notAfter, renewAt, retryAt, order, at, why",
    [
        (100, None, None, None, True, 100, "no certificate yet"),
        (100, 500, 400, None, False, 400, "valid"),
        (450, 500, 400, None, True, 450, "renewal due"),
        (600, 500, 400, None, True, 600, "the certificate expired"),
        # A back-off holds everything, even a missing certificate.
        (100, None, None, 160, False, 160, "backing off after a failure"),
        (450, 500, 400, 460, False, 460, "backing off after a failure"),
        (460, 500, 400, 460, True, 460, "renewal due"),
    ],
)
def test_decide(now: float, notAfter: float | None, renewAt: float | None, retryAt: float | None,
                order: bool, at: float, why: str) -> None:
    decision = decide(now, notAfter, renewAt, retryAt)
    assert (decision.order, decision.at, decision.why) == (order, at, why)


def test_tokenBucket() -> None:
    bucket = TokenBucket(burst=2, interval=60.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(30.0) is False
    assert bucket.take(60.0) is True
    assert bucket.take(61.0) is False
    # Never more than the burst saved up.
    assert [bucket.take(10_000.0) for _ in range(3)] == [True, True, False]


def test_tokenBucketResized() -> None:
    """New settings keep what was saved up (a reload does not refill it),
    capped by the new burst; the new interval refills from then on."""
    bucket = TokenBucket(burst=3, interval=60.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(2)] == [True, True]
    bucket.resize(burst=5, interval=1.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(2)] == [True, False]
    assert [bucket.take(2.0) for _ in range(3)] == [True, True, False]
    bucket.resize(burst=1, interval=1.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(2)] == [True, False]
