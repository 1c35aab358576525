# -*- test-case-name: tests.test_request -*-
"""
L{ProxyRequest}: one client request, proxied while it streams.

Twisted's C{Request} collects the whole body before C{process()}; a proxy
must not.  This subclass starts the upstream request as soon as the head is
complete (see L{ProxyRequest._headComplete} for how that moment is found for
HTTP/1.1 and HTTP/2), feeds body chunks into a L{BodyPipe} as they arrive,
and relays the response through a L{ResponseRelay}.  Nothing is kept in
C{request.content} (it stays an empty C{BytesIO}).

Decisions documented here because a user can see them:

  - An error decided from the head (400 bad target, 404 no route, 421
    misdirected, 413 declared body too large) is answered without ever
    contacting a backend.  When no body follows it is answered normally
    (the connection stays open unless the status says otherwise); when a
    body is pending it is answered at once, before any C{100 Continue}, and
    then HTTP/1.1 closes the connection (the rest of the body is never
    read) while HTTP/2 discards the rest of the stream and ends it.
  - A body that grows past the limit while streaming is cut: the upstream
    request is aborted (the backend never sees a complete-looking short
    body) and the client gets a 413 and a closed connection if its
    response had not started, else an aborted connection / reset stream.
  - A backend failure before the client finished sending (dead backend,
    connect timeout) is answered at once the same way; the client does not
    have to upload everything to learn the backend is down.
  - A backend I{response} that arrives complete before the client finished
    sending (Twisted's Agent only hands over a response early when it is
    complete) is held until the client's body is complete, and the rest of
    the body is drained and discarded.  Writing it earlier is not possible
    on HTTP/1.1 without closing: the channel would parse the remaining body
    bytes as the next request.
  - C{Expect: 100-continue} is answered by Twisted itself as soon as the
    head is accepted, not by the backend (known limitation); it is never
    sent after an error response decided from the head.
"""

from __future__ import annotations

import ipaddress
from io import BytesIO
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.components import Componentized
from twisted.web import server
from twisted.web.http import NO_BODY_CODES, HTTPChannel, parse_qs, toChunk
from twisted.web.http import Request as _HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, INonQueuedRequestFactory, IResponse
from zope.interface import provider

from edgeproxy.config.model import Route, Upstream
from edgeproxy.h1 import Fields
from edgeproxy.errors import (
    ContentTooLarge,
    MisdirectedRequest,
    NoRoute,
    ProxyError,
    UpstreamProtocolError,
)
from edgeproxy.http.bodies import BodyPipe, ClientReader, ResponseRelay, abortClient
from edgeproxy.http.channel import requestLineOf
from edgeproxy.http.errorpages import errorBody, httpDate, isHTTP2, phraseFor, writeError
from edgeproxy.http.headers import (
    canonicalName,
    headersFrom,
    rawFields,
    responseHeadersForClient,
    upstreamRequestHeaders,
)
from edgeproxy.http.paths import normaliseTarget
from edgeproxy.http.tunnel import isWebSocketUpgrade, startTunnel
from edgeproxy.routing import normaliseHost
from edgeproxy.upstream.balance import requestHashKey

log = Logger()

_VIA_PROTOCOLS = {b"HTTP/1.0": b"1.0", b"HTTP/1.1": b"1.1", b"HTTP/2": b"2"}


def serverNameOf(request: Any) -> bytes | None:
    """
    The SNI name the client sent on this request's TLS connection, lower
    case, or L{None} (plain connection, or no SNI).
    """
    channel = getattr(request, "channel", None)
    if channel is None:
        return None
    transport = channel._conn.transport if isHTTP2(request) else channel.transport
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return None
    try:
        name = getHandle().get_servername()
    except Exception:
        return None
    return name.lower() if name else None


def stripPrefix(path: bytes, prefix: str) -> bytes:
    """
    Remove the matched route prefix from C{path}, keeping it absolute:
    C{/api/x} under C{/api} gives C{/x}, C{/api} itself gives C{/}.
    """
    rest = path[len(prefix.encode("ascii").rstrip(b"/")) :]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


