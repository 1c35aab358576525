"""
Compression and image conversion in the real C{twistd edgeproxy} process,
over sockets on 127.0.0.1: the bytes a client gets decode to what the
origin sent, the conversion runs in a niced conversion process that is the
proxy's child, and that process ends with the proxy.
"""

from __future__ import annotations

import http.server
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import brotli
import pytest
import zstandard

from tests.imageutil import decode, meanDifference, photoJPEG
from tests.proc import NotifyReceiver, freePort, request, startTwistd

PAGE = b"".join(b"<li>item %d of a list that compresses</li>\n" % i for i in range(2000))
PHOTO = photoJPEG(480, 360)
FILES = {
    "/page.html": ("text/html; charset=utf-8", PAGE),
    "/photo.jpg": ("image/jpeg", PHOTO),
}


class Origin:
    """A threaded HTTP/1.1 origin serving L{FILES}."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                contentType, body = FILES.get(self.path, ("text/plain", b"missing"))
                self.send_response(200 if self.path in FILES else 404)
                self.send_header("Content-Type", contentType)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    try:
        yield server
    finally:
        server.close()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def niceness(pid: int) -> int:
    # /proc/PID/stat: the 19th field is the nice value (after the
    # parenthesised command, which may hold spaces).
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_compressionAndImagesInTheRealProcess(
    tmp_path: Path, origin: Origin, notify: NotifyReceiver
) -> None:
    port = freePort()
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = off
image_workers = 1

[listen:plain]
endpoint = tcp:{port}:interface=127.0.0.1

[upstream:origin]
servers = 127.0.0.1:{origin.port}

[route:site]
hosts = *
upstream = origin
compress = zstd, br, gzip
images = avif, webp
"""
    )
    proxy = startTwistd(config, tmp_path, notify)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            status, headers, body = request(sock, "/page.html", "site.test", "Accept-Encoding: br, zstd\r\n")
            assert status == 200
            assert headers["content-encoding"] == "zstd"
            assert headers["vary"] == "Accept-Encoding"
            assert headers["etag"] == 'W/"v1"'
            assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == PAGE

            status, headers, body = request(sock, "/page.html", "site.test", "Accept-Encoding: br\r\n")
            assert brotli.decompress(body) == PAGE

            status, headers, body = request(
                sock, "/photo.jpg", "site.test", "Accept: image/avif,image/webp,*/*\r\n"
            )
            assert status == 200, proxy.output()
            assert headers["content-type"] == "image/avif", proxy.output()
            assert int(headers["content-length"]) == len(body) < len(PHOTO)
            assert headers["vary"] == "Accept"
            image = decode(body)
            assert image.size == (480, 360)
            assert meanDifference(image, decode(PHOTO)) < 4

            status, headers, body = request(sock, "/photo.jpg", "site.test", "Accept: */*\r\n")
            assert headers["content-type"] == "image/jpeg" and body == PHOTO

        [worker] = children(proxy.pid)
        assert b"edgeproxy.content.worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
        assert niceness(worker) == niceness(proxy.pid) + 10
    finally:
        proxy.signal(signal.SIGTERM)
        try:
            proxy.wait(20)
        finally:
            proxy.stop()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker), "the conversion process outlived the proxy"
