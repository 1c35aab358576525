# -*- test-case-name: tests.test_server -*-
"""
The one mapping from a L{ProxyError} (or a bare status) to the response a
client sees, for every error the proxy makes itself (refusals of the
parsers and of routing, of the security stages, the pool's 502, 503 and
504, the cache's 504...; never a backend's own error response, which
passes as it is).

The built-in page is short and generic on purpose: the status line and its
phrase, nothing else.  It never names a backend, an address, a port or an
exception; those go to the log (the caller's job), never onto the wire.

An operator's own pages (C{error_pages}, read with the configuration by
L{edgeproxy.config.errorpages}) replace its body and content type: the
request's route's pages (its own over the global ones), or the global ones
for a request no route took (L{pagesFor}).  Whichever page it is, the
error's own fields go with it (C{Retry-After}, C{WWW-Authenticate}, the
C{RateLimit} fields), with C{Cache-Control: no-store}.

This module makes responses but decides nothing about I{whether} one
should be sent; the protocols and stages do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.web.http import RESPONSES, datetimeToString

from edgeproxy.config.stagemodel import ErrorPages
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import BytesBody, Response

__all__ = [
    "CLOSE_AFTER",
    "dateField",
    "errorBody",
    "errorResponse",
    "httpDate",
    "pagesFor",
    "phraseFor",
    "rejection",
]

_PAGES: dict[int, bytes] = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
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
than the status line already did."""

CLOSE_AFTER: frozenset[int] = frozenset({400, 413, 431})
"""Statuses after which an HTTP/1.1 connection is closed: the request's
framing or size is not trustworthy, so nothing after it on the connection is
either (RFC 9112 9.6)."""

_date: list[object] = [None, b"", b""]
"""The last second L{httpDate} formatted, its text, and its field line."""


def httpDate() -> bytes:
    """
    The current time as an HTTP date (RFC 9110 5.6.7), formatted once per
    second rather than once per response.
    """
    now = int(time.time())
    date = _date
    if date[0] != now:
        text = datetimeToString(now)
        date[1] = text
        date[2] = b"Date: " + text + b"\r\n"
        date[0] = now
    return date[1]  # type: ignore[return-value]


def dateField() -> bytes:
    """C{Date: <now>} as a field line (with its CRLF)."""
    httpDate()
    return _date[2]  # type: ignore[return-value]


def phraseFor(status: int) -> bytes:
    """The reason phrase for C{status}."""
    return _PAGES.get(status) or RESPONSES.get(status, b"Error")


def errorBody(status: int) -> bytes:
    """The body of the generic page for C{status}."""
    return b"%d %s\n" % (status, phraseFor(status))


_pageFields = Fields.trusted(
    {b"content-type": [b"text/plain; charset=utf-8"], b"cache-control": [b"no-store"]}
)

_customFields: dict[str, Fields] = {}
"""The fields of a custom page, by its content type (a handful)."""


def pagesFor(route: Any, currentRuntime: Callable[[], Any] | None = None) -> ErrorPages | None:
    """
    The custom pages of an error of a request: its route's (merged with
    the global ones when the configuration was read), or for a request no
    route took (C{route} L{None}) the global ones of the current runtime.

    @param currentRuntime: the listener's, asked only when C{route} is
        L{None}.
    @return: L{None} for the built-in pages.
    """
    if route is not None:
        return getattr(route, "error_pages", None)
    if currentRuntime is None:
        return None
    config = getattr(currentRuntime(), "config", None)
    return None if config is None else config.proxy.error_pages


def _page(status: int, pages: ErrorPages | None) -> tuple[bytes, Fields]:
    """The body of the page for C{status} and its fields."""
    page = None if pages is None else pages.page(status)
    if page is None:
        return errorBody(status), _pageFields
    fields = _customFields.get(page.content_type)
    if fields is None:
        fields = _customFields[page.content_type] = Fields.trusted(
            {b"content-type": [page.content_type.encode("ascii")], b"cache-control": [b"no-store"]}
        )
    return page.body, fields


def errorResponse(error: ProxyError | int, pages: ErrorPages | None = None) -> Response:
    """
    The page for C{error}: the custom page of its status from C{pages}, or
    the built-in one (its status and phrase as a short plain text); with
    C{Cache-Control: no-store}, C{Retry-After} when the error carries one,
    and the error's own C{fields}.
    """
    status = error if isinstance(error, int) else error.status
    body, fields = _page(status, pages)
    retryAfter = None if isinstance(error, int) else error.retryAfter
    extra = () if isinstance(error, int) else error.fields
    if retryAfter is not None or extra:
        raw = dict(fields.raw())
        if retryAfter is not None:
            raw[b"retry-after"] = [b"%d" % (retryAfter,)]
        for name, value in extra:
            raw.setdefault(name, []).append(value)
        fields = Fields.trusted(raw)
    return Response(status, phraseFor(status), fields, len(body), BytesBody(body))


_rejections: dict[int, tuple[bytes, bytes]] = {}
"""The built-in refusal of each status: its head up to the request ID's
field line, and the rest."""


def rejection(status: int, pages: ErrorPages | None = None, idLine: bytes = b"") -> bytes:
    """
    The whole response an HTTP/1.1 connection sends when it refuses a
    request head: a status line, C{Cache-Control: no-store}, C{Connection:
    close}, C{Date} (RFC 9110 6.6.1), the request's ID (C{idLine}, its field line without the CRLF, as
    L{edgeproxy.headers.requestid.RequestIds.line} makes it), the page (the custom one of C{pages}, else a
    tiny plain-text body), and nothing that identifies the software.
    """
    page = None if pages is None else pages.page(status)
    cached = _rejections.get(status) if page is None else None
    if cached is None:
        reason = phraseFor(status)
        if page is None:
            body, contentType = reason + b"\n", b"text/plain; charset=utf-8"
        else:
            body, contentType = page.body, page.content_type.encode("ascii")
        cached = (
            b"".join(
                [
                    b"HTTP/1.1 %d %s\r\n" % (status, reason),
                    b"Content-Type: %s\r\n" % (contentType,),
                    b"Content-Length: %d\r\n" % (len(body),),
                    b"Cache-Control: no-store\r\n",
                    b"Connection: close\r\n",
                ]
            ),
            b"\r\n" + body,
        )
        if page is None:
            _rejections[status] = cached
    head, rest = cached
    if idLine:
        return head + dateField() + idLine + b"\r\n" + rest
    return head + dateField() + rest