@provider(INonQueuedRequestFactory)
class ProxyRequest(server.Request):
    """
    A request proxied to the upstream its route names, body and response
    streamed.

    @ivar route: the L{Route} this request was matched to, once routed.
    @ivar upstreamName: the upstream's name, once routed (for the access log).
    """

    defaultContentType = None

    # Identity, as Twisted's Request.__eq__/__hash__ define it, without a
    # Python call for each set operation (site.inflight) and for the
    # channel's requestDone check.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    route: Route | None = None
    upstreamName: str | None = None
    _pipe: BodyPipe | None = None
    _upstream: Any = None
    """The request to the upstream in progress: what L{UpstreamPool.send}
    returned (or the Deferred of a pool that only has C{request}), until
    its outcome arrives."""
    _response: IResponse | None = None
    _pendingError: ProxyError | None = None
    _answered = False
    _bodyDone = False
    _processing = False
    _tunnelled = False
    _gotLength = False
    _cookiesParsed = False
    _started = False
    _declaredLength: int | None = None
    _maxBody = 0
    _earlyPage: tuple[Headers, bytes] | None = None
    _upstreamSettings: Upstream | None = None
    _lost = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(channel, *args, **kwargs)
        else:
            # What server.Request.__init__ does when parsePOSTFormSubmission
            # is given (the HTTP/1.1 channel calls the factory with the
            # channel alone, see the INonQueuedRequestFactory declaration),
            # without its argument handling.
            _HTTPRequest.__init__(self, channel, parsePOSTFormSubmission=False)
            Componentized.__init__(self)
        # isinstance first: isHTTP2's hasattr raises and catches an
        # AttributeError on every HTTP/1.1 channel.
        self._http1 = isinstance(channel, HTTPChannel) or not isHTTP2(self)
        """Whether this request came on an HTTP/1.x channel (else an HTTP/2
        stream)."""
        site = getattr(channel, "site", None)
        self.site = site
        self.edgeStarted = _clockOf(site).seconds() if site is not None else None
        """When the request arrived (for the access log's duration)."""
        inflight = getattr(site, "inflight", None)
        if inflight is not None:
            # Left in _cleanup (finished) or connectionLost (client gone).
            inflight.add(self)
        # The client going away is handled in connectionLost, not through a
        # notifyFinish() Deferred: one Deferred and two callbacks less per
        # request on the hot path.

    # Hooks the channel (HTTP/1.1) or stream (HTTP/2) calls ---------------

    def gotLength(self, length: int | None) -> None:
        if self._gotLength:
            return
        self._gotLength = True
        # The body is streamed, never stored: keep Twisted's content file
        # an empty one so requestReceived has something to seek.  What
        # twisted.web.server.Request.gotLength(0) makes, without the
        # AttributeError it raises and catches when the site has no
        # getContentFile (ours has none: an exception per request).
        getContentFile = getattr(self.site, "getContentFile", None)
        self.content = BytesIO() if getContentFile is None else getContentFile(0)
        self._declaredLength = length
        self._maybeHeadComplete()

    def parseCookies(self) -> None:
        if rawFields(self.requestHeaders).get(b"Cookie"):
            # Twisted fills received_cookies; without a Cookie field it
            # does nothing but look for one.
            super().parseCookies()
        self._cookiesParsed = True
        self._maybeHeadComplete()

    def handleContentChunk(self, data: bytes) -> None:
        pipe = self._pipe
        if pipe is None:
            return
        pipe.write(data)
        if self._maxBody and pipe.received > self._maxBody and not self._answered:
            self._bodyTooLarge()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._bodyDone = True
        if self._pipe is not None:
            self._pipe.finish()
        if self.finished or self._disconnected or self._tunnelled:
            return
        # What Twisted's Request.requestReceived does for a request whose
        # body was never stored (content stays empty, so there is no form
        # to parse whatever the Content-Type): the request line and the
        # query arguments, then process().
        self.content.seek(0, 0)
        self.method, self.uri = command, path
        self.clientproto = version
        target, question, query = path.partition(b"?")
        self.path = target
        self.args = parse_qs(query, 1) if question else {}
        self.process()

    def process(self) -> None:
        self._processing = True
        if self._answered:
            # Answered from the head or on an early upstream failure; over
            # HTTP/2 the stream stayed open to drain the body, end it now.
            if not self.finished and not self._disconnected and isHTTP2(self):
                self._writeEarlyHTTP2()
                if not self.finished:
                    self.finish()
            return
        if self._pendingError is not None:
            writeError(self, self._pendingError)
            return
        if self._response is not None:
            self._respond(self._response)
        # else: _upstreamResponded / _upstreamFailed will answer (a failure
        # before this point was answered at once by _answerEarly).

    def write(self, data: bytes) -> None:
        """
        The response's first write, on an HTTP/1.1 channel: the status
        line, the fields and C{data} serialised together and handed to the
        transport in one write, where Twisted's C{Request.write} makes a
        list for C{writeHeaders}, a C{writeSequence} of it, then one more
        write for the data (and over TLS, one more record).  The decisions
        are Twisted's: chunked when there is no C{Content-Length} (HTTP/1.1,
        not C{HEAD}, a status with a body), nothing after the head for
        C{HEAD} and the statuses without a body.  Every other write, and
        any request using what this does not (Last-Modified, ETag and
        cookies set on the request, a default Content-Type, encoders), is
        Twisted's.
        """
        if (
            self.startedWriting
            or self.finished
            or self._disconnected
            or not self._http1
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
            or self.defaultContentType is not None
            or self._encoder is not None
            or self._inFakeHead
            or not isinstance(self.channel, HTTPChannel)
        ):
            super().write(data)
            return
        self.startedWriting = 1
        version = self.clientproto
        code = self.code
        fields = rawFields(self.responseHeaders)
        withBody = self.method != b"HEAD" and code not in NO_BODY_CODES
        if version == b"HTTP/1.1" and withBody and not fields.get(b"Content-Length"):
            fields[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        parts = [version, b" %d " % (code,), self.code_message, b"\r\n"]
        for name, values in fields.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if not withBody:
            # As Twisted: nothing is written after the head.
            self.write = _noWrite  # type: ignore[method-assign]
        elif data:
            self.sentLength += len(data)
            if self.chunked:
                parts += toChunk(data)
            else:
                parts.append(data)
        self.channel.write(b"".join(parts))

    # The head is complete ------------------------------------------------

    def _maybeHeadComplete(self) -> None:
        # HTTP/1.1 (EdgeHTTPChannel.allHeadersReceived) calls parseCookies
        # then gotLength; HTTP/2 (H2Stream._convertHeaders) calls gotLength,
        # possibly while still adding header fields, then parseCookies once
        # every field is in.  The head is complete when both have happened.
        if self._started or not (self._gotLength and self._cookiesParsed):
            return
        self._started = True
        try:
            self._headComplete()
        except ProxyError as error:
            self._answerFromHead(error)
        except Exception:
            log.failure("proxying a request failed")
            internal = ProxyError("internal error")
            internal.status = 500
            self._answerFromHead(internal)

    def _headComplete(self) -> None:
        method, target, version = requestLineOf(self.channel)
        # Twisted only sets these in requestReceived, after the body; a
        # response can be written before that (errors), and http.Request
        # uses them for the status line and HEAD handling.
        self.method = method
        self.uri = target
        self.clientproto = version
        self.path = target.partition(b"?")[0]

        path, query = normaliseTarget(target)
        runtime = self.site.currentRuntime()
        hostValues = rawFields(self.requestHeaders).get(b"Host") or [b""]
        match = runtime.router.match(hostValues[0], path)
        if match is None:
            host = normaliseHost(hostValues[0])
            if self.isSecure():
                sni = serverNameOf(self)
                if sni is not None and normaliseHost(sni) != host:
                    # RFC 9110 §15.5.20: this connection's certificate was
                    # chosen for another name; the client may retry on a
                    # connection of its own for this Host.
                    raise MisdirectedRequest(f"no route for host {host!r} (SNI {sni!r})")
            raise NoRoute(f"no route for host {host!r} path {path!r}")
        route = match.route
        self.route = route
        self.upstreamName = route.upstream
        listenerLimits = self.site.listener.limits
        self._maxBody = (
            route.max_body_size
            if route.max_body_size is not None
            else listenerLimits.max_body_size
        )
        if (
            self._maxBody
            and self._declaredLength is not None
            and self._declaredLength > self._maxBody
        ):
            raise ContentTooLarge(
                f"declared body {self._declaredLength} over limit {self._maxBody}"
            )

        upstreamPath = stripPrefix(path, match.prefix) if route.strip_prefix else path
        # normaliseTarget keeps the "?" on a query (an empty one too).
        upstreamPath += query
        pool = runtime.pools[route.upstream]
        upstream = pool.upstream
        self._upstreamSettings = upstream
        config = runtime.config
        peer = self.getClientAddress()
        peerHost = getattr(peer, "host", "")
        upgrade = (
            self._websocketUpgrade(method, version, route)
            if rawFields(self.requestHeaders).get(b"Upgrade")
            else None
        )
        headers = upstreamRequestHeaders(
            self.requestHeaders,
            peer=peerHost,
            trustedPeer=_isTrusted(peerHost, config.proxy.trusted_proxies),
            scheme=b"https" if self.isSecure() else b"http",
            host=hostValues[0],
            via=None if config.proxy.via is None else _encoded(config.proxy.via, "ascii"),
            upgrade=upgrade,
            hostOverride=(
                None
                if upstream.host_header is None
                else _encoded(upstream.host_header, "idna")
            ),
            receivedProtocol=_VIA_PROTOCOLS.get(version, b"1.1"),
        )
        hashKey = None
        if upstream.balance == "hash":
            # The client's own fields, before they were rewritten for the
            # backend, and the path as routed (before strip_prefix).
            hashKey = requestHashKey(
                upstream.hash_key, peerHost, _poolFields(self.requestHeaders), path
            )
        if upgrade is not None:
            self._tunnelled = True
            startTunnel(self, pool, headers, upstreamPath, hashKey=hashKey)
            return

        body: BodyPipe | None = None
        if self._declaredLength != 0:
            body = BodyPipe(
                self._declaredLength,
                ClientReader(self),
                _clockOf(self.site),
                upstream.idle_timeout,
                self._uploadIdle,
            )
            self._pipe = body
        send = getattr(pool, "send", None)
        if send is None:
            # A pool with only the Deferred interface.
            self._upstream = pool.request(method, upstreamPath, headers, body, hashKey=hashKey)
            self._upstream.addCallbacks(self._upstreamResponded, self._upstreamFailed)
            return
        # The outcome comes straight to upstreamResponded / upstreamFailed,
        # without a Deferred and its callbacks per request; possibly before
        # send returns (no backend available), hence the marker.
        self._upstream = _SENDING
        exchange = send(method, upstreamPath, _poolFields(headers), body, self, hashKey)
        if self._upstream is _SENDING:
            self._upstream = exchange

    def _websocketUpgrade(
        self, method: bytes, version: bytes, route: Route
    ) -> bytes | None:
        # RFC 9110 §7.8: Upgrade is ignored on HTTP/1.0, and HTTP/2 has no
        # Upgrade (RFC 9113 §8.6); a request with a body or without
        # "Connection: upgrade" is no handshake, and tunnelling it would send
        # its body to the backend as WebSocket frames.
        if (
            not route.websocket
            or not rawFields(self.requestHeaders).get(b"Upgrade")
            or version != b"HTTP/1.1"
            or isHTTP2(self)
            or not isWebSocketUpgrade(method, self.requestHeaders)
        ):
            return None
        return b"websocket"

    # Upstream outcomes ---------------------------------------------------

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        """An interim response: not forwarded by this request (L{UpstreamReceiver})."""

    def upstreamResponded(self, response: Any) -> None:
        """The response head arrived (L{UpstreamReceiver})."""
        self._upstreamResponded(_PoolResponse(response))

    def upstreamFailed(self, failure: Failure) -> None:
        """The upstream request failed (L{UpstreamReceiver})."""
        self._upstreamFailed(failure)

    def _upstreamResponded(self, response: IResponse) -> None:
        self._upstream = None
        if self.finished or self._disconnected or self._answered:
            _discard(response)
            return
        if self._processing:
            self._respond(response)
        else:
            # Complete response before the client's body is: see the module
            # docstring; answered from process().
            self._response = response
            if self._pipe is not None:
                self._pipe.stopProducing()

    def _upstreamFailed(self, failure: Failure) -> None:
        self._upstream = None
        if failure.check(CancelledError) or self._disconnected or self._answered:
            return
        if self._processing:
            self._fail(failure)
        elif self._declaredLength == 0:
            # No body follows: process() comes next and answers, keeping
            # the connection.
            self._pendingError = _asProxyError(failure)
        else:
            self._answerEarly(_asProxyError(failure))

    def _respond(self, response: IResponse) -> None:
        self._response = None
        try:
            headers = responseHeadersForClient(
                response.headers, getattr(response, "connectionHeaders", None)
            )
        except UpstreamProtocolError as error:
            log.warn(
                "upstream {upstream} sent an unacceptable response: {why}",
                upstream=self.upstreamName,
                why=str(error),
            )
            _discard(response)
            writeError(self, error)
            return
        # The filtered fields, as Headers keeps them (canonical names).
        fields = rawFields(headers)
        if (
            b"Content-Length" not in fields
            and response.length is not UNKNOWN_LENGTH
            and response.code not in NO_BODY_CODES
            and self.method != b"HEAD"
        ):
            # Keep the backend's framing length so the client is not
            # switched to chunked needlessly.
            fields[b"Content-Length"] = [b"%d" % (response.length,)]
        http1 = self._http1
        if http1 and rawFields(self.responseHeaders).get(b"Connection"):
            # Twisted's checkPersistence put Connection: close here (the
            # client asked for it); keep saying so.
            fields[b"Connection"] = [b"close"]
        if b"Date" not in fields:
            # RFC 9110 §6.6.1: an origin with a clock must send Date; add it
            # when the backend did not.  Never a Server header of our own.
            fields[b"Date"] = [httpDate()]
        self.setResponseCode(response.code, response.phrase or phraseFor(response.code))
        self.responseHeaders = headers
        # The upstream settings captured with the head: a reload meanwhile
        # does not change the rules a request started under.
        idle = self._upstreamSettings.idle_timeout if self._upstreamSettings else 0
        relay = ResponseRelay(self, _clockOf(self.site), idle)
        if not http1:
            # Send the head now: a slow or endless body (server-sent events)
            # must not hold it back.
            self.write(b"")
        # For HEAD, 1xx, 204 and 304 no body follows (RFC 9110 §6.4.1):
        # write drops any write after the head, and deliverBody still
        # returns the backend connection to the pool.
        relay.deliverFrom(response)
        if http1 and not self.startedWriting and not self.finished and not self._disconnected:
            # HTTP/1.1: the body the response already held (most small
            # responses) went out with the head in one write (one TLS record
            # and one transport write fewer per response); the head of a
            # body still to come goes now, so that a slow or endless body
            # (server-sent events) does not hold it back.
            self.write(b"")

    def _fail(self, failure: Failure) -> None:
        if self.startedWriting:
            abortClient(self)
            return
        writeError(self, _asProxyError(failure))

    # Early answers ---------------------------------------------------------

    def _answerFromHead(self, error: ProxyError) -> None:
        log.info(
            "refusing {method} {target}: {status} ({why})",
            method=self.method,
            target=self.uri,
            status=error.status,
            why=str(error),
        )
        # No 100 Continue after this (Twisted checks Expect after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        if self._declaredLength == 0:
            # Nothing follows the head: answer in process(), which Twisted
            # calls right after this.
            self._pendingError = error
            return
        self._answerEarly(error)

    def _answerEarly(self, error: ProxyError) -> None:
        """
        Answer while the client's body is still arriving.
        """
        self._answered = True
        if self._pipe is not None:
            self._pipe.fail(Failure(error))
        self._cancelUpstream()
        if self.finished or self._disconnected:
            return
        if self.startedWriting:
            abortClient(self)
            return
        if self._bodyDone:
            writeError(self, error)
            return
        status = error.status
        self.setResponseCode(status, phraseFor(status))
        body = errorBody(status)
        headers = Headers()
        headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"date", [httpDate()])
        if isHTTP2(self):
            self._pipe = None
            # Twisted registers the stream only after its head was converted
            # (where this may run), so write on the next turn.  The stream
            # ends in process(), once the client's END_STREAM arrived:
            # Twisted forgets a finished stream and would choke on the
            # client's remaining DATA frames.
            self._earlyPage = (headers, body)
            _clockOf(self.site).callLater(0, self._writeEarlyHTTP2)
            return
        # HTTP/1.1: the rest of the body is never read, so the connection
        # can carry nothing else (RFC 9112 §9.6).
        headers.setRawHeaders(b"connection", [b"close"])
        self.responseHeaders = headers
        self.write(body)
        self._pipe = None
        channel = self.channel
        channel.persistent = False
        channel.loseConnection()

    def _writeEarlyHTTP2(self) -> None:
        page, self._earlyPage = self._earlyPage, None
        if page is None or self.finished or self._disconnected or self.startedWriting:
            return
        self.responseHeaders, body = page
        self.write(body)
        if self._bodyDone:
            self.finish()

    def _bodyTooLarge(self) -> None:
        self._answerEarly(
            ContentTooLarge(f"body over the limit of {self._maxBody} bytes")
        )

    def _uploadIdle(self) -> None:
        log.warn("request body idle timeout: aborting backend and client")
        self._answered = True
        if self._pipe is not None:
            self._pipe.fail(Failure(CancelledError("request body idle")))
        self._cancelUpstream()
        abortClient(self)

    # Client went away ------------------------------------------------------

    def _clientGone(self, reason: Failure) -> None:
        if self._pipe is not None:
            self._pipe.fail(reason)
        self._cancelUpstream()
        if self._response is not None:
            _discard(self._response)
            self._response = None

    def _cancelUpstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is None or upstream is _SENDING:
            return
        if isinstance(upstream, Deferred):
            if not upstream.called:
                upstream.cancel()
        else:
            # An exchange: after cancel() it reports nothing more.
            upstream.cancel()

    def connectionLost(self, reason: Failure) -> None:
        site = self.site
        if not self._lost:
            # Before Twisted's notifyFinish() errbacks run (ResponseRelay's
            # among them), as the errback registered first used to.
            self._lost = True
            self._clientGone(reason)
        super().connectionLost(reason)
        if site is not None and not self.finished and self._started:
            # Aborted or abandoned: still one access-log line (EdgeSite.log
            # keeps it to one).
            site.log(self)
        inflight = getattr(site, "inflight", None)
        if inflight is not None:
            inflight.discard(self)

    def _cleanup(self) -> None:
        site = self.site
        super()._cleanup()
        inflight = getattr(site, "inflight", None)
        if inflight is not None:
            inflight.discard(self)


