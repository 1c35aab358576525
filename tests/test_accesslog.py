"""
Tests for L{edgeproxy.accesslog}: the exact lines written for requests
driven through a real L{twisted.web.server.Site} over a memory transport.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from edgeproxy.accesslog import AccessLog, LineWriter, escapeField, formatCombined
from edgeproxy.config.model import AccessLogFormat, ProxySettings

# 2026-11-27 19:05:01.250 UTC
NOW = 1795806301.25


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.edgeRoute = "app"
        request.edgeUpstream = "backend"
        request.edgeStarted = NOW - 0.125
        return b"hello"


class LoggingSite(Site):
    """The Site hook EdgeSite uses: one AccessLog.log per finished request."""

    def __init__(self, accessLog: AccessLog, reactor: MemoryReactorClock) -> None:
        super().__init__(Hello(), reactor=reactor)
        self.accessLog = accessLog

    def log(self, request) -> None:
        self.accessLog.log(request)


def serve(
    requestBytes: bytes,
    fmt: AccessLogFormat = AccessLogFormat.COMBINED,
    peer=None,
) -> str:
    clock = MemoryReactorClock()
    clock.advance(NOW)
    out = io.StringIO()
    settings = ProxySettings(access_log="-", access_log_format=fmt)
    accessLog = AccessLog.fromSettings(settings, clock, stdout=out)
    assert accessLog is not None
    site = LoggingSite(accessLog, clock)
    channel = site.buildProtocol(None)
    transport = StringTransport(
        peerAddress=peer or IPv4Address("TCP", "203.0.113.9", 54321)
    )
    channel.makeConnection(transport)
    channel.dataReceived(requestBytes)
    assert b"hello" in transport.value()
    return out.getvalue()


def test_combinedLine() -> None:
    line = serve(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example\r\n"
        b"Referer: https://ref.example/\r\nUser-Agent: curl/8.5.0\r\n\r\n"
    )
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET /a/b?c=d HTTP/1.1" '
        '200 5 "https://ref.example/" "curl/8.5.0"\n'
    )


def test_combinedMissingHeadersAreDashes() -> None:
    line = serve(b"GET / HTTP/1.0\r\n\r\n")
    assert line == '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.0" 200 5 "-" "-"\n'


def test_combinedEscapesQuotesAndControlCharacters() -> None:
    line = serve(
        b'GET /x HTTP/1.1\r\nHost: h\r\nUser-Agent: evil" 200 1 "\x01\x1b[31m\xc3\xa9\\\r\n\r\n'
    )
    assert line == (
        '203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET /x HTTP/1.1" 200 5 "-" '
        '"evil\\" 200 1 \\"\\x01\\x1B[31m\\xC3\\xA9\\\\"\n'
    )
    # Exactly one line, and the quoted fields cannot be split by the quote.
    assert line.count("\n") == 1


def test_ipv6Client() -> None:
    line = serve(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer=IPv6Address("TCP", "2001:db8::1", 5))
    assert line.startswith('2001:db8::1 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 5 ')


def test_unixClientIsDash() -> None:
    line = serve(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer=UNIXAddress(b"/tmp/s"))
    assert line.startswith('- - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 5 ')


def test_jsonLine() -> None:
    line = serve(
        b"GET /a?b=1 HTTP/1.1\r\nHost: www.example\r\nUser-Agent: ua\x7f\"x\r\n\r\n",
        fmt=AccessLogFormat.JSON,
    )
    assert line.endswith("\n") and line.count("\n") == 1
    assert line == (
        '{"time":"2026-11-27T19:05:01.250Z","client":"203.0.113.9","method":"GET",'
        '"target":"/a?b=1","protocol":"HTTP/1.1","status":200,"bytes":5,'
        '"referer":null,"user_agent":"ua\\u007f\\"x","host":"www.example",'
        '"duration":0.125,"route":"app","upstream":"backend"}\n'
    )
    assert json.loads(line)["user_agent"] == 'ua\x7f"x'


def test_offIsNone() -> None:
    assert AccessLog.fromSettings(ProxySettings(access_log=None), MemoryReactorClock()) is None


def test_fileAndReopen(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = MemoryReactorClock()
    clock.advance(NOW)
    accessLog = AccessLog.fromSettings(ProxySettings(access_log=str(path)), clock)
    assert accessLog is not None
    site = LoggingSite(accessLog, clock)

    def one(target: bytes) -> None:
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
        channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")

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
        '127.0.0.1 - - [27/Nov/2026:19:05:01 +0000] "GET /third HTTP/1.1" 200 5 "-" "-"\n'
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
    assert formatCombined(event) == '- - - [01/Jan/1970:00:00:00 +0000] "- - -" 400 - "-" "-"'


def test_eventsReachOtherObservers() -> None:
    clock = MemoryReactorClock()
    clock.advance(NOW)
    events: list[dict] = []
    accessLog = AccessLog(clock, LineWriter(formatCombined, stream=io.StringIO()))
    accessLog.publisher.addObserver(events.append)
    site = LoggingSite(accessLog, clock)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1)))
    channel.dataReceived(b"GET /e HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(events) == 1
    event = events[0]
    assert event["log_namespace"] == "edgeproxy.access"
    assert (event["client"], event["target"], event["status"], event["route"]) == (
        "10.0.0.1", "/e", 200, "app",
    )


def test_proxyRequestAttributes() -> None:
    """ProxyRequest keeps its Route as C{route} and the pool as C{upstreamName}."""
    from edgeproxy.config.model import Route

    class Proxied(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.route = Route(name="r1", hosts=("*",), paths=("/",), upstream="pool1")
            request.upstreamName = "pool1"
            return b"hello"

    clock = MemoryReactorClock()
    clock.advance(NOW)
    out = io.StringIO()
    accessLog = AccessLog.fromSettings(
        ProxySettings(access_log="-", access_log_format=AccessLogFormat.JSON), clock, stdout=out
    )
    site = LoggingSite(accessLog, clock)
    site.resource = Proxied()
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1)))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    record = json.loads(out.getvalue())
    assert (record["route"], record["upstream"], record["duration"]) == ("r1", "pool1", None)


def test_eventIsWhatLoggerInfoWouldEmit() -> None:
    """
    The access event, built without Logger.emit, has exactly the keys,
    values and order Logger.info would have given it, and renders the same.
    """
    from twisted.logger import Logger, formatEvent

    clock = MemoryReactorClock()
    clock.advance(NOW)
    events: list[dict] = []
    accessLog = AccessLog(clock)
    accessLog.publisher.addObserver(events.append)
    site = LoggingSite(accessLog, clock)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1)))
    channel.dataReceived(b"GET /e?x HTTP/1.1\r\nHost: h\r\nUser-Agent: a\r\nReferer: r\r\n\r\n")
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
