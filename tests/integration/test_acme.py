"""
Automatic certificates against a real CA: Pebble and its mock DNS
(C{tests.pebble}), started on 127.0.0.1 and validating against a real
C{twistd edgeproxy}.  What is checked is what a user sees: the certificate
a handshake gets (and that it verifies against Pebble's root), the
validation requests answered on the wire, the files in C{storage}, the log
lines, C{/status} and C{/metrics}.

One Pebble serves the whole module (its HTTP-01 and TLS-ALPN-01 ports are
fixed when it starts, so every test's proxy listens on those two ports);
each test has its own storage, so its own account.  Pebble issues
certificates valid for one day: the renewal test uses a C{renew_before}
just under that to make a renewal due seconds after the first issuance.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.certutil import CertificateAuthority
from tests.pebble import Pebble, needsPebble
from tests.proc import (
    Backend,
    NotifyReceiver,
    Twistd,
    freePort,
    handshake,
    request,
    startTwistd,
    tlsConnection,
)

pytestmark = needsPebble

VALIDITY = 86400
"""Seconds Pebble's certificates are valid for."""

ISSUE_TIMEOUT = 30.0


@dataclass
class CA:
    pebble: Pebble
    httpPort: int
    tlsPort: int


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    httpPort, tlsPort = freePort(), freePort()
    pebble = Pebble(tmp_path_factory.mktemp("ca"), httpPort, tlsPort, validity=VALIDITY)
    try:
        yield CA(pebble, httpPort, tlsPort)
    finally:
        pebble.stop()


@dataclass
class Proxy:
    process: Twistd
    workdir: Path
    root: Path
    admin: int

    def status(self) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        connection.request("GET", "/status")
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())  # type: ignore[no-any-return]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def waitFor(self, text: str, timeout: float = ISSUE_TIMEOUT, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.process.output().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged {count} time(s) within {timeout}s:\n{self.process.output()}")
            if not self.process.alive():
                raise AssertionError(f"twistd exited:\n{self.process.output()}")
            time.sleep(0.1)


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def writeSite(workdir: Path, ca: CA, acme: str, *, plain: bool = True, workers: int = 1,
              hosts: str = "app.test", backendPort: int = 9, tlsListener: str = "") -> tuple[Path, Path]:
    """An edge.ini with a self-signed default certificate, the two listeners
    Pebble validates against, an admin listener, and C{acme} lines
    (C{tlsListener}: more lines for the TLS listener)."""
    fallbackRoot = CertificateAuthority("fallback root")
    fallbackRoot.writeCertificate(workdir / "fallback-root.pem")
    fallbackRoot.issue(["fallback.invalid"]).writePEM(workdir / "default.pem")
    root = ca.pebble.writeRoot(workdir / "pebble-root.pem")
    http = f"""
[listen:http]
endpoint = tcp:{ca.httpPort}:interface=127.0.0.1
redirect_https = yes
""" if plain else ""
    config = workdir / "edge.ini"
    config.write_text(f"""
[edgeproxy]
workers = {workers}
admin = tcp:0:interface=127.0.0.1
shutdown_timeout = 5s

[tls]
certificates = default.pem

[acme]
directory = {ca.pebble.directory}
directory_ca = {ca.pebble.caFile}
storage = state
{acme}

[listen:https]
endpoint = tcp:{ca.tlsPort}:interface=127.0.0.1
tls = yes
{tlsListener}
{http}
[upstream:app]
servers = 127.0.0.1:{backendPort}

[route:app]
hosts = {hosts}
upstream = app
""")
    return config, root


def start(workdir: Path, config: Path, root: Path, notify: NotifyReceiver) -> Proxy:
    process = startTwistd(config, workdir, notify)
    deadline = time.monotonic() + 10
    while True:
        found = re.search(r"Admin (?:listening on|listener on) 127\.0\.0\.1:(\d+)", process.output())
        if found:
            break
        if time.monotonic() > deadline:
            process.stop()
            raise AssertionError(process.output())
        time.sleep(0.05)
    return Proxy(process, workdir, root, int(found.group(1)))


