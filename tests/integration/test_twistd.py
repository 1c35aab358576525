"""
The real C{twistd --nodaemon --pidfile= edgeproxy --config edge.ini}
process: certificates served per SNI name, ALPN, certificate reload on
SIGHUP (good and bad files), the service manager notifications, draining on
SIGTERM, a bad configuration, the https redirect and socket activation.

Everything listens on 127.0.0.1, certificates are made at test time, and
every wait is bounded.
"""

from __future__ import annotations

import datetime
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.certutil import CertificateAuthority, IssuedCertificate
from tests.proc import (
    startTwistd,
    Backend,
    H2Client,
    NotifyReceiver,
    Twistd,
    freePort,
    handshake,
    payload,
    readResponse,
    refused,
    request,
    socketActivationPrefix,
    tlsConnection,
)

START_TIMEOUT = 30.0


@dataclass
class Site:
    """Files and ports of one proxy set-up in a temporary directory."""

    workdir: Path
    config: Path
    ca: CertificateAuthority
    cafile: Path
    certdir: Path
    default: IssuedCertificate
    exact: IssuedCertificate
    wildcard: IssuedCertificate
    httpsPort: int
    httpPort: int
    backend: Backend


def writeConfig(
    site_workdir: Path,
    httpsEndpoint: str,
    httpEndpoint: str,
    backendPort: int,
    shutdownTimeout: str = "10s",
    accessLogFormat: str = "json",
    redirectPort: int | None = None,
) -> Path:
    redirect = f"redirect_port = {redirectPort}" if redirectPort is not None else ""
    config = site_workdir / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = access.log
access_log_format = {accessLogFormat}
shutdown_timeout = {shutdownTimeout}

[tls]
certificates = certs/
default = certs/default.pem

[listen:https]
endpoint = {httpsEndpoint}
tls = yes

[listen:http]
endpoint = {httpEndpoint}
redirect_https = yes
{redirect}

[upstream:app]
servers = 127.0.0.1:{backendPort}
response_timeout = 30s

