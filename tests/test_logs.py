"""
Tests for L{edgeproxy.logs}: the process log's level, format and journal
priorities as an operator reads them, and the refusal summary that replaces
a process-log line per refused request.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, LogPublisher, globalLogPublisher

from edgeproxy.accesslog import AccessLog
from edgeproxy.config.model import Config, Listener, ProxySettings
from edgeproxy.errors import BadRequest, MisdirectedRequest
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.logs import LogPolicy, ProcessLogObserver, RefusalSummary, Repeats, reasonOf, refusals
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime


def logged(policy: LogPolicy, environ: dict[str, str] | None = None, stream: io.StringIO | None = None) -> tuple[Logger, io.StringIO]:
    out = stream if stream is not None else io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(ProcessLogObserver(out, policy, environ or {}))
    return Logger(namespace="edgeproxy.test", observer=publisher), out


def test_levelChangesAtOnce() -> None:
    """The observer reads the policy at each event: a reload's new level applies."""
    policy = LogPolicy()
    log, out = logged(policy)
    log.debug("hidden")
    log.info("shown at info")
    policy.configure("warn", "text")
    log.info("hidden at warn")
    log.warn("a warning")
    policy.configure("debug", "text")
    log.debug("shown at debug")
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["shown at info", "a warning", "shown at debug"]
    assert lines[1].endswith("[edgeproxy.test#warn] a warning")
    with pytest.raises(ValueError):
        policy.configure("verbose", "text")


def test_neverABytesRepr() -> None:
    """Byte strings in fields are shown as text, never as C{b'...'}."""
    log, out = logged(LogPolicy())
    log.info("refusing {method} {target} {parts}", method=b"GET", target=b"/wp-login.php\xff", parts=(b"a", 1))
    assert out.getvalue().split("] ", 1)[1] == "refusing GET /wp-login.php\\xff ('a', 1)\n"


def test_twistedChatterIsDebug() -> None:
    """Start-up noise Twisted logs for every port and factory shows at debug only."""
    policy = LogPolicy()
    log, out = logged(policy)
    factory = object()
    log.info("Starting factory {factory!r}", factory=factory)
    log.info("EdgeSite (TLS) starting on 8443")
    log.info("supervisor (for the workers) starting on 18443")
    log.info("(TCP Port 8443 Closed)")
    log.info("Stopping factory {factory!r}", factory=factory)
    log.info("Listening on 127.0.0.1:8443 for [listen:https] (https)")
    assert out.getvalue().count("\n") == 1
    assert "object at 0x" not in out.getvalue()
    policy.configure("debug", "text")
    log.info("Starting factory {factory!r}", factory=factory)
    assert "#debug] Starting factory" in out.getvalue()


def test_journaldPriorities() -> None:
    """
    C{log_format = journald}: C{<N>} on every line (sd-daemon(3)), also each
    line of a traceback, so that C{journalctl -p warning} filters by it.
    """
    policy = LogPolicy()
    policy.configure("info", "journald")
    log, out = logged(policy)
    log.info("SIGHUP: reloading")
    log.warn("Backend {backend} of {upstream}: up -> down", backend="10.0.0.1:80", upstream="app")
    log.error("Reload refused, still serving the previous configuration: {problem}", problem="x")
    log.critical("worker 1 cannot start")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failure("unexpected")
    lines = out.getvalue().splitlines()
    assert lines[0] == "<6>[edgeproxy.test#info] SIGHUP: reloading"
    assert lines[1] == "<4>[edgeproxy.test#warn] Backend 10.0.0.1:80 of app: up -> down"
    assert lines[2].startswith("<3>[edgeproxy.test#error] Reload refused")
    assert lines[3].startswith("<2>")
    assert all(line.startswith("<2>") for line in lines[4:]), lines[4:]
    assert any("RuntimeError: boom" in line for line in lines[4:])


