# -*- test-case-name: tests.test_h1 -*-
"""
HTTP/1.1 on the wire, without I/O: the one place edgeproxy reads and writes
HTTP/1.x, for clients (L{edgeproxy.http.server}), backends
(L{edgeproxy.upstream.client}), WebSocket handshakes and health checks.

Bytes go in, values come out (L{RequestHead}, L{ResponseHead}, body bytes
from a L{BodyReader}); values go in, bytes come out (L{writeRequestHead},
L{writeResponseHead}, L{chunk}).  Nothing here imports
C{twisted.internet}: no sockets, no clock, no reactor.  Every refusal is a
L{RemoteProtocolError} (the peer's fault, with the status to answer a client
with) and every misuse a L{LocalProtocolError}.

One policy for each choice RFC 9112 leaves open, by direction:

=============================  ======================  ======================
choice                         from a client           from a backend
=============================  ======================  ======================
bare LF as a line end          refused (part of line)  accepted
obs-fold (5.2)                 refused (400)           replaced by SP
C{Content-Length: 5, 5}        refused (400)           accepted
two C{Content-Length} fields   refused (400)           accepted when equal
C{Transfer-Encoding}           one final C{chunked};   exactly C{chunked}
                               C{gzip, chunked} 501
C{Content-Length} with TE      refused (400)           refused (502)
empty line before the message  one tolerated           none
reason phrase                  (n/a)                   optional
chunked framing                strict (see bodies)     strict (see bodies)
=============================  ======================  ======================
"""

from edgeproxy.h1.bodies import (
    LAST_CHUNK,
    BodyReader,
    ChunkedReader,
    CloseReader,
    LengthReader,
    chunk,
)
from edgeproxy.h1.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from edgeproxy.h1.fields import Fields
from edgeproxy.h1.requests import (
    RequestHead,
    checkRequestLine,
    parseRequestHead,
    splitHead,
    writeRequestHead,
)
from edgeproxy.h1.responses import (
    CHUNKED,
    CLOSE_DELIMITED,
    HOP_BY_HOP,
    NO_BODY,
    ResponseHead,
    bodyFraming,
    parseResponseHead,
    splitResponseHead,
    writeResponseHead,
)
from edgeproxy.h1.syntax import canonicalName, isToken, listTokens, validHost

__all__ = [
    "CHUNKED",
    "CLOSE_DELIMITED",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "NO_BODY",
    "BodyReader",
    "ChunkedReader",
    "CloseReader",
    "Fields",
    "LengthReader",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestHead",
    "ResponseHead",
    "bodyFraming",
    "canonicalName",
    "checkRequestLine",
    "chunk",
    "isToken",
    "listTokens",
    "parseRequestHead",
    "parseResponseHead",
    "splitHead",
    "splitResponseHead",
    "validHost",
    "writeRequestHead",
    "writeResponseHead",
]