def issuedBy(certificate: x509.Certificate, name: str) -> bool:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return name in names.get_values_for_type(x509.DNSName) and "Pebble" in certificate.issuer.rfc4514_string()


def test_firstIssuanceByHTTP01ThenARestartReusesIt(ca: CA, tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    HTTP-01 through a redirecting plain listener: the token is answered
    (not redirected), the certificate is swapped in and verifies against
    Pebble's root, stored with its key 0600, shown in /status and counted.
    A restart serves the stored certificate without a new order.
    """
    config, root = writeSite(tmp_path, ca, "challenges = http-01")
    proxy = start(tmp_path, config, root, notify)
    try:
        # Until it arrives (or if it never does), the default certificate.
        proxy.waitFor("ACME: new certificate for app.test swapped in")
        certificate, _ = handshake(ca.tlsPort, "app.test", root)
        assert issuedBy(certificate, "app.test")
        output = proxy.process.output()
        assert re.search(r'"GET /\.well-known/acme-challenge/[A-Za-z0-9_-]+ HTTP/1\.1" 200 ', output)
        # The listener still redirects everything else.
        with socket.create_connection(("127.0.0.1", ca.httpPort), timeout=5) as plain:
            status, headers, _ = request(plain, "/.well-known/acme-challenge/unknown-token-000000000", "app.test")
        assert status == 308
        folder = tmp_path / "state" / "certificates"
        [key] = list(folder.glob("*/app.test/key.pem"))
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        [accountKey] = list((tmp_path / "state" / "accounts").glob("*/account.key"))
        assert stat.S_IMODE(accountKey.stat().st_mode) == 0o600
        document = proxy.status()
        [entry] = [c for c in document["certificates"] if c["names"] == ["app.test"]]
        assert entry["source"] == "acme" and "Pebble" in entry["issuer"]
        assert entry["next_renewal"] > time.time() and entry["last_error"] is None
        assert entry["ocsp"] is None  # Pebble's certificates name no responder
        [default] = [c for c in document["certificates"] if c["default"]]
        assert default["source"] == "file"
        assert document["acme"]["directory"] == ca.pebble.directory
        samples = proxy.metrics()
        assert metric(samples, "edgeproxy_acme_orders_total", kind="new") == 1
        assert metric(samples, "edgeproxy_acme_certificates_total", kind="new") == 1
        serial = certificate.serial_number
    finally:
        proxy.process.stop()

    notify2 = NotifyReceiver()
    try:
        proxy = start(tmp_path, config, root, notify2)
        try:
            # Served from storage as soon as the listener is up.
            certificate, _ = handshake(ca.tlsPort, "app.test", root)
            assert certificate.serial_number == serial
            time.sleep(1.0)
            assert "ACME: ordering" not in proxy.process.output()
            samples = proxy.metrics()
            assert metric(samples, "edgeproxy_acme_orders_total", kind="new") == 0
        finally:
            proxy.process.stop()
    finally:
        notify2.close()


@pytest.mark.parametrize("clientCertificates", [None, "require"])
def test_firstIssuanceByTLSALPN01(ca: CA, tmp_path: Path, notify: NotifyReceiver,
                                  clientCertificates: str | None) -> None:
    """
    TLS-ALPN-01 on the TLS listener alone: no plain listener at all.  A
    listener requiring client certificates answers the validation (which
    has none) all the same, and still requires one from everyone else.
    """
    tlsListener = ""
    member = tmp_path / "member.pem"
    if clientCertificates is not None:
        clientCA = CertificateAuthority("client CA")
        clientCA.writeCertificate(tmp_path / "clients.pem")
        clientCA.issue(["member.test"], clientAuth=True).writePEM(member)
        tlsListener = f"client_ca = clients.pem\nclient_certificates = {clientCertificates}"
    config, root = writeSite(tmp_path, ca, "challenges = tls-alpn-01", plain=False, tlsListener=tlsListener)
    proxy = start(tmp_path, config, root, notify)
    try:
        proxy.waitFor("ACME: new certificate for app.test swapped in")
        if clientCertificates is None:
            certificate, alpn = handshake(ca.tlsPort, "app.test", root)
        else:
            context = ssl.create_default_context(cafile=str(root))
            context.check_hostname = False
            context.set_alpn_protocols(["h2", "http/1.1"])
            context.load_cert_chain(str(member))
            with socket.create_connection(("127.0.0.1", ca.tlsPort), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="app.test") as tls:
                    certificate = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                    alpn = tls.selected_alpn_protocol()
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            # Without a certificate: refused (TLS 1.3 tells after the handshake).
            stranger = ssl.create_default_context(cafile=str(root))
            stranger.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with socket.create_connection(("127.0.0.1", ca.tlsPort), timeout=5) as raw:
                    with stranger.wrap_socket(raw, server_hostname="app.test") as tls:
                        tls.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
                        tls.recv(1)
        assert issuedBy(certificate, "app.test")
        assert alpn == "h2"
        # The challenge certificate went to the validation only.
        assert "acme-tls" not in proxy.process.output().split("swapped in")[-1]
    finally:
        proxy.process.stop()


def test_renewalSwappedWhileAConnectionStaysOpen(ca: CA, tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    A renew_before just under Pebble's validity makes the renewal due
    seconds after the first issuance; the renewed certificate is served to
    new handshakes while a connection made on the first one keeps working
    (it keeps being answered: 421 for a host its certificate is not for,
    an answer the proxy makes itself).
    """
    backend = Backend()
    try:
        config, root = writeSite(
            tmp_path, ca, f"challenges = http-01\nrenew_before = {VALIDITY - 6}s", backendPort=backend.port
        )
        proxy = start(tmp_path, config, root, notify)
        try:
            proxy.waitFor("ACME: new certificate for app.test swapped in")
            held = tlsConnection(ca.tlsPort, "app.test", root)
            try:
                first = x509.load_der_x509_certificate(held.getpeercert(binary_form=True))
                status, _, _ = request(held, "/before", "elsewhere.test")
                assert status == 421
                proxy.waitFor("ACME: renewed certificate for app.test swapped in")
                renewed, _ = handshake(ca.tlsPort, "app.test", root)
                assert issuedBy(renewed, "app.test")
                assert renewed.serial_number != first.serial_number
                # The connection made before the swap was not disturbed.
                status, _, _ = request(held, "/after", "elsewhere.test")
                assert status == 421
            finally:
                held.close()
            samples = proxy.metrics()
            assert metric(samples, "edgeproxy_acme_certificates_total", kind="renewal") >= 1
        finally:
            proxy.process.stop()
    finally:
        backend.close()


def test_caUnreachable(ca: CA, tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    A CA nobody answers for: the proxy starts and serves the default
    certificate, the failure is logged, counted and shown, and retried later.
    """
    closed = freePort()
    config, root = writeSite(tmp_path, ca, "challenges = http-01")
    config.write_text(config.read_text().replace(ca.pebble.directory, f"https://127.0.0.1:{closed}/dir"))
    proxy = start(tmp_path, config, root, notify)
    try:
        proxy.waitFor("ACME: app.test: account: cannot reach the CA")
        certificate, _ = handshake(ca.tlsPort, "app.test", tmp_path / "fallback-root.pem")
        assert certificate.subject.rfc4514_string() == "CN=fallback.invalid"
        document = proxy.status()
        [state] = document["acme"]["names"]
        assert state["name"] == "app.test" and "cannot reach the CA" in state["last_error"]
        assert state["retry_at"] > time.time() + 30
        assert metric(proxy.metrics(), "edgeproxy_acme_failures_total", problem="other") == 1
        assert "next in 60s" in proxy.process.output()
    finally:
        proxy.process.stop()


def test_failingChallenge(ca: CA, tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    HTTP-01 without a plain listener: the CA cannot connect; its problem
    document is logged once per attempt, the failure counted by problem
    type, and the default certificate stays.
    """
    config, root = writeSite(tmp_path, ca, "challenges = http-01", plain=False)
    proxy = start(tmp_path, config, root, notify)
    try:
        proxy.waitFor("validation failed")
        output = proxy.process.output()
        assert "urn:ietf:params:acme:error:connection" in output
        assert output.count("validation failed") == 1
        certificate, _ = handshake(ca.tlsPort, "app.test", tmp_path / "fallback-root.pem")
        assert certificate.subject.rfc4514_string() == "CN=fallback.invalid"
        [state] = proxy.status()["acme"]["names"]
        assert "urn:ietf:params:acme:error:connection" in state["last_error"]
        assert metric(proxy.metrics(), "edgeproxy_acme_failures_total", problem="unauthorized") + metric(
            proxy.metrics(), "edgeproxy_acme_failures_total", problem="connection") == 1
    finally:
        proxy.process.stop()


def test_twoWorkers(ca: CA, tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    workers = 2: the supervisor orders, whichever worker the CA reaches
    answers, and both workers swap the certificate in.
    """
    config, root = writeSite(tmp_path, ca, "challenges = http-01", workers=2)
    proxy = start(tmp_path, config, root, notify)
    try:
        proxy.waitFor("ACME: new certificate for app.test swapped in")
        proxy.waitFor("edgeproxy.acme.worker#info] ACME: certificate for app.test swapped in", count=2)
        output = proxy.process.output()
        assert "[worker 1 edgeproxy.acme.worker#info] ACME: certificate for app.test swapped in" in output
        assert "[worker 2 edgeproxy.acme.worker#info] ACME: certificate for app.test swapped in" in output
        assert "[worker 1 edgeproxy.acme.manager" not in output and "[worker 2 edgeproxy.acme.manager" not in output
        for _ in range(6):
            certificate, _ = handshake(ca.tlsPort, "app.test", root)
            assert issuedBy(certificate, "app.test")
    finally:
        proxy.process.stop()


class AskService:
    """The on-demand ask service: 200 for the names in C{allowed}, 403 else."""

    def __init__(self, allowed: set[str]) -> None:
        self.asked: list[str] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                domain = self.path.partition("domain=")[2]
                service.asked.append(domain)
                self.send_response(200 if domain in allowed else 403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("workers", [1, 2])
def test_onDemandAskAllowsOneNameAndRefusesAnother(
    ca: CA, tmp_path: Path, notify: NotifyReceiver, workers: int
) -> None:
    """
    on_demand: the handshake for a name the ask service allows waits for its
    certificate and gets it; a refused name gets the default certificate at
    once, and nothing is ordered for it.  With two workers the supervisor
    orders, and the worker whose handshake waited serves the new
    certificate once it has read it from storage.
    """
    ask = AskService({"yes.test"})
    try:
        config, root = writeSite(
            tmp_path, ca,
            f"challenges = tls-alpn-01\non_demand = yes\nask = http://127.0.0.1:{ask.port}/check",
            plain=False, hosts="*", workers=workers,
        )
        proxy = start(tmp_path, config, root, notify)
        try:
            certificate, _ = handshake(ca.tlsPort, "yes.test", root, timeout=ISSUE_TIMEOUT)
            assert issuedBy(certificate, "yes.test")
            refusedAt = time.monotonic()
            certificate, _ = handshake(ca.tlsPort, "no.test", tmp_path / "fallback-root.pem")
            assert time.monotonic() - refusedAt < 5
            assert certificate.subject.rfc4514_string() == "CN=fallback.invalid"
            assert ask.asked == ["yes.test", "no.test"]
            output = proxy.process.output()
            assert "no.test refused by the ask service (HTTP 403)" in output
            assert "ordering a certificate for no.test" not in output
            # Known now: no second question, no second order.
            certificate, _ = handshake(ca.tlsPort, "yes.test", root)
            assert issuedBy(certificate, "yes.test")
            assert ask.asked == ["yes.test", "no.test"]
        finally:
            proxy.process.stop()
    finally:
        ask.close()