def test_autoFollowsJournalStream(tmp_path: Path) -> None:
    """
    C{log_format = auto}: priorities when standard output is the stream
    C{$JOURNAL_STREAM} names (device:inode), plain text otherwise (the
    variable is inherited by children whose output goes elsewhere).
    """
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        info = os.fstat(stream.fileno())
        log, _ = logged(LogPolicy(), {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)  # type: ignore[arg-type]
        log.warn("to the journal")
        log, _ = logged(LogPolicy(), {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream)  # type: ignore[arg-type]
        log.warn("elsewhere")
        policy = LogPolicy()
        policy.configure("info", "text")
        log, _ = logged(policy, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)  # type: ignore[arg-type]
        log.warn("text asked for")
    lines = path.read_text().splitlines()
    assert lines[0] == "<4>[edgeproxy.test#warn] to the journal"
    assert not lines[1].startswith("<") and lines[1].endswith("elsewhere")
    assert not lines[2].startswith("<")


# Refusals -----------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[list[dict]]:
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured.append)


def summaries(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == "edgeproxy.refusals"]


def test_burstIsOneLinePerInterval(events: list[dict]) -> None:
    """
    Thousands of refusals in a burst make one process-log line per interval,
    with the count of each status and reason.
    """
    clock = Clock()
    summary = RefusalSummary(clock, interval=10)
    for _ in range(16_700):
        summary.note(421, "misdirected request")
    for _ in range(24):
        summary.note(400, "bad request")
    assert summaries(events) == []
    clock.advance(10)
    assert summaries(events) == [
        "refused 16,724 requests in the last 10s: 421 misdirected request x 16,700, 400 bad request x 24"
    ]
    clock.advance(60)
    assert len(summaries(events)) == 1  # a quiet interval logs nothing

    # Refusals for a minute, one every 10 ms: six lines, not 6,000.
    for _ in range(6000):
        summary.note(404, "no route")
        clock.advance(0.01)
    clock.advance(10)
    lines = summaries(events)[1:]
    assert len(lines) in (6, 7)
    assert sum(int(line.split()[1].replace(",", "")) for line in lines) == 6000


def test_reasonsAreBounded(events: list[dict]) -> None:
    """Distinct reasons beyond the bound are counted together: the line stays short."""
    clock = Clock()
    summary = RefusalSummary(clock, interval=1, maxReasons=2)
    for n in range(100):
        summary.note(400, f"reason {n}")
    summary.flush()
    assert summaries(events) == [
        "refused 100 requests in the last 1s: 400 other x 98, 400 reason 0 x 1, 400 reason 1 x 1"
    ]


def test_reasonOf() -> None:
    assert reasonOf(MisdirectedRequest("no route for host b'x'")) == "misdirected request"
    assert reasonOf(BadRequest("whatever")) == "bad request"


def test_refusedRequestsLeaveNoProcessLogLineEach(events: list[dict]) -> None:
    """
    Through the real request path: 500 requests for an unknown host are 500
    404 answers, no process-log line each, and one summary when the interval
    ends.
    """
    config = Config(path="/e.ini", proxy=ProxySettings(), tls=None, listeners=(), upstreams={}, routes=())
    runtime = Runtime(config=config, router=Router(()), pools={})
    reactor = MemoryReactorClock()
    site = ListenerFactory(lambda: runtime, Listener(name="l", endpoint="tcp:0", tls=False), reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
    protocol.makeConnection(transport)
    for _ in range(500):
        protocol.dataReceived(b"GET /wp-login.php HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 404 ") == 500
    processLog = [e for e in events if e.get("log_namespace", "").startswith("edgeproxy.http")]
    assert processLog == []
    assert summaries(events) == []
    reactor.advance(10)
    assert summaries(events) == ["refused 500 requests in the last 10s: 404 no route x 500"]
    assert refusals(reactor) is refusals(reactor)


def test_refusedHeadsLeaveNoProcessLogLineEach(events: list[dict]) -> None:
    """
    Heads the parser refuses (each on its connection, as a scanner sends
    them) are access-log lines; the process log has their summary alone.
    """
    config = Config(path="/e.ini", proxy=ProxySettings(), tls=None, listeners=(), upstreams={}, routes=())
    runtime = Runtime(config=config, router=Router(()), pools={})
    reactor = MemoryReactorClock()
    accessLog = AccessLog(reactor)
    lines: list[dict] = []
    accessLog.publisher.addObserver(lines.append)
    site = ListenerFactory(lambda: runtime, Listener(name="l", endpoint="tcp:0", tls=False), reactor, accessLog)
    for n in range(300):
        protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", n)))
        protocol.dataReceived([b"\x16\x03\x01\r\n", b"GET /%d HTTP/9.9\r\n" % n, b"GET / HTTP/1.1\r\nX\r\n\r\n"][n % 3])
    assert len(lines) == 300
    processLog = [e for e in events if e.get("log_namespace", "").startswith("edgeproxy.http")]
    assert processLog == []
    reactor.advance(10)
    assert summaries(events) == [
        "refused 300 requests in the last 10s: 400 malformed request x 200, 505 unsupported version x 100"
    ]


# Repeats ------------------------------------------------------------------


def shownLines(events: list[dict], level: LogLevel = LogLevel.info) -> list[str]:
    from twisted.logger import formatEvent

    return [f"{e['log_level'].name} {formatEvent(e)}" for e in events if e["log_level"] >= level]


def test_repeatsFirstInFullThenACount(events: list[dict]) -> None:
    """
    The first note of each kind in an interval is logged at its level, the
    others at debug; the interval ends with one count line, at the highest
    level counted; the next interval starts over.
    """
    clock = Clock()
    repeats = Repeats(clock, interval=10)
    log = Logger(namespace="edgeproxy.test")
    for n in range(500):
        repeats.emit(log, LogLevel.warn, "backend a failed", "backend a failed: {n}", n=n)
        repeats.emit(log, LogLevel.info, "not retried", "request {n} not retried", n=n)
    repeats.emit(log, LogLevel.warn, "backend b failed", "backend b failed once")
    assert shownLines(events) == [
        "warn backend a failed: 0",
        "info request 0 not retried",
        "warn backend b failed once",
    ]
    assert len(shownLines(events, LogLevel.debug)) == 1001
    clock.advance(10)
    assert shownLines(events)[3:] == [
        "warn repeated in the last 10s: backend a failed x 500; not retried x 500"
    ]
    repeats.emit(log, LogLevel.warn, "backend a failed", "backend a failed: {n}", n="again")
    assert shownLines(events)[4:] == ["warn backend a failed: again"]
    clock.advance(10)
    assert len(shownLines(events)) == 5  # one note: nothing to count


def test_repeatsOfDebugNotesAreCountedAtInfo(events: list[dict]) -> None:
    """Notes that are all debug (a client's doing) get their count at info, even one."""
    clock = Clock()
    repeats = Repeats(clock, interval=10)
    log = Logger(namespace="edgeproxy.test")
    repeats.emit(log, LogLevel.debug, "client error X", "client error X: detail")
    assert shownLines(events) == []
    clock.advance(10)
    assert shownLines(events) == ["info repeated in the last 10s: client error X x 1"]


def test_repeatsKindsAreBounded(events: list[dict]) -> None:
    """Kinds past the bound are debug lines counted as "other": the count line stays short."""
    clock = Clock()
    repeats = Repeats(clock, interval=1, maxKinds=2)
    log = Logger(namespace="edgeproxy.test")
    for n in range(100):
        repeats.emit(log, LogLevel.warn, f"kind {n}", "note {n}", n=n)
    assert shownLines(events) == ["warn note 0", "warn note 1"]
    repeats.flush()
    assert shownLines(events)[2:] == ["info repeated in the last 1s: other x 98"]


def test_configurationAcceptsWhatLogsKnows() -> None:
    """The [edgeproxy] keys accept exactly the levels and formats this module has."""
    from edgeproxy.config import parse
    from edgeproxy.logs import FORMATS, LEVELS

    assert parse._LOG_LEVELS == tuple(LEVELS)
    assert parse._LOG_FORMATS == FORMATS
