# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
Just enough HTTP/1.1 response framing for the suite's own clients (the
readiness probe, the idle-connection holder, the handshake generator): is a
response complete, and what are its status and body.

Only what the proxies under test send back for C{GET /1k} and C{GET /1m}:
a body framed by C{Content-Length} or by chunked transfer coding (RFC 9112
section 7.1; extensions and trailers are skipped), or, with neither, by the
end of the connection.
"""

from __future__ import annotations


def parse(data: bytes, closed: bool = False) -> tuple[int, bytes] | None:
    """
    C{(status, body)} when C{data} holds a whole response, else L{None}.
    C{closed} says the peer closed the connection, which completes a body
    framed by neither length nor chunks.
    """
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        return _dechunk(status, rest)
    if length is not None:
        return (status, rest[:length]) if len(rest) >= length else None
    if status in (204, 304) or 100 <= status < 200:
        return status, b""
    return (status, rest) if closed else None


def _dechunk(status: int, rest: bytes) -> tuple[int, bytes] | None:
    body = bytearray()
    position = 0
    while True:
        end = rest.find(b"\r\n", position)
        if end < 0:
            return None
        size = int(rest[position:end].split(b";")[0].strip(), 16)
        position = end + 2
        if size == 0:
            # Trailer section, then the final empty line.
            while True:
                end = rest.find(b"\r\n", position)
                if end < 0:
                    return None
                if end == position:
                    return status, bytes(body)
                position = end + 2
        if len(rest) < position + size + 2:
            return None
        body += rest[position : position + size]
        position += size + 2
