"""
Custom error pages, a redirect route and a route's own timeout on the real
C{twistd edgeproxy} process over 127.0.0.1: the pages are served for the
errors the proxy makes (no route, a backend that cannot be reached, a
backend too slow), a backend's own error passes as it is, a changed page
is served after C{SIGHUP}, and a page that cannot be read refuses the
reload and keeps the running pages.

The backend is a small threaded server in this process; every wait is
bounded.
"""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proc import NotifyReceiver, Twistd, freePort, startTwistd

TIMEOUT = 10.0


class Origin:
    """C{/status/NNN} answers NNN with its own body, C{/slow} after 3 s,
    anything else 200; every path is recorded."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                origin.paths.append(self.path)
                status = 200
                if self.path.startswith("/status/"):
                    status = int(self.path.rsplit("/", 1)[1])
                if self.path == "/slow":
                    time.sleep(3)
                body = f"origin {status} for {self.path}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@dataclass
class Site:
    workdir: Path
    port: int
    origin: Origin


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "404.html").write_text("<h1>Nothing here</h1>\n")
    (errors / "5xx.html").write_text("<h1>We are down</h1>\n")
    (tmp_path / "api-errors").mkdir()
    (tmp_path / "api-errors" / "5xx.json").write_text('{"error": "unavailable"}\n')
    origin = Origin()
    port = freePort()
    (tmp_path / "edge.ini").write_text(
        f"""
[edgeproxy]
access_log = off
error_pages = errors

[listen:http]
endpoint = tcp:{port}:interface=127.0.0.1

[upstream:live]
servers = 127.0.0.1:{origin.port}

[upstream:dead]
servers = 127.0.0.1:{freePort()}

[route:app]
hosts = app.example
upstream = live
response_timeout = 1s

[route:api]
hosts = app.example
paths = /api
upstream = dead
error_pages = api-errors

[route:www]
hosts = www.example
redirect = https://app.example$request_uri
"""
    )
    try:
        yield Site(tmp_path, port, origin)
    finally:
        origin.close()


def get(site: Site, path: str, host: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def start(site: Site, notify: NotifyReceiver) -> Twistd:
    return startTwistd(site.workdir / "edge.ini", site.workdir, notify)


def reload(proc: Twistd, notify: NotifyReceiver) -> None:
    proc.signal(signal.SIGHUP)
    notify.waitFor(b"RELOADING=1", TIMEOUT, proc.alive)
    notify.waitFor(b"READY=1", TIMEOUT, proc.alive)


def test_errorPagesRedirectAndTimeout(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        status, fields, body = get(site, "/", "nowhere.example")
        assert (status, body) == (404, b"<h1>Nothing here</h1>\n")
        assert fields["content-type"] == "text/html; charset=utf-8"
        assert fields["cache-control"] == "no-store"

        status, fields, body = get(site, "/api/orders", "app.example")
        assert (status, body) == (502, b'{"error": "unavailable"}\n')
        assert fields["content-type"] == "application/json"

        # The backend's own errors are its own.
        assert get(site, "/status/503", "app.example")[::2] == (503, b"origin 503 for /status/503\n")

        # One backend, too slow for the route's 1 s: one attempt, then the
        # page (not 3 attempts and 3 s).
        started = time.monotonic()
        status, _, body = get(site, "/slow", "app.example")
        assert (status, body) == (504, b"<h1>We are down</h1>\n")
        assert time.monotonic() - started < 2.5
        assert site.origin.paths.count("/slow") == 1

        status, fields, body = get(site, "/a/b?c=d", "www.example")
        assert status == 301 and fields["location"] == "https://app.example/a/b?c=d"
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_pagesFollowReloadsAndABadPageKeepsTheRunningOnes(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        (site.workdir / "errors" / "404.html").write_text("<h1>Moved on</h1>\n")
        config = site.workdir / "edge.ini"
        config.write_text(
            config.read_text().replace("https://app.example$request_uri", "https://new.example$path")
        )
        reload(proc, notify)
        assert get(site, "/", "nowhere.example")[::2] == (404, b"<h1>Moved on</h1>\n")
        assert get(site, "/a?b", "www.example")[1]["location"] == "https://new.example/a"

        # A page that is not a regular file: the reload is refused, and the
        # pages read before stay.
        page = site.workdir / "errors" / "404.html"
        page.unlink()
        os.mkfifo(page)
        reload(proc, notify)
        proc.waitForOutput("Reload refused", 5)
        assert "[edgeproxy] error_pages" in proc.output()
        assert get(site, "/", "nowhere.example")[::2] == (404, b"<h1>Moved on</h1>\n")
        assert proc.alive()
    finally:
        proc.stop()
