"""
The OpenID Connect login of C{[auth:NAME] type = oidc}, the whole browser
flow, against a real OpenID provider started by the test on 127.0.0.1
(the npm package C{oidc-provider}, installed by C{.ci/run} into
C{tests/integration/oidcprovider}), and a real C{twistd edgeproxy}
serving https.

The browser is a small scripted one (L{Browser}): it follows redirects,
keeps each site's cookies, and submits the provider's login and consent
forms, as a person would.
"""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import Backend, NotifyReceiver, Twistd, freePort, logContaining, startTwistd

PROVIDER = Path(__file__).resolve().parent / "oidcprovider"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (PROVIDER / "node_modules" / "oidc-provider").is_dir(),
    reason="node or the oidc-provider package is not installed (.ci/run installs them)",
)

CLIENT_SECRET = "edge-client-secret-0123456789"


class Browser:
    """Requests with cookies per host, redirects followed by hand."""

    def __init__(self, edgePort: int, cafile: Path) -> None:
        self.edgePort = edgePort
        self.context = ssl.create_default_context(cafile=str(cafile))
        self.cookies: dict[str, dict[str, str]] = {}
        self.setCookies: list[str] = []

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, cookies: bool = True) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "https":
            connection: Any = http.client.HTTPSConnection(host, parts.port, context=self.context, timeout=10)
            raw = socket.create_connection(("127.0.0.1", parts.port or 443), timeout=10)
            connection.sock = self.context.wrap_socket(raw, server_hostname=host)
        else:
            connection = http.client.HTTPConnection(host, parts.port, timeout=10)
        sent = {"Accept": "text/html,application/xhtml+xml"}
        sent.update(headers or {})
        jar = self.cookies.get(host, {})
        if cookies and jar:
            sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in jar.items())
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target or "/", body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        received = {name.lower(): value for name, value in response.getheaders()}
        self.setCookies = response.headers.get_all("Set-Cookie") or []
        for line in self.setCookies:
            pair, _, attributes = line.partition(";")
            name, _, value = pair.strip().partition("=")
            expired = "max-age=0" in attributes.lower() or "1970" in attributes
            if expired or not value:
                self.cookies.setdefault(host, {}).pop(name, None)
            else:
                self.cookies.setdefault(host, {})[name] = value
        connection.close()
        return response.status, received, data

    login = "ann"


class Setup:
    def __init__(self, directory: Path, edgePort: int, backend: Backend, edge: Twistd) -> None:
        self.directory = directory
        self.edgePort = edgePort
        self.backend = backend
        self.edge = edge

    def url(self, path: str) -> str:
        return f"https://app.example:{self.edgePort}{path}"

    def browser(self) -> Browser:
        return Browser(self.edgePort, self.directory / "root.pem")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("edge-oidc")
    root = CertificateAuthority("edge oidc root")
    root.writeCertificate(directory / "root.pem")
    root.issue(["app.example"]).writePEM(directory / "site.pem")
    (directory / "cookie.secret").write_text("c" * 48 + "\n")
    (directory / "client.secret").write_text(CLIENT_SECRET + "\n")
    edgePort, providerPort = freePort(), freePort()
    callback = f"https://app.example:{edgePort}/.edgeproxy/oidc/callback"
    providerLog = directory / "provider.log"
    with providerLog.open("wb") as out:
        provider = subprocess.Popen(
            ["node", "provider.mjs", str(providerPort), "edge", CLIENT_SECRET, callback],
            cwd=PROVIDER, stdout=out, stderr=subprocess.STDOUT,
        )
    backend = Backend()
    notify = NotifyReceiver()
    edge = None
    try:
        deadline = time.monotonic() + 20
        while b"READY" not in providerLog.read_bytes():
            assert time.monotonic() < deadline and provider.poll() is None, providerLog.read_text()
            time.sleep(0.05)
        (directory / "edge.ini").write_text(f"""\
[edgeproxy]
access_log = access.log

[tls]
certificates = site.pem

[listen:https]
endpoint = tcp:{edgePort}:interface=127.0.0.1
tls = yes

[upstream:app]
servers = 127.0.0.1:{backend.port}

[auth:login]
type = oidc
issuer = http://127.0.0.1:{providerPort}
client_id = edge
client_secret_file = client.secret
cookie_secret_file = cookie.secret
scopes = openid email profile
allow_emails = ann@example.com
claims_to_headers = sub:X-Auth-Subject, email:X-Auth-Email

[route:app]
hosts = app.example
upstream = app
auth = login
""")
        edge = startTwistd(directory / "edge.ini", directory, notify)
        yield Setup(directory, edgePort, backend, edge)
    finally:
        if edge is not None:
            edge.stop()
        notify.close()
        backend.close()
        provider.terminate()
        try:
            provider.wait(5)
        except subprocess.TimeoutExpired:
            provider.kill()


