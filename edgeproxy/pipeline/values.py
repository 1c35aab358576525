# -*- test-case-name: tests.test_pipeline -*-
"""
The values every stage of the pipeline sees: one L{Request} per request,
one L{Response} per answer, and the L{ConnectionInfo} facts they share.

They are immutable (tuples): a stage that changes a request or a response
makes a new one (C{_replace}), and the value another stage holds never
changes under it.  The request's path and query are normalised once, by the
protocol that read the request, before routing; no stage reads the target
again, so no stage can be bypassed by an encoding that routing saw
differently.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


from edgeproxy.config.model import Listener, Route
from edgeproxy.bodies import BODY_DONE
from edgeproxy.h1.fields import Fields

__all__ = [
    "BODY_DONE",
    "BytesBody",
    "ClientCertificate",
    "ConnectionInfo",
    "Request",
    "Response",
    "ResponseBody",
]


class ClientCertificate(NamedTuple):
    """
    The facts of a verified client certificate (read by
    L{edgeproxy.security.listening}; the contexts that ask for one are
    L{edgeproxy.tls.clientcerts}'s).
    """

    subject: str
    """The subject as an RFC 4514 string (C{CN=ann,O=Example})."""
    san: tuple[str, ...]
    """The subject alternative names (C{DNS:...}, C{email:...}, C{URI:...},
    C{IP:...})."""
    fingerprint: str
    """SHA-256 of the DER certificate, lower-case hex."""


class ConnectionInfo(NamedTuple):
    """
    What a request's connection tells about it: the same for every request
    of the connection.
    """

    peer: str
    """The peer's IP address as text (C{""} when it has none, e.g. a UNIX
    socket); with the PROXY protocol, the address its header gave."""
    peerPort: int
    scheme: bytes
    """C{b"https"} on a TLS listener, else C{b"http"}."""
    listener: Listener
    serverName: bytes | None = None
    """The SNI name (lower case), on TLS with SNI."""
    tlsVersion: str | None = None
    """C{"1.3"}, C{"1.2"}, on TLS."""
    alpn: bytes | None = None
    """The negotiated ALPN protocol, on TLS."""
    clientCertificate: ClientCertificate | None = None
    """The client certificate the handshake verified (listeners with
    C{client_ca}), or L{None}."""
    local: str = ""
    """The address the client connected to (with the PROXY protocol, the
    one its header gave)."""
    localPort: int = 0


class Request(NamedTuple):
    """
    One request, as every stage sees it.
    """

    method: bytes
    path: bytes
    """The normalised path (L{edgeproxy.targets.normaliseTarget}): what
    routing matched and what is forwarded."""
    query: bytes
    """C{b""}, or the query with its C{?}, byte for byte as received."""
    version: bytes
    """C{HTTP/1.1}, C{HTTP/1.0} or C{HTTP/2}."""
    fields: Fields
    """The client's fields (C{host} holds the authority on HTTP/2 too)."""
    host: bytes
    """The C{Host} (or C{:authority}) as received."""
    client: str
    """The client's address: the peer's, or with trusted proxies in front
    the one they vouch for in C{X-Forwarded-For}."""
    connection: ConnectionInfo
    route: Route | None
    prefix: bytes
    """The path prefix the route matched (for C{strip_prefix})."""
    length: int | None
    """The body's declared length: C{0} for none, L{None} when unknown
    (chunked, or HTTP/2 without C{content-length})."""
    target: bytes
    """The request-target as the client sent it (for the access log)."""
    requestId: bytes = b""
    """The request's ID (L{edgeproxy.headers.requestid}), or C{b""} with
    C{request_id = off}."""
    authenticated: bool = False
    """The C{auth} stage let the client in on credentials it presented,
    which it may then have removed (C{Authorization}, a session cookie):
    a shared cache treats the request as one with C{Authorization} (RFC
    9111 3.5), so one user's answer is never served to another."""


class ResponseBody(Protocol):
    """
    A response body, delivered like Twisted's C{IResponse.deliverBody}: the
    protocol gets C{makeConnection} with a transport that can pause, resume
    and stop the body (C{IPushProducer}), C{dataReceived} per piece, and one
    C{connectionLost}: with L{BODY_DONE} (or a C{PotentialDataLoss}: ended
    by its source closing) when complete, any other failure when cut short.
    """

    def deliverBody(self, protocol: Any) -> None: ...

    # Optionally, for a body all at hand: takeBody() -> bytes | memoryview
    # | None, the whole body delivered at once (or None, nothing done, when
    # it is not all there; a memoryview of bytes held elsewhere, a stored
    # body, is not copied).  The client side uses it to write head and body
    # together (an HTTP/2 stream keeps a reference to a large one and takes
    # it a bound at a time).


class Response(NamedTuple):
    """
    One answer to a request, as every stage sees it.
    """

    status: int
    reason: bytes
    fields: Fields
    """The message's own fields (never framing or connection fields)."""
    length: int | None
    """The body's length when known (for C{HEAD} and C{304}: the length the
    full response would have)."""
    body: ResponseBody | None
    """L{None}: no body."""
    chosenOn: tuple[bytes, ...] = ()
    """The request fields (lower case) a later stage of the route made this
    response vary on by its own choice alone (C{accept-encoding} when the
    compression stage handled it, C{accept} when the image stage did): the
    cache keys the response on that stage's choice for these fields, on
    their value for any other (L{edgeproxy.cache.key.secondaryKey}).  Never
    sent."""
    transient: bool = False
    """A one-off answer the cache must not store (the original image sent
    because the conversion pool was full): it goes to this client as it
    is, and the next one gets a new try.  Never sent."""


class _Stopped:
    """The transport of a L{BytesBody}: nothing to pause or resume."""

    __slots__ = ()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_STOPPED = _Stopped()


class BytesBody:
    """A body held in memory (error pages, stored responses, redirects)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def takeBody(self) -> bytes | None:
        """The whole body, at once (see L{ResponseBody})."""
        return self.data

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_STOPPED)
        if self.data:
            protocol.dataReceived(self.data)
        protocol.connectionLost(BODY_DONE)
