# -*- test-case-name: tests.test_h1 -*-
"""
The one error pair of L{edgeproxy.h1}, after h11's.

L{RemoteProtocolError}: the peer sent something this package refuses to
read (the peer's fault); it carries the status to answer with when the peer
is a client.  L{LocalProtocolError}: our own code asked for something that
cannot be put on the wire (a bug, or a value that was never checked).
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class of the errors this package raises."""


class RemoteProtocolError(ProtocolError):
    """
    The peer's bytes break HTTP/1.1 (or our stricter reading of it).

    @ivar status: the status a server answers with (C{400} unless the
        problem has one of its own: C{414}, C{431}, C{501}, C{505}).  For a
        response from a backend the status is meaningless; the proxy answers
        C{502}.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(ProtocolError):
    """We were asked to write something that is not valid HTTP/1.1."""
