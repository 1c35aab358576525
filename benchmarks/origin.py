# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
The fallback origin of the benchmarks, used only when nginx is not installed:
an HTTP/1.1 keep-alive server that answers C{GET /1k} and C{GET /1m} with
fixed bodies from memory.

It is deliberately not a general HTTP server: the requests come from the
proxies under test, GETs without a body, so a head ends at the first empty
line and pipelined heads are answered in order.  Anything else gets a 404.

    python benchmarks/origin.py PORT
"""

from __future__ import annotations

import asyncio
import sys

BODIES = {b"/1k": b"x" * 1024, b"/1m": b"x" * (1024 * 1024)}


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


RESPONSES = {path: _response(b"200 OK", body) for path, body in BODIES.items()}
NOT_FOUND = _response(b"404 Not Found", b"not found\n")


class OriginProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head = self.buffer[:end]
            self.buffer = self.buffer[end + 4 :]
            parts = head.split(b" ", 2)
            target = parts[1] if len(parts) > 1 else b""
            self.transport.write(RESPONSES.get(target.split(b"?")[0], NOT_FOUND))
            if b"\r\nconnection: close" in head.lower():
                self.transport.close()
                return


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        OriginProtocol, "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