[route:app]
hosts = *
paths = /
upstream = app
"""
    )
    return config


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    ca = CertificateAuthority("edgeproxy integration root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    certdir = tmp_path / "certs"
    certdir.mkdir()
    default = ca.issue(["localhost", "127.0.0.1"])
    exact = ca.issue(["a.example"])
    wildcard = ca.issue(["*.b.example"])
    default.writePEM(certdir / "default.pem")
    exact.writePEM(certdir / "a.pem")
    wildcard.writePEM(certdir / "wild.pem", order="key-last")
    # Within the default 14-day expiry warning.
    ca.issue(
        ["soon.example"],
        notAfter=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3),
    ).writePEM(certdir / "soon.pem")
    backend = Backend(slowSeconds=1.5)
    httpsPort, httpPort = freePort(), freePort()
    config = writeConfig(
        tmp_path,
        f"tcp:{httpsPort}:interface=127.0.0.1",
        f"tcp:{httpPort}:interface=127.0.0.1",
        backend.port,
    )
    try:
        yield Site(tmp_path, config, ca, cafile, certdir, default, exact, wildcard,
                   httpsPort, httpPort, backend)
    finally:
        backend.close()


def start(site: Site, notify: NotifyReceiver, **kwargs: object) -> Twistd:
    return startTwistd(site.config, site.workdir, notify, **kwargs)


@pytest.fixture
def running(site: Site, notify: NotifyReceiver) -> Iterator[Twistd]:
    proc = start(site, notify)
    try:
        yield proc
    finally:
        proc.stop()


def served(site: Site, name: str | None) -> x509.Certificate:
    return handshake(site.httpsPort, name, site.cafile)[0]


def test_readyOnlyAfterListening(site: Site, running: Twistd, notify: NotifyReceiver) -> None:
    ready = notify.received[-1]
    assert b"READY=1" in ready.split(b"\n")
    # READY=1 was the first thing sent, and both ports accept by now.
    assert notify.received[0] == ready
    assert not refused(site.httpsPort)
    assert not refused(site.httpPort)
    output = running.output()
    assert f"127.0.0.1:{site.httpsPort} for [listen:https]" in output
    assert f"127.0.0.1:{site.httpPort} for [listen:http]" in output
    assert "a.example" in output and "*.b.example" in output
    assert f"TLS certificate {site.certdir / 'soon.pem'} for soon.example expires" in output
    assert "Fast paths on for TCP and TLS (Twisted " in output


def test_certificateBySNI(site: Site, running: Twistd) -> None:
    assert served(site, "a.example").serial_number == site.exact.serial
    assert served(site, "A.Example").serial_number == site.exact.serial
    assert served(site, "x.b.example").serial_number == site.wildcard.serial
    # A wildcard covers one label only: two labels down get the default.
    assert served(site, "y.x.b.example").serial_number == site.default.serial
    assert served(site, "unknown.example").serial_number == site.default.serial
    assert served(site, None).serial_number == site.default.serial


def test_alpn(site: Site, running: Twistd) -> None:
    assert handshake(site.httpsPort, "a.example", site.cafile)[1] == "h2"
    assert handshake(site.httpsPort, "a.example", site.cafile, alpn=["http/1.1"])[1] == "http/1.1"


def test_proxiesAndLogsAccess(site: Site, running: Twistd) -> None:
    with tlsConnection(site.httpsPort, "a.example", site.cafile) as conn:
        status, headers, body = request(conn, "/hello?x=1", "a.example", "User-Agent: it\r\n")
    assert (status, body) == (200, b"backend saw /hello?x=1\n")
    log = site.workdir / "access.log"
    deadline = time.monotonic() + 5
    while not log.exists() or "/hello" not in log.read_text():
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["client"] == "127.0.0.1"
    assert (record["method"], record["target"], record["status"]) == ("GET", "/hello?x=1", 200)
    assert record["user_agent"] == "it"
    assert record["host"] == "a.example"
    assert record["bytes"] == len(body)
    # What one looks for when a request was slow or wrong: the request's ID
    # (the one the client got back), the backend that answered (never told
    # to the client), the backend's time and the whole time, the TLS facts.
    assert record["request_id"] == headers["x-request-id"] and len(record["request_id"]) == 32
    assert record["backend"] == f"127.0.0.1:{site.backend.port}"
    assert str(site.backend.port) not in "".join(f"{k}: {v}" for k, v in headers.items())
    assert 0 <= record["ttfb"] <= record["duration"] < 5
    assert (record["tls_version"], record["sni"], record["route"], record["upstream"]) == (
        "1.3", "a.example", "app", "app",
    )


def test_publicPathsServeTLSWithKeepAlive(site: Site, notify: NotifyReceiver) -> None:
    """
    C{fast_paths = off}: the process says so, and serves over Twisted's
    public paths alone (its own TLS transport and TCP connections): a
    request, a 1 MiB response and another request on one kept-alive TLS
    connection, each byte in place.
    """
    text = site.config.read_text().replace("[edgeproxy]\n", "[edgeproxy]\nfast_paths = off\n", 1)
    site.config.write_text(text)
    proc = start(site, notify)
    try:
        assert "Fast paths off, Twisted's public paths throughout ([edgeproxy] fast_paths = off)" in proc.output()
        with tlsConnection(site.httpsPort, "a.example", site.cafile) as conn:
            assert request(conn, "/first", "a.example")[::2] == (200, b"backend saw /first\n")
            status, headers, body = request(conn, "/bytes/1048576", "a.example")
            assert status == 200 and headers["content-length"] == "1048576"
            assert body == payload(1048576)
            assert request(conn, "/last", "a.example")[::2] == (200, b"backend saw /last\n")
        with socket.create_connection(("127.0.0.1", site.httpPort), timeout=5) as plain:
            status, headers, _ = request(plain, "/path", f"localhost:{site.httpPort}")
            assert status == 308
            status, headers, _ = request(plain, "/again", f"localhost:{site.httpPort}")
            assert status == 308
    finally:
        proc.stop()
    assert site.backend.paths == ["/first", "/bytes/1048576", "/last"]


def test_redirectToHTTPS(site: Site, running: Twistd) -> None:
    with socket.create_connection(("127.0.0.1", site.httpPort), timeout=5) as conn:
        status, headers, body = request(conn, "/path?q=1", f"localhost:{site.httpPort}")
    assert status == 308
    assert headers["location"] == f"https://localhost:{site.httpsPort}/path?q=1"


def test_reloadOnSIGHUP(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        alive = proc.alive
        old = served(site, "a.example")
        assert old.serial_number == site.exact.serial
        # A connection opened before the reload...
        with tlsConnection(site.httpsPort, "a.example", site.cafile) as kept:
            status, _, _ = request(kept, "/before", "a.example")
            assert status == 200

            renewed = site.ca.issue(["a.example"])
            renewed.writePEM(site.certdir / "a.pem")
            proc.signal(signal.SIGHUP)
            reloading = notify.waitFor(b"RELOADING=1", 10, alive)
            assert reloading.split(b"\n")[1].startswith(b"MONOTONIC_USEC=")
            notify.waitFor(b"READY=1", 10, alive)
            assert served(site, "a.example").serial_number == renewed.serial
            # The expiry warning is repeated at every reload.
            assert proc.output().count("soon.example expires") == 2
            # ...keeps working, on its old certificate.
            status, _, body = request(kept, "/after", "a.example")
            assert (status, body) == (200, b"backend saw /after\n")
            assert kept.getpeercert(binary_form=True) == old.public_bytes(Encoding.DER)

        # A key that does not belong to the certificate: refused, old kept.
        other = site.ca.issue(["a.example"])
        broken = IssuedCertificate(key=other.key, certificate=site.ca.issue(["a.example"]).certificate)
        broken.writePEM(site.certdir / "a.pem")
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 10, alive)
        notify.waitFor(b"READY=1", 10, alive)
        assert proc.alive()
        assert served(site, "a.example").serial_number == renewed.serial
        proc.waitForOutput("Reload refused, still serving the previous configuration", 5)
        output = proc.output()
        assert str(site.certdir / "a.pem") in output
        assert "does not match" in output
    finally:
        proc.stop()


def test_drainOnSIGTERM(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        idle = tlsConnection(site.httpsPort, "a.example", site.cafile)
        assert request(idle, "/idle", "a.example")[0] == 200
        idleH2 = H2Client(site.httpsPort, "a.example", site.cafile)
        assert idleH2.get("/idle2", "a.example") == (200, b"backend saw /idle2\n")
        result: dict[str, object] = {}

        def slow() -> None:
            try:
                with tlsConnection(site.httpsPort, "a.example", site.cafile, timeout=15) as conn:
                    result["response"] = request(conn, "/slow", "a.example")
            except Exception as e:  # reported by the assertion below
                result["error"] = e

        client = threading.Thread(target=slow)
        client.start()
        assert site.backend.slowStarted.wait(10), "the slow request never reached the backend"
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        notify.waitFor(b"STOPPING=1", 5)
        # The idle keep-alive connection is closed at once...
        idle.settimeout(0.5)
        assert idle.recv(1) == b""
        idle.close()
        # An idle HTTP/2 connection gets GOAWAY (no error), then the close.
        idleH2.sock.settimeout(0.5)
        seen = []
        while True:
            events = idleH2.events()
            if not events:
                break
            seen.extend(events)
        goaway = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
        assert len(goaway) == 1 and goaway[0].error_code == 0
        idleH2.close()
        # ...no new connection is accepted...
        deadline = time.monotonic() + 2
        while not refused(site.httpsPort):
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        # ...and the request in flight completes.
        client.join(15)
        assert "error" not in result, result
        status, headers, body = result["response"]  # type: ignore[misc]
        assert (status, body) == (200, b"backend saw /slow\n")
        assert headers.get("connection") == "close"
        code = proc.wait(10)
        # A complete drain is a clean exit (twistd's own handler would make
        # it death by SIGTERM, 143).
        assert code == 0, proc.output()
        assert time.monotonic() - began < 10
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_shutdownTimeoutAbortsTheRest(site: Site, notify: NotifyReceiver) -> None:
    writeConfig(
        site.workdir,
        f"tcp:{site.httpsPort}:interface=127.0.0.1",
        f"tcp:{site.httpPort}:interface=127.0.0.1",
        site.backend.port,
        shutdownTimeout="300ms",
    )
    site.backend.slowSeconds = 8
    proc = start(site, notify)
    try:
        conn = tlsConnection(site.httpsPort, "a.example", site.cafile, timeout=10)
        conn.sendall(b"GET /slow HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert site.backend.slowStarted.wait(10)
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        with pytest.raises((ConnectionError, OSError)):
            readResponse(conn)
        # Aborted after 300ms, long before the backend's answer.
        assert time.monotonic() - began < 5
        conn.close()
        assert proc.wait(10) == 0
        assert "Shutdown timeout (0.3s) reached: aborting 1 connection(s)" in proc.output()
    finally:
        proc.stop()


def test_badConfigurationExitsBeforeListening(site: Site, notify: NotifyReceiver) -> None:
    text = site.config.read_text().replace("response_timeout = 30s", "response_timeout = soon")
    site.config.write_text(text)
    proc = Twistd(site.config, site.workdir, notify=notify)
    code = proc.wait(30)
    assert code != 0
    stderr = proc.stderrPath.read_text()
    assert str(site.config) in stderr
    assert "[upstream:app] response_timeout" in stderr
    assert refused(site.httpsPort) and refused(site.httpPort)
    with pytest.raises(TimeoutError):
        notify.next(0.2)


def test_badCertificateExitsBeforeListening(site: Site, notify: NotifyReceiver) -> None:
    (site.certdir / "a.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    proc = Twistd(site.config, site.workdir, notify=notify)
    assert proc.wait(30) != 0
    assert str(site.certdir / "a.pem") in proc.stderrPath.read_text()
    assert refused(site.httpsPort)


def test_portInUseExitsNonZero(site: Site, notify: NotifyReceiver) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", site.httpPort))
        squatter.listen(1)
        proc = Twistd(site.config, site.workdir, notify=notify)
        code = proc.wait(30)
    assert code != 0
    output = proc.output()
    assert f"{site.config}: [listen:http] endpoint 'tcp:{site.httpPort}:interface=127.0.0.1':" \
        " cannot listen: Couldn't listen on 127.0.0.1:" in output
    assert "Traceback" not in output
    assert refused(site.httpsPort)
    with pytest.raises(TimeoutError):
        notify.next(0.2)


@pytest.mark.parametrize("domain, host", [("INET", "127.0.0.1"), ("INET6", "::1")])
def test_socketActivation(site: Site, notify: NotifyReceiver, domain: str, host: str) -> None:
    writeConfig(
        site.workdir,
        f"systemd:domain={domain}:name=https",
        f"systemd:domain={domain}:name=http",
        site.backend.port,
        # An adopted socket does not say its port in the configuration.
        redirectPort=site.httpsPort,
    )
    prefix = socketActivationPrefix(
        site.workdir, {"http": site.httpPort, "https": site.httpsPort}, host
    )
    proc = Twistd(site.config, site.workdir, notify=notify, prefix=prefix)
    try:
        notify.waitFor(b"READY=1", START_TIMEOUT, alive=proc.alive)
        certificate = handshake(site.httpsPort, "a.example", site.cafile, host=host)[0]
        assert certificate.serial_number == site.exact.serial
        with socket.create_connection((host, site.httpPort), timeout=5) as conn:
            status, headers, _ = request(conn, "/x", "localhost")
        assert status == 308
        assert headers["location"] == f"https://localhost:{site.httpsPort}/x"
        proc.signal(signal.SIGTERM)
        notify.waitFor(b"STOPPING=1", 5)
        assert proc.wait(15) == 0
    finally:
        proc.stop()


def test_helpOption() -> None:
    from tests.proc import processEnvironment, twistdCommand

    done = subprocess.run(
        [*twistdCommand(), "edgeproxy", "--help"],
        env=processEnvironment(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert b"--config" in done.stdout
