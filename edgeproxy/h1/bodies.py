# -*- test-case-name: tests.test_h1 -*-
"""
Message bodies on the wire: reading the three framings of RFC 9112 6
(a length, the chunked coding, the end of the connection) and writing
chunks.

A reader is fed the bytes that follow a head and gives back the body bytes
among them; once the body is over, L{BodyReader.done} is true and
L{BodyReader.rest} holds the bytes that came after it (the next message on
a kept-alive connection).  Nothing is buffered but the few bytes of a chunk
line cut between two reads, so a body of any size passes through in the
pieces it arrived in.

The chunked reader is strict where parsers disagree (the request smuggling
history): every line must end in CRLF (a bare LF is refused, never taken
for a line end); the size is 1 to 16 hex digits with no sign, prefix or
whitespace; extensions must match the RFC grammar (no unbalanced quote) and
total at most L{MAX_CHUNK_EXTENSION_BYTES} per message; trailer fields are
checked like header fields (no obs-fold, token names, no controls), kept in
L{ChunkedReader.trailers}, and bounded in size.  The same rules hold for
requests and responses.
"""

from __future__ import annotations

import re

from edgeproxy.h1.errors import RemoteProtocolError
from edgeproxy.h1.fields import Fields
from edgeproxy.h1.syntax import CONTROLS_EXCEPT_HTAB, TOKEN, isToken

__all__ = [
    "LAST_CHUNK",
    "BodyReader",
    "ChunkedReader",
    "CloseReader",
    "LengthReader",
    "chunk",
]

MAX_CHUNK_SIZE_DIGITS = 16
MAX_CHUNK_LINE = 1024
MAX_CHUNK_EXTENSION_BYTES = 4096
"""Total chunk-extension bytes one message may carry.  Nobody we serve uses
extensions; the cap stops tiny chunks with huge extensions from turning a
small body into a lot of parsing."""