def _noWrite(data: bytes) -> None:
    pass


_SENDING: Any = object()
"""L{ProxyRequest._upstream} while L{UpstreamPool.send} runs."""


_encodings: dict[tuple[str, str], bytes] = {}
"""Configured names, encoded (the IDNA codec costs microseconds)."""


def _encoded(text: str, encoding: str) -> bytes:
    key = (text, encoding)
    value = _encodings.get(key)
    if value is None:
        value = text.encode(encoding)
        if len(_encodings) >= 256:
            _encodings.clear()
        _encodings[key] = value
    return value


def _isTrusted(host: str, networks: tuple[Any, ...]) -> bool:
    if not networks:
        # The default: nobody is trusted, and parsing the peer's address on
        # every request would be wasted.
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _clockOf(site: Any) -> Any:
    # EdgeSite carries the reactor it was built with (injected, never the
    # global one), which is also the clock for body idle timeouts.
    return site.reactor


def _asProxyError(failure: Failure) -> ProxyError:
    if isinstance(failure.value, ProxyError):
        return failure.value
    log.failure("unexpected failure while proxying", failure=failure)
    return ProxyError(str(failure.value))


class _Discard(Protocol):
    """Receives a response body nobody wants by closing its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _poolFields(headers: Headers) -> Fields:
    """
    C{headers} as the upstream pool takes fields (lower-case names).  A
    bridge until the stage pipeline, which holds L{Fields} throughout,
    replaces this module.
    """
    fields: dict[bytes, list[bytes]] = {}
    for name, values in rawFields(headers).items():
        fields[name.lower()] = list(values)
    return Fields.trusted(fields)


class _PoolResponse:
    """
    A response of the upstream pool as this module reads one (Twisted's
    C{IResponse} names, the framing length in C{connectionHeaders}).  A
    bridge until the stage pipeline replaces this module.
    """

    __slots__ = ("code", "phrase", "headers", "connectionHeaders", "length", "_response")

    def __init__(self, response: Any) -> None:
        self._response = response
        self.code = response.status
        self.phrase = response.reason
        self.headers = headersFrom(
            {canonicalName(name): list(values) for name, values in response.fields.raw().items()}
        )
        length = response.length
        self.length = UNKNOWN_LENGTH if length is None else length
        self.connectionHeaders = (
            None if length is None else headersFrom({b"Content-Length": [b"%d" % (length,)]})
        )

    def deliverBody(self, protocol: Any) -> None:
        self._response.deliverBody(protocol)


def _discard(response: IResponse) -> None:
    """
    Close the backend connection of a response nobody will read (it is
    mid-body and cannot be reused).
    """
    try:
        response.deliverBody(_Discard())
    except Exception:
        # deliverBody may only be called once; a response already being
        # delivered has a relay that stops it on its own.
        pass
