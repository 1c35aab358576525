"""
Tests for L{edgeproxy.accesslog}: the exact lines written for requests
driven through a real L{ListenerFactory} and L{HTTP1Connection} over a
memory transport, whose route forwards (the real forward stage) to an
in-memory pool the test answers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.accesslog import (
    AccessLog,
    LineWriter,
    escapeField,
    formatCombined,
    formatCombinedPlain,
    requestFields,
)
from edgeproxy.config.model import AccessLogFormat, ProxySettings, Route, Server, Upstream
from edgeproxy.errors import BackendUnavailable, ServiceUnavailable
from edgeproxy.h1 import Fields
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.testing import RecordingClient, makeRequest
from tests.memorypool import MemoryPool, MemoryResponse, ProxyClient, fixedIds
from tests.metricsutil import samplesOf

# 2026-11-27 19:05:01.250 UTC
NOW = 1795806301.25

UPSTREAM = Upstream(name="backend", servers=(Server("10.0.0.1", 8080),))
ROUTE = Route(name="app", hosts=("*",), paths=("/",), upstream="backend")


ID = "1" * 32
"""Every request's ID here (L{fixedIds})."""

EXTENDED = f" request_id={ID} route=app upstream=backend backend=10.0.0.1:8080 ttfb=0.125 duration=0.125 tls_version=- sni=-"
"""What the extended Combined format adds to a line of L{serve}'s."""


def connect(accessLog: AccessLog, clock: MemoryReactorClock, peer: Any = None) -> ProxyClient:
    return ProxyClient(
        pool=MemoryPool(UPSTREAM),
        routes=(ROUTE,),
        clock=clock,
        accessLog=accessLog,
        peer=peer or IPv4Address("TCP", "203.0.113.9", 54321),
        requestIds=fixedIds(),
    )


def answer(client: ProxyClient, requestBytes: bytes) -> None:
    """Send C{requestBytes}; the backend answers C{hello} 0.125 s later."""
    client.send(requestBytes)
    client.clock.advance(0.125)
    client.sent[-1].respond(MemoryResponse(200, [], b"hello", length=5))
    assert client.wire().endswith(b"hello")


def serve(
    requestBytes: bytes,
    fmt: AccessLogFormat = AccessLogFormat.COMBINED,
    peer: Any = None,
) -> str:
    clock = MemoryReactorClock()
    clock.advance(NOW - 0.125)
    out = io.StringIO()
    settings = ProxySettings(access_log="-", access_log_format=fmt)
    accessLog = AccessLog.fromSettings(settings, clock, stdout=out)
    assert accessLog is not None
    answer(connect(accessLog, clock, peer), requestBytes)
    return out.getvalue()


def test_combinedLine() -> None:
    line = serve(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example\r\n"
        b"Referer: https://ref.example/\r\nUser-Agent: curl/8.5.0\r\n\r\n"
    )
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET /a/b?c=d HTTP/1.1" '
        '200 5 "https://ref.example/" "curl/8.5.0"' + EXTENDED + "\n"
    )


def test_combinedPlainLine() -> None:
    """C{combined_plain}: the Combined Log Format, nothing after it."""
    line = serve(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example\r\n"
        b"Referer: https://ref.example/\r\nUser-Agent: curl/8.5.0\r\n\r\n",
        fmt=AccessLogFormat.COMBINED_PLAIN,
    )
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET /a/b?c=d HTTP/1.1" '
        '200 5 "https://ref.example/" "curl/8.5.0"\n'
    )


def test_combinedMissingHeadersAreDashes() -> None:
    line = serve(b"GET / HTTP/1.0\r\n\r\n")
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.0" 200 5 "-" "-"'
        + EXTENDED + "\n"
    )