_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXTENSIONS = re.compile(
    rb"(?:[ \t]*;[ \t]*" + TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")

LAST_CHUNK = b"0\r\n\r\n"
"""The end of a chunked body without trailers."""


def chunk(data: bytes | memoryview) -> bytes:
    """C{data} as one chunk (C{data} must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class BodyReader:
    """
    What every reader offers.

    @ivar done: the body is complete.
    @ivar rest: once L{done}, the bytes fed after the body's end.
    """

    __slots__ = ("done", "rest")

    def __init__(self) -> None:
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """
        @return: the body bytes in C{data} (possibly none).
        @raise RemoteProtocolError: the framing is broken.
        """
        raise NotImplementedError

    def eof(self) -> None:
        """
        The connection ended: a close-delimited body is done; any other
        that is not raises.

        @raise RemoteProtocolError: the body is incomplete.
        """
        if not self.done:
            raise RemoteProtocolError("connection closed before the end of the body")


class LengthReader(BodyReader):
    """A body of a known length (C{Content-Length})."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        super().__init__()
        self.remaining = length
        self.done = not length

    def feed(self, data: bytes) -> bytes:
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            return data
        self.remaining = 0
        self.done = True
        if len(data) == remaining:
            return data
        self.rest = data[remaining:]
        return data[:remaining]


class CloseReader(BodyReader):
    """A body that ends when the connection does (responses only)."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


_SIZE, _DATA, _CRLF, _TRAILER, _FINISHED = range(5)


class ChunkedReader(BodyReader):
    """
    The chunked transfer coding (RFC 9112 7.1), read strictly (see the
    module docstring).

    @ivar trailers: the trailer fields, once L{done}.
    """

    __slots__ = (
        "trailers", "_state", "_buffer", "_scan", "_remaining", "_extensionBytes",
        "_trailerBytes", "_maxTrailerSize", "_trailerFields",
    )

    def __init__(self, maxTrailerSize: int = 16 * 1024) -> None:
        super().__init__()
        self.trailers = Fields.trusted({})
        self._state = _SIZE
        self._buffer = bytearray()
        self._scan = 0
        self._remaining = 0
        self._extensionBytes = 0
        self._trailerBytes = 0
        self._maxTrailerSize = maxTrailerSize
        self._trailerFields: dict[bytes, list[bytes]] = {}

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer
        if self._state == _DATA and not buffer:
            # Body bytes straight through, no copy into the buffer.
            remaining = self._remaining
            if len(data) <= remaining:
                self._remaining = remaining - len(data)
                if not self._remaining:
                    self._state = _CRLF
                return data
            self._remaining = 0
            self._state = _CRLF
            first = data[:remaining]
            data = data[remaining:]
        else:
            first = b""
        if self._state == _FINISHED:
            raise RemoteProtocolError("chunked body already finished")
        buffer += data
        pieces = [first] if first else []
        while buffer:
            state = self._state
            if state == _DATA:
                if len(buffer) > self._remaining:
                    piece = bytes(buffer[: self._remaining])
                    del buffer[: self._remaining]
                    self._remaining = 0
                    self._state = _CRLF
                else:
                    piece = bytes(buffer)
                    del buffer[:]
                    self._remaining -= len(piece)
                    if not self._remaining:
                        self._state = _CRLF
                pieces.append(piece)
            elif state == _CRLF:
                if len(buffer) < 2:
                    if buffer[0] != 0x0D:
                        raise RemoteProtocolError("chunk data not followed by CRLF")
                    break
                if buffer[0] != 0x0D or buffer[1] != 0x0A:
                    raise RemoteProtocolError("chunk data not followed by CRLF")
                del buffer[:2]
                self._state = _SIZE
            elif state == _SIZE:
                line = self._takeLine(MAX_CHUNK_LINE)
                if line is None:
                    break
                self._sizeLine(line)
            else:  # _TRAILER
                line = self._takeLine(self._maxTrailerSize)
                if line is None:
                    break
                if self._trailerLine(line):
                    self._state = _FINISHED
                    self.done = True
                    self.trailers = Fields.trusted(self._trailerFields)
                    self.rest = bytes(buffer)
                    del buffer[:]
                    break
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _takeLine(self, limit: int) -> bytes | None:
        buffer = self._buffer
        end = buffer.find(b"\n", self._scan)
        if end == -1:
            if len(buffer) > limit:
                raise RemoteProtocolError("chunk line too long")
            self._scan = len(buffer)
            return None
        if end == 0 or buffer[end - 1] != 0x0D:
            raise RemoteProtocolError("bare LF in chunked body")
        if end - 1 > limit:
            raise RemoteProtocolError("chunk line too long")
        line = bytes(buffer[: end - 1])
        del buffer[: end + 1]
        self._scan = 0
        return line

    def _sizeLine(self, line: bytes) -> None:
        size, semicolon, extensions = line.partition(b";")
        if not 0 < len(size) <= MAX_CHUNK_SIZE_DIGITS or not _HEX_DIGITS.issuperset(size):
            raise RemoteProtocolError("invalid chunk size")
        if semicolon:
            self._extensionBytes += len(extensions) + 1
            if self._extensionBytes > MAX_CHUNK_EXTENSION_BYTES:
                raise RemoteProtocolError("too many chunk-extension bytes")
            if _CHUNK_EXTENSIONS.fullmatch(b";" + extensions) is None:
                raise RemoteProtocolError("invalid chunk extension")
        self._remaining = int(size, 16)
        self._state = _DATA if self._remaining else _TRAILER

    def _trailerLine(self, line: bytes) -> bool:
        if not line:
            return True
        self._trailerBytes += len(line) + 2
        if self._trailerBytes > self._maxTrailerSize:
            raise RemoteProtocolError("trailer section too large")
        name, colon, value = line.partition(b":")
        if not colon or not isToken(name):
            raise RemoteProtocolError("invalid trailer field")
        value = value.strip(b" \t")
        if len(value.translate(None, CONTROLS_EXCEPT_HTAB)) != len(value):
            raise RemoteProtocolError("control character in trailer field")
        self._trailerFields.setdefault(name.lower(), []).append(value)
        return False
