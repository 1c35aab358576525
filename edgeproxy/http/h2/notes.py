# -*- test-case-name: tests.test_h2 -*-
"""
What the process log says about an HTTP/2 client's protocol errors.

A client that breaks the protocol ends its own connection (GOAWAY with the
error's code): one such connection is the client's business, and how many
there are is the client's choice, so each is a C{debug} line and the
process log gets a count per interval, by the error code's name
(L{edgeproxy.logs.Repeats})::

    repeated in the last 10s: HTTP/2 client error PROTOCOL_ERROR x 939

The other ends a client brings about (a flood cut, a frame or header block
too slow, a GOAWAY with an error, a stream the library refused to send on)
are counted the same way, by their kind (L{clientNote}).
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from edgeproxy.logs import repeats

__all__ = ["clientError", "clientNote", "codeName"]

# The connection's namespace, as its other lines.
log = Logger(namespace="edgeproxy.http.h2.connection")


def clientError(clock: IReactorTime, error: Any) -> None:
    """
    Note the protocol error C{error} (an C{h2.exceptions.ProtocolError}) of
    a client's connection.
    """
    code = codeName(getattr(error, "error_code", None))
    repeats(clock).emit(
        log,
        LogLevel.debug,
        f"HTTP/2 client error {code}",
        "HTTP/2 client error {code}: {why}",
        code=code,
        why=str(error) or type(error).__name__,
    )


def clientNote(clock: IReactorTime, kind: str, format: str, **fields: Any) -> None:
    """
    Note an end a client brought about: C{format} with C{fields} at
    C{debug}, counted per interval under C{kind} (of bounded variety: a
    fixed text or a code's name, never client input).
    """
    repeats(clock).emit(log, LogLevel.debug, kind, format, **fields)


def codeName(code: Any) -> str:
    """C{PROTOCOL_ERROR} for 1 (RFC 9113 7); the number for an unknown code."""
    try:
        return ErrorCodes(int(code)).name
    except (TypeError, ValueError):
        return "PROTOCOL_ERROR" if code is None else str(code)
