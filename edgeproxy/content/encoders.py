# -*- test-case-name: tests.test_content_compress -*-
"""
Streaming compressors for the content codings the edge produces: C{zstd}
(RFC 8878, through C{zstandard}), C{br} (RFC 7932, through C{brotli}) and
C{gzip} (RFC 1952, through the standard library's C{zlib}).

An L{Encoder} takes the body a piece at a time and gives back, for each
piece, everything needed to decode it so far (the compressor is flushed:
a receiver never waits for bytes the backend already sent, which is what
server-sent events and long polls need), and the end of the stream from
L{Encoder.finish}.  Each keeps a bounded window, so its memory does not
grow with the body:

  - zstd: the level's window, at most 8 MiB (levels up to 19; RFC 9659
    3 lets a client refuse larger windows);
  - br: a 512 KiB window (C{lgwin} 19), as on-the-fly brotli is usually
    run, rather than the library's 4 MiB;
  - gzip: zlib's 32 KiB window.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import brotli  # type: ignore[import-untyped]
import zstandard

__all__ = ["ENCODINGS", "Encoder", "makeEncoder"]

_BROTLI_WINDOW = 19


class Encoder(Protocol):
    """One compressed stream."""

    def compress(self, data: bytes) -> bytes:
        """Compress C{data}; the result decodes to everything given so far."""

    def finish(self) -> bytes:
        """The end of the stream."""


class _Zstd:
    __slots__ = ("_compressor",)

    def __init__(self, level: int) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: bytes) -> bytes:
        compressor = self._compressor
        return compressor.compress(data) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


class _Brotli:
    __slots__ = ("_compressor",)

    def __init__(self, level: int) -> None:
        self._compressor = brotli.Compressor(quality=level, lgwin=_BROTLI_WINDOW)

    def compress(self, data: bytes) -> bytes:
        compressor = self._compressor
        return compressor.process(data) + compressor.flush()

    def finish(self) -> bytes:
        return self._compressor.finish()


class _Gzip:
    __slots__ = ("_compressor",)

    def __init__(self, level: int) -> None:
        # wbits 16 + 15: the gzip wrapper (RFC 1952) around a 32 KiB window.
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + 15)

    def compress(self, data: bytes) -> bytes:
        compressor = self._compressor
        return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)


ENCODINGS: dict[bytes, Callable[[int], Encoder]] = {b"zstd": _Zstd, b"br": _Brotli, b"gzip": _Gzip}
"""The content codings the edge can produce, by their token."""


def makeEncoder(encoding: bytes, level: int) -> Encoder:
    """A new stream of C{encoding} (a key of L{ENCODINGS}) at C{level}."""
    return ENCODINGS[encoding](level)
