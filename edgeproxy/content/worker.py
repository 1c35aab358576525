# -*- test-case-name: tests.test_content_pool -*-
"""
The conversion process: C{python -m edgeproxy.content.worker}, started by
L{edgeproxy.content.pool}, converts one image at a time for as long as its
standard input stays open.

The frames on both pipes are the same: 8 bytes (two big-endian 32-bit
lengths), a JSON object of that first length, then that many bytes of
image.  In, the object is a L{Job}'s fields; out, a L{Result}'s (its data
in the bytes).  JSON, not pickle: the proxy must not run whatever a process
that parses hostile images might send back.

The process lowers its own CPU priority (L{lowerPriority}: C{nice} 10, a
session and scheduling group of its own at nice 19, the shortest time
slice) so that, when the machine is busy, conversions wait and proxying
does not.
"""

from __future__ import annotations

import json
import os
import sys
from typing import BinaryIO

from edgeproxy.content.convert import convert
from edgeproxy.content.job import FRAME, Job, Result
from edgeproxy.content.lowpriority import NICENESS, lowerPriority

__all__ = ["NICENESS", "readFrame", "serve", "writeFrame"]


def readFrame(stream: BinaryIO) -> tuple[dict[str, object], bytes] | None:
    """The next frame, or L{None} at the end of the stream."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    metaLength, dataLength = FRAME.unpack(head)
    meta = stream.read(metaLength)
    data = stream.read(dataLength)
    if len(meta) < metaLength or len(data) < dataLength:
        return None
    return json.loads(meta), data


def writeFrame(stream: BinaryIO, meta: dict[str, object], data: bytes) -> None:
    encoded = json.dumps(meta).encode("utf-8")
    stream.write(FRAME.pack(len(encoded), len(data)) + encoded + data)
    stream.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Convert frames from C{inp} to C{out} until C{inp} ends."""
    while True:
        frame = readFrame(inp)
        if frame is None:
            return
        fields, data = frame
        result = convert(data, Job(**fields))  # type: ignore[arg-type]
        meta = {name: getattr(result, name) for name in Result._fields if name != "data"}
        writeFrame(out, meta, result.data)


def main() -> None:
    lowerPriority()
    # Frames go to a private copy of standard output; anything a library
    # prints lands on standard error, which the proxy logs.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