def test_nonBrowserGets401(setup: Setup) -> None:
    browser = setup.browser()
    status, headers, _ = browser.request("GET", setup.url("/api"), headers={"Accept": "application/json"})
    assert status == 401
    assert "www-authenticate" in headers


def test_wholeFlow(setup: Setup) -> None:
    browser = setup.browser()
    # 1. The login redirect, with the login cookie.
    status, headers, _ = browser.request("GET", setup.url("/page?x=1"))
    assert status == 302
    location = headers["location"]
    assert location.startswith("http://127.0.0.1:")
    query = dict(pair.split("=", 1) for pair in urlsplit(location).query.split("&"))
    assert query["code_challenge_method"] == "S256" and query["state"] and query["nonce"]
    [flowCookie] = browser.setCookies
    assert "HttpOnly" in flowCookie and "Secure" in flowCookie and "SameSite=Lax" in flowCookie
    assert "Path=/.edgeproxy/oidc/callback" in flowCookie
    # 2. At the provider: login and consent, back to the callback.
    loginCookie = dict(browser.cookies["app.example"])
    status, headers, _ = _untilCallback(browser, location)
    callback = headers["__url"]
    assert "/.edgeproxy/oidc/callback?" in callback
    # 3. The callback: the session cookie, back to the page asked for.
    status, headers, _ = browser.request("GET", callback)
    assert status == 302, headers
    assert headers["location"] == "/page?x=1"
    session = next(line for line in browser.setCookies if line.startswith("edgeproxy_session="))
    assert all(part in session for part in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"))
    # 4. Access: the backend sees who, never the session cookie.
    status, _, body = browser.request("GET", setup.url("/page?x=1"), headers={"X-Auth-Subject": "root"})
    assert status == 200 and body == b"backend saw /page?x=1\n"
    log = logContaining(setup.directory / "access.log", '"GET /page?x=1 HTTP/1.1" 200', " - ann [")
    assert '"GET /page?x=1 HTTP/1.1" 200' in log and " - ann [" in log
    # 5. A replayed callback is refused, with its login cookie or without.
    replay = Browser(setup.edgePort, setup.directory / "root.pem")
    replay.cookies["app.example"] = loginCookie
    assert replay.request("GET", callback)[0] == 403
    assert setup.browser().request("GET", callback)[0] == 403
    # 6. A tampered session cookie is no session.
    tampered = setup.browser()
    value = browser.cookies["app.example"]["edgeproxy_session"]
    tampered.cookies["app.example"] = {"edgeproxy_session": value[:-3] + ("AAA" if value[-3:] != "AAA" else "BBB")}
    assert tampered.request("GET", setup.url("/page"))[0] == 302
    assert tampered.request("GET", setup.url("/page"), headers={"Accept": "*/*"})[0] == 401
    # 7. Logout: the session is gone, the next page asks for a login again.
    status, headers, _ = browser.request("GET", setup.url("/.edgeproxy/oidc/logout"))
    assert status == 302 and "/session/end" in headers["location"]
    assert "edgeproxy_session" not in browser.cookies.get("app.example", {})
    assert browser.request("GET", setup.url("/page"))[0] == 302


def _untilCallback(browser: Browser, url: str) -> tuple[int, dict[str, str], bytes]:
    """Follow the provider until it sends the browser back to the edge."""
    method, body, headers = "GET", None, {}
    for _ in range(15):
        if url.startswith("https://app.example"):
            return 302, {"__url": url}, b""
        status, received, data = browser.request(method, url, body, headers)
        if status in (302, 303):
            url = urljoin(url, received["location"])
            method, body, headers = "GET", None, {}
            continue
        form = re.search(rb'<form[^>]*action="([^"]+)"', data)
        assert status == 200 and form is not None, (status, data[:500])
        values = {k.decode(): v.decode() for k, v in re.findall(rb'name="([^"]+)" value="([^"]*)"', data)}
        if values.get("prompt") == "login":
            values.update(login=browser.login, password="any")
        url = urljoin(url, form.group(1).decode())
        method, body = "POST", urlencode(values).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    raise AssertionError("the provider never sent the browser back")


def test_userNotAllowed(setup: Setup) -> None:
    browser = setup.browser()
    browser.login = "bob"
    status, headers, _ = browser.request("GET", setup.url("/"))
    _, found, _ = _untilCallback(browser, headers["location"])
    assert browser.request("GET", found["__url"])[0] == 403
    log = logContaining(setup.directory / "access.log", 'rule="auth login: e-mail address not allowed"')
    assert 'rule="auth login: e-mail address not allowed"' in log