def test_combinedEscapesQuotesAndBytesOutsideASCII() -> None:
    line = serve(
        b'GET /x HTTP/1.1\r\nHost: h\r\nUser-Agent: evil" 200 1 "\xc3\xa9\\\r\n\r\n'
    )
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET /x HTTP/1.1" 200 5 "-" '
        '"evil\\" 200 1 \\"\\xC3\\xA9\\\\"' + EXTENDED + "\n"
    )
    # Exactly one line, and the quoted fields cannot be split by the quote.
    assert line.count("\n") == 1


def test_combinedEscapesControlCharacters() -> None:
    """
    The HTTP/1.1 parser refuses control characters in field values; a
    request that carries them anyway (another protocol's, a stage's
    rewrite) is still logged on one line with each escaped.
    """
    request = makeRequest(
        path=b"/x",
        fields=Fields.trusted({b"host": [b"h"], b"user-agent": [b"\x01\x1b[31m\r\nX"]}),
    )
    call = Call(request, None, RecordingClient(), (), NOW - 1)
    call.status = 200
    event = dict(requestFields(call, NOW), finished=NOW)
    line = formatCombinedPlain(event)
    assert line.endswith('"GET /x HTTP/1.1" 200 - "-" "\\x01\\x1B[31m\\x0D\\x0AX"')
    assert "\n" not in line
    assert formatCombined(event).startswith(line + " request_id=- route=test ")


def test_ipv6Client() -> None:
    line = serve(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer=IPv6Address("TCP", "2001:db8::1", 5))
    assert line.startswith('2001:db8::1 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 5 ')


def test_unixClientIsDash() -> None:
    line = serve(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer=UNIXAddress(b"/tmp/s"))
    assert line.startswith('- - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 5 ')


def test_jsonLine() -> None:
    line = serve(
        b"GET /a?b=1 HTTP/1.1\r\nHost: www.example\r\nUser-Agent: ua\xc3\xa9\"x\r\n\r\n",
        fmt=AccessLogFormat.JSON,
    )
    assert line.endswith("\n") and line.count("\n") == 1
    assert line == (
        '{"time":"2026-11-27T19:05:01.250Z","client":"203.0.113.9","method":"GET",'
        '"target":"/a?b=1","protocol":"HTTP/1.1","status":200,"bytes":5,'
        '"referer":null,"user_agent":"ua\\u00e9\\"x","host":"www.example",'
        '"duration":0.125,"route":"app","upstream":"backend",'
        f'"request_id":"{ID}","backend":"10.0.0.1:8080","ttfb":0.125,'
        '"tls_version":null,"sni":null}\n'
    )
    assert json.loads(line)["user_agent"] == 'ua\u00e9"x'


def test_offIsNone() -> None:
    assert AccessLog.fromSettings(ProxySettings(access_log=None), MemoryReactorClock()) is None


