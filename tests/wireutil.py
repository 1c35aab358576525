"""
Comparing HTTP/1.1 bytes on the wire with what a test expects, whatever
second the C{Date} field line was written in.
"""

from __future__ import annotations

import re

_DATE_LINE = re.compile(rb"\r\nDate: [^\r\n]*(?=\r\n)")


def undated(wire: bytes) -> bytes:
    """C{wire} without its C{Date} field lines."""
    return _DATE_LINE.sub(b"", wire)
