# -*- test-case-name: tests.test_request -*-
"""
The one mapping from a L{ProxyError} (or a bare status) to the response a
client sees.

The page is short and generic on purpose: the status line and its phrase,
nothing else.  It never names a backend, an address, a port or an exception;
those go to the log (the caller's job), never onto the wire.  This module
writes responses on a request but makes no decision about I{whether} one
should be written; L{edgeproxy.http.request} owns that.
"""

from __future__ import annotations

from typing import Any

import time

from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.iweb import IRequest

from edgeproxy.errors import ProxyError

_PAGES: dict[int, bytes] = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
"""Status -> RFC 9110 reason phrase (Twisted's table lacks 421 and 431 and
uses RFC 2616's wording).  Also the body text, so that the body says no more
than the status line already did.  The channel's own refusals use it too."""

CLOSE_AFTER: frozenset[int] = frozenset({400, 413, 431})
"""Statuses after which the client connection is closed: the request's
framing or size is not trustworthy, so nothing after it on the connection is
either (RFC 9112 §9.6)."""


def isHTTP2(request: IRequest) -> bool:
    """
    @return: whether C{request} arrived on an HTTP/2 stream.  Works before
        C{requestReceived} (when C{clientproto} is not set yet).
    """
    channel = getattr(request, "channel", None)
    return channel is not None and hasattr(channel, "streamID")


_date: list[Any] = [None, b""]
"""The last second L{httpDate} formatted, and its text."""


def httpDate() -> bytes:
    """
    The current time as an HTTP date (RFC 9110 5.6.7), as Twisted's
    C{datetimeToString()} gives it, formatted once per second rather than
    once per response.
    """
    now = int(time.time())
    date = _date
    if date[0] != now:
        date[1] = datetimeToString(now)
        date[0] = now
    return date[1]  # type: ignore[no-any-return]


def phraseFor(status: int) -> bytes:
    """
    @return: the reason phrase for C{status}.
    """
    return _PAGES.get(status) or RESPONSES.get(status, b"Error")


def errorBody(status: int) -> bytes:
    """
    @return: the body of the generic page for C{status}.
    """
    return b"%d %s\n" % (status, phraseFor(status))


def writeError(request: IRequest, error: ProxyError | int) -> None:
    """
    Answer C{request} with the generic page for C{error} and finish it.

    The caller must not have started the response.  Response headers already
    set on the request (e.g. by Twisted's C{checkPersistence}) are dropped:
    an error page carries only what this function sets.

    @param request: a request whose response has not started.
    @param error: a L{ProxyError} (its C{status} is used) or a status code.
    """
    status = error if isinstance(error, int) else error.status
    body = errorBody(status)
    request.setResponseCode(status, phraseFor(status))
    headers = request.responseHeaders
    keepClose = headers.getRawHeaders(b"connection")
    for name, _ in list(headers.getAllRawHeaders()):
        headers.removeHeader(name)
    headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"date", [httpDate()])
    retryAfter = None if isinstance(error, int) else error.retryAfter
    if retryAfter is not None:
        headers.setRawHeaders(b"retry-after", [b"%d" % (retryAfter,)])
    if not isHTTP2(request) and (status in CLOSE_AFTER or keepClose):
        # HTTP/2 forbids connection-specific fields (RFC 9113 §8.2.2); there
        # the stream simply ends.
        headers.setRawHeaders(b"connection", [b"close"])
        channel = getattr(request, "channel", None)
        if channel is not None:
            channel.persistent = False
    request.write(body)
    request.finish()