def test_fileAndReopen(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = MemoryReactorClock()
    clock.advance(NOW - 0.125)
    accessLog = AccessLog.fromSettings(ProxySettings(access_log=str(path)), clock)
    assert accessLog is not None
    client = connect(accessLog, clock, IPv4Address("TCP", "127.0.0.1", 1))

    def one(target: bytes) -> None:
        peer = IPv4Address("TCP", "127.0.0.1", 1)
        client.connect(StringTransport(peerAddress=peer), peer)
        answer(client, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")

    one(b"/first")
    # logrotate moves the file away, then SIGHUP reopens the path.
    path.rename(tmp_path / "access.log.1")
    one(b"/second")
    accessLog.reopen()
    one(b"/third")
    accessLog.close()
    rotated = (tmp_path / "access.log.1").read_text()
    assert '"GET /first HTTP/1.1"' in rotated and '"GET /second HTTP/1.1"' in rotated
    assert path.read_text() == (
        '127.0.0.1 - - [27/Nov/2026:19:05:01 +0000] "GET /third HTTP/1.1" 200 5 "-" "-"'
        + EXTENDED + "\n"
    )


def test_escapeField() -> None:
    assert escapeField("plain /path?x=1") == "plain /path?x=1"
    assert escapeField('a"b\\c') == 'a\\"b\\\\c'
    assert escapeField(b"\r\n\t\x00\xff") == "\\x0D\\x0A\\x09\\x00\\xFF"
    assert escapeField("é") == "\\xC3\\xA9"


def test_formatCombinedNeverRaisesOnMissingValues() -> None:
    event = {
        "client": None, "method": None, "target": None, "protocol": None,
        "status": 400, "bytes": 0, "referer": None, "user_agent": None, "finished": 0.0,
    }
    assert formatCombined(event) == (
        '- - - [01/Jan/1970:00:00:00 +0000] "- - -" 400 - "-" "-" request_id=- route=- '
        "upstream=- backend=- ttfb=- duration=- tls_version=- sni=-"
    )
    assert formatCombinedPlain(event) == '- - - [01/Jan/1970:00:00:00 +0000] "- - -" 400 - "-" "-"'


def test_eventsReachOtherObservers() -> None:
    clock = MemoryReactorClock()
    clock.advance(NOW - 0.125)
    events: list[dict] = []
    accessLog = AccessLog(clock, LineWriter(formatCombined, stream=io.StringIO()))
    accessLog.publisher.addObserver(events.append)
    answer(connect(accessLog, clock, IPv4Address("TCP", "10.0.0.1", 1)), b"GET /e HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(events) == 1
    event = events[0]
    assert event["log_namespace"] == "edgeproxy.access"
    assert (event["client"], event["target"], event["status"], event["route"]) == (
        "10.0.0.1", "/e", 200, "app",
    )


def test_routeAndUpstreamOfTheCall() -> None:
    """
    The route the request was routed to and the upstream it was forwarded
    to are logged; a request refused before routing has neither, and its
    duration still counts from the end of its head.
    """
    clock = MemoryReactorClock()
    clock.advance(NOW - 0.125)
    out = io.StringIO()
    accessLog = AccessLog.fromSettings(
        ProxySettings(access_log="-", access_log_format=AccessLogFormat.JSON), clock, stdout=out
    )
    assert accessLog is not None
    client = ProxyClient(
        pool=MemoryPool(Upstream(name="pool1", servers=(Server("10.0.0.1", 8080),))),
        routes=(Route(name="r1", hosts=("h",), paths=("/",), upstream="pool1"),),
        clock=clock,
        accessLog=accessLog,
    )
    answer(client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.send(b"GET / HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
    routed, refused = (json.loads(line) for line in out.getvalue().splitlines())
    assert (routed["route"], routed["upstream"], routed["duration"]) == ("r1", "pool1", 0.125)
    assert (refused["status"], refused["route"], refused["upstream"], refused["duration"]) == (404, None, None, 0.0)
    assert (refused["backend"], refused["ttfb"]) == (None, None)
    assert routed["backend"] == "10.0.0.1:8080"


def test_eventIsWhatLoggerInfoWouldEmit() -> None:
    """
    The access event, built without Logger.emit, has exactly the keys,
    values and order Logger.info would have given it, and renders the same.
    """
    from twisted.logger import Logger, formatEvent

    clock = MemoryReactorClock()
    clock.advance(NOW - 0.125)
    events: list[dict] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    answer(
        connect(accessLog, clock, IPv4Address("TCP", "10.0.0.1", 1)),
        b"GET /e?x HTTP/1.1\r\nHost: h\r\nUser-Agent: a\r\nReferer: r\r\n\r\n",
    )
    [event] = events

    reference: list[dict] = []
    logger = Logger(namespace=AccessLog.namespace, observer=reference.append)
    fields = {key: value for key, value in event.items() if not key.startswith("log_") and key != "finished"}
    logger.info(
        '{client} "{method} {target} {protocol}" {status} {bytes}',
        finished=event["finished"],
        **fields,
    )
    [expected] = reference
    assert list(event) == list(expected)
    for key in expected:
        if key not in ("log_time", "log_logger"):
            assert event[key] == expected[key], key
    assert event["log_logger"].namespace == expected["log_logger"].namespace
    assert formatEvent(event) == formatEvent(expected) == '10.0.0.1 "GET /e?x HTTP/1.1" 200 5'
    assert (event["user_agent"], event["referer"], event["host"]) == ("a", "r", "h")


def serveWith(
    respond: Any, requestBytes: bytes = b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n"
) -> tuple[dict[str, Any], str, ProxyClient]:
    """
    Send C{requestBytes} and let C{respond(client)} answer it; the JSON
    record and the extended Combined line of the one access event, and the
    client.
    """
    clock = MemoryReactorClock()
    clock.advance(NOW - 0.5)
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    client = connect(accessLog, clock)
    client.send(requestBytes)
    respond(client)
    [event] = events
    from edgeproxy.accesslog import formatJSON

    return json.loads(formatJSON(event)), formatCombined(event), client


def test_ttfbIsTheBackendsHeadDurationTheWhole() -> None:
    """
    C{ttfb} is the time to the backend's response head, C{duration} the
    time to the end of the response: a slow body tells them apart.
    """

    def respond(client: ProxyClient) -> None:
        client.clock.advance(0.1)
        response = client.sent[-1].respond(MemoryResponse(200, [], b"a", complete=False))
        client.clock.advance(0.4)
        response.write(b"b")
        response.end()

    record, line, _ = serveWith(respond)
    assert (record["ttfb"], record["duration"]) == (0.1, 0.5)
    assert " ttfb=0.100 duration=0.500 " in line


def test_backendIsLoggedAndNeverOnTheWire() -> None:
    """
    The backend's address is logged when one answered, and when the one
    tried failed (the pool names it on the failure); a failure no backend
    had a part in (503, no server available) leaves it C{-}, as a request
    that was not routed does; the client sees the address in no case (only
    the log has it).
    """

    def answered(client: ProxyClient) -> None:
        client.sent[-1].respond(
            MemoryResponse(200, [(b"Content-Type", b"text/plain")], b"ok", length=2, backend="10.9.8.7:8443")
        )

    record, line, client = serveWith(answered)
    assert record["backend"] == "10.9.8.7:8443" and " backend=10.9.8.7:8443 " in line
    assert b"10.9.8.7" not in client.wire() and b"8443" not in client.wire()

    def failed(client: ProxyClient) -> None:
        error = BackendUnavailable("connect to 10.9.8.7:8443 refused")
        error.backend = "10.9.8.7:8443"
        client.sent[-1].fail(error)

    record, line, client = serveWith(failed)
    assert (record["status"], record["backend"], record["ttfb"]) == (502, "10.9.8.7:8443", None)
    assert " upstream=backend backend=10.9.8.7:8443 ttfb=- " in line
    assert b"10.9.8.7" not in client.wire() and b"8443" not in client.wire()

    def unavailable(client: ProxyClient) -> None:
        client.sent[-1].fail(ServiceUnavailable("upstream backend: no server available"))

    record, line, client = serveWith(unavailable)
    assert (record["status"], record["backend"]) == (503, None)
    assert " upstream=backend backend=- ttfb=- " in line


@pytest.mark.parametrize("failure", ["refused", "timeout"])
def test_failedBackendIsTheLastOneTried(failure: str) -> None:
    """
    Through the real pool: a 502 on a refused connection and a 504 after
    C{response_timeout} name the backend that was tried (the slow or broken
    case is the one an operator looks for); C{ttfb} stays C{-}, as no
    response head came.
    """
    from twisted.internet.error import ConnectionRefusedError

    from tests.test_pool import MemoryEndpoint
    from tests.test_pool import MemoryPool as RealPool

    clock = MemoryReactorClock()
    clock.advance(NOW)
    upstream = Upstream(name="backend", servers=(Server("10.0.0.1", 8080),), response_timeout=5.0)
    pool = RealPool(clock, upstream, None)
    pool.endpoint = MemoryEndpoint(ConnectionRefusedError() if failure == "refused" else None)
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    client = ProxyClient(pool=pool, routes=(ROUTE,), clock=clock, accessLog=accessLog)  # type: ignore[arg-type]
    client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(5)
    status = 502 if failure == "refused" else 504
    assert client.wire().startswith(b"HTTP/1.1 %d " % status)
    assert b"10.0.0.1" not in client.wire() and b"8080" not in client.wire()
    [event] = events
    assert (event["status"], event["backend"], event["ttfb"]) == (status, "10.0.0.1:8080", None)
    assert " upstream=backend backend=10.0.0.1:8080 ttfb=- " in formatCombined(event)


def test_requestIdIsTheOneSentAndReturned() -> None:
    """
    The access log's request ID is the one the backend was sent and the
    client got back (the runtime's own, random, IDs).
    """
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    client = ProxyClient(pool=MemoryPool(UPSTREAM), routes=(ROUTE,), clock=clock, accessLog=accessLog)
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: forged\r\n\r\n")
        client.sent[-1].respond(MemoryResponse(200, [], b"ok", length=2))
    first, second = (event["request_id"] for event in events)
    assert first != second and len(first) == len(second) == 32
    sent = [exchange.fields.getAll(b"x-request-id") for exchange in client.sent]
    assert sent == [[first.encode()], [second.encode()]]
    wire = client.wire()
    assert wire.count(b"\r\nX-Request-ID: ") == 2
    assert b"X-Request-ID: " + first.encode() + b"\r\n" in wire
    assert b"X-Request-ID: " + second.encode() + b"\r\n" in wire
    assert b"forged" not in wire


def test_tlsVersionAndServerName() -> None:
    request = makeRequest(path=b"/t", serverName=b"app.example.com")
    call = Call(request._replace(requestId=b"abc"), None, RecordingClient(), (), NOW - 1)
    call.status = 200
    event = dict(requestFields(call, NOW), finished=NOW)
    assert (event["tls_version"], event["sni"], event["request_id"]) == ("1.3", "app.example.com", "abc")
    assert formatCombined(event).endswith(
        ' request_id=abc route=test upstream=- backend=- ttfb=- duration=1.000 '
        "tls_version=1.3 sni=app.example.com"
    )


def test_refusedLineEndsWithItsRule() -> None:
    """
    The rule of a refused request comes last, after the extended pairs,
    quoted (it holds spaces); the pairs never do.
    """
    request = makeRequest(path=b"/admin", serverName=b"we ird\"name")
    call = Call(request, None, RecordingClient(), (), NOW)
    call.status = 403
    call.refusedBy = "deny 10.0.0.0/8"
    event = dict(requestFields(call, NOW), finished=NOW)
    line = formatCombined(event)
    assert line.endswith(' tls_version=1.3 sni=we\\x20ird\\"name rule="deny 10.0.0.0/8"')
    # Everything after the user agent is "key=value" separated by spaces.
    pairs = line.split('"-" "-" ', 1)[1].rsplit(" rule=", 1)[0].split(" ")
    assert [pair.split("=", 1)[0] for pair in pairs] == [
        "request_id", "route", "upstream", "backend", "ttfb", "duration", "tls_version", "sni",
    ]


# Heads refused by the parser ----------------------------------------------

REFUSED_HEADS = [
    # (id, bytes, status, the access log's request line)
    ("bad-field", b"GET /a HTTP/1.1\r\nHost: h\r\nX A: 1\r\n\r\n", 400, "GET /a HTTP/1.1"),
    ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\nmore", 400,
     "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xFC\\x03\\x03 - -"),
    ("long-line", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n", 414, "GET /" + "a" * 1019 + " -"),
    ("many-fields", b"GET /f HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n", 431, "GET /f HTTP/1.1"),
    ("te-gzip", b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "POST /t HTTP/1.1"),
    ("http-2.0", b"GET /v HTTP/2.0\r\nHost: h\r\n\r\n", 505, "GET /v HTTP/2.0"),
]


@pytest.mark.parametrize(
    "raw,status,line", [case[1:] for case in REFUSED_HEADS], ids=[case[0] for case in REFUSED_HEADS]
)
def test_refusedHeadIsOneLineAndOneRequest(raw: bytes, status: int, line: str) -> None:
    """
    A head the parser refuses is a request like any other in the access log
    (its line as far as it was read, bounded) and in C{edgeproxy_requests};
    its answer carries the ID the line has, and is not to be stored.
    """
    clock = MemoryReactorClock()
    clock.advance(NOW)
    out = io.StringIO()
    accessLog = AccessLog(clock, LineWriter(formatCombined, stream=out))
    metrics = Metrics()
    client = ProxyClient(
        pool=MemoryPool(UPSTREAM), routes=(ROUTE,), clock=clock, accessLog=accessLog, metrics=metrics,
        peer=IPv4Address("TCP", "203.0.113.9", 54321),
    )
    client.send(raw)
    wire = client.wire()
    head, _, body = wire.partition(b"\r\n\r\n")
    fields = dict(field.split(b": ", 1) for field in head.split(b"\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 %d " % status) and client.transport.disconnecting
    assert fields[b"Cache-Control"] == b"no-store"
    requestId = fields[b"X-Request-ID"].decode()
    assert len(requestId) == 32
    [logged] = out.getvalue().splitlines()
    assert logged == (
        f'203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "{line}" {status} {len(body)} "-" "-" '
        f"request_id={requestId} route=- upstream=- backend=- ttfb=- duration=0.000 tls_version=- sni=-"
    )
    samples = samplesOf(metrics.exposition())
    code = "5xx" if status >= 500 else "4xx"
    assert samples[("edgeproxy_requests_total", (("code", code), ("route", ""), ("upstream", "")))] == 1


def test_refusedHeadLineInJSON() -> None:
    """JSON keeps what the line had; what was never read is null."""
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    client = connect(accessLog, clock)
    client.send(b"\x16\x03\x01\x02\x00\r\n")
    [event] = events
    from edgeproxy.accesslog import formatJSON

    record = json.loads(formatJSON(event))
    assert (record["method"], record["target"], record["protocol"]) == ("\x16\x03\x01\x02\x00", None, None)
    assert (record["status"], record["request_id"], record["route"]) == (400, ID, None)


def test_headDeadlineIsOneLineOnceAByteCame() -> None:
    """
    408: a head begun and not finished in time is a request refused; a
    connection that sent nothing made no request, and has no line (browsers
    open connections ahead of need).
    """
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    slow = connect(accessLog, clock)
    slow.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
    silent = connect(accessLog, clock)
    clock.advance(10)
    assert slow.wire().startswith(b"HTTP/1.1 408 ") and silent.wire().startswith(b"HTTP/1.1 408 ")
    assert b"X-Request-ID: " + ID.encode() in slow.wire()
    assert b"X-Request-ID" not in silent.wire()
    [event] = events
    assert (event["status"], event["method"], event["target"], event["protocol"]) == (408, "GET", "/slow", "HTTP/1.1")


def test_bodyFramingRefusedIsTheRequestsOwnLine() -> None:
    """
    A bad chunked body refuses a request already routed: one line, the
    route's, with the ID the 400 carries.
    """
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    client = connect(accessLog, clock)
    client.send(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert client.wire().startswith(b"HTTP/1.1 400 ")
    assert b"\r\nX-Request-ID: " + ID.encode() + b"\r\n" in client.wire()
    [event] = events
    assert (event["status"], event["route"], event["target"], event["request_id"]) == (400, "app", "/c", ID)
