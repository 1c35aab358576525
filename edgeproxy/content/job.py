# -*- test-case-name: tests.test_content_convert -*-
"""
What a conversion is asked (L{Job}) and what comes of it (L{Result}): the
values the proxy and its conversion processes exchange, without Pillow
(the proxy's own process never decodes an image).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["CONTENT_TYPES", "FRAME", "Job", "Result"]

FRAME = struct.Struct(">II")
"""The head of a frame on the pipes to and from a conversion process: the
lengths of its JSON object and of its bytes (L{edgeproxy.content.worker})."""

CONTENT_TYPES = {
    "avif": "image/avif",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
}


class Job(NamedTuple):
    """What to make of one image."""

    target: str
    """C{avif}, C{webp}, or C{""}: the source's own format (resize only)."""
    quality: int
    """1-100; C{0}: the format's default (JPEG only)."""
    maxPixels: int
    width: int | None = None
    height: int | None = None
    fit: str = "contain"
    """C{contain}, C{cover} or C{fill}."""

    @property
    def resizing(self) -> bool:
        return self.width is not None or self.height is not None


class Result(NamedTuple):
    """What came of it: C{data} is the image to send when C{outcome} is
    C{converted}, else C{b""}."""

    outcome: str
    """C{converted}, C{larger}, C{too_large}, C{unsupported}, C{broken} (the
    image cannot be decoded or encoded) or C{failed} (the conversion did
    not get to an answer: its process ended, it ran out of memory)."""
    data: bytes = b""
    contentType: str = ""
    width: int = 0
    height: int = 0
    detail: str = ""
