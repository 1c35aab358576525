"""
The admin listener of a real C{twistd edgeproxy} process: C{/status},
C{/metrics} and the drain/enable actions, with every port (proxy listeners
and admin) bound on 127.0.0.1:0 and found in the log, certificates made at
test time, and every wait bounded.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.certutil import CertificateAuthority
from tests.proc import Backend, H2Client, NotifyReceiver, Twistd

START_TIMEOUT = 30.0
TIMEOUT = 10.0
TOKEN = "integration-admin-token-0123456789"


@dataclass
class Proxy:
    process: Twistd
    cafile: Path
    backend: Backend
    https: int
    plain: int
    admin: int

    def admin_(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=TIMEOUT)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def status(self) -> dict[str, Any]:
        code, _, body = self.admin_("GET", "/status")
        assert code == 200
        return json.loads(body)  # type: ignore[no-any-return]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, headers, body = self.admin_("GET", "/metrics")
        assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def proxied(self, path: str = "/") -> int:
        context = ssl.create_default_context(cafile=str(self.cafile))
        context.set_alpn_protocols(["http/1.1"])
        connection = http.client.HTTPSConnection("127.0.0.1", self.https, timeout=TIMEOUT, context=context)
        try:
            connection.request("GET", path, headers={"Host": "localhost"})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


def loggedPort(process: Twistd, pattern: str) -> int:
    match = re.search(pattern, process.output())
    assert match, f"{pattern!r} not in the log:\n{process.output()}"
    return int(match.group(1))


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    ca = CertificateAuthority("admin integration root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    certdir = tmp_path / "certs"
    certdir.mkdir()
    ca.issue(["localhost", "127.0.0.1"]).writePEM(certdir / "default.pem")
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    backend = Backend()
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = off
admin = tcp:0:interface=127.0.0.1
admin_token_file = admin.token

[tls]
certificates = certs/
default = certs/default.pem

[listen:https]
endpoint = tcp:0:interface=127.0.0.1
tls = yes

[listen:plain]
endpoint = tcp:0:interface=127.0.0.1
tls = no

[upstream:app]
servers = 127.0.0.1:{backend.port}

[route:app]
hosts = *
paths = /
upstream = app
"""
    )
    notify = NotifyReceiver()
    process = Twistd(config, tmp_path, notify=notify)
    try:
        try:
            notify.waitFor(b"READY=1", START_TIMEOUT, alive=process.alive)
            process.waitForOutput("Admin listening on", TIMEOUT)
        except Exception:
            raise AssertionError(f"twistd did not start:\n{process.output()}")
        yield Proxy(
            process,
            cafile,
            backend,
            https=loggedPort(process, r"Listening on 127\.0\.0\.1:(\d+) for \[listen:https\]"),
            plain=loggedPort(process, r"Listening on 127\.0\.0\.1:(\d+) for \[listen:plain\]"),
            admin=loggedPort(process, r"Admin listening on 127\.0\.0\.1:(\d+)"),
        )
    finally:
        process.stop()
        notify.close()
        backend.close()


def get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def test_statusMetricsAndActions(proxy: Proxy) -> None:
    status = proxy.status()
    assert status["pid"] == proxy.process.pid
    assert [(l["name"], l["tls"], l["address"]) for l in status["listeners"]] == [
        ("https", True, f"127.0.0.1:{proxy.https}"),
        ("plain", False, f"127.0.0.1:{proxy.plain}"),
    ]
    assert [c["names"] for c in status["certificates"]] == [["localhost", "127.0.0.1"]]
    [backend] = status["upstreams"]["app"]["backends"]
    assert (backend["address"], backend["state"]) == (f"127.0.0.1:{proxy.backend.port}", "up")

    # Traffic, and what /metrics says about it.
    assert proxy.proxied("/one") == 200
    h2 = H2Client(proxy.https, "localhost", proxy.cafile, timeout=TIMEOUT)
    try:
        assert h2.get("/h2", "localhost")[0] == 200
    finally:
        h2.close()
    untrusting = ssl.create_default_context()  # the system store does not know our CA
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", proxy.https), timeout=TIMEOUT) as raw:
            untrusting.wrap_socket(raw, server_hostname="localhost")
    samples = proxy.metrics()
    assert get(samples, "edgeproxy_requests_total", route="app", upstream="app", code="2xx") == 2
    assert get(samples, "edgeproxy_request_duration_seconds_count", route="app") == 2
    assert get(samples, "edgeproxy_upstream_response_seconds_count", upstream="app") == 2
    assert get(samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.3", alpn="http/1.1") == 1
    assert get(samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.3", alpn="h2") == 1
    assert get(samples, "edgeproxy_tls_handshake_failures_total", listener="https", reason="other") == 1
    assert get(samples, "edgeproxy_connections_total", listener="https") == 3
    assert (get(samples, "edgeproxy_sent_bytes_total", listener="https") or 0) > 0
    assert get(samples, "edgeproxy_backend_state", upstream="app",
               backend=f"127.0.0.1:{proxy.backend.port}", state="up") == 1
    assert (get(samples, "edgeproxy_certificate_expiry_timestamp_seconds", name="localhost",
                file=str(status["certificates"][0]["file"])) or 0) > 0

    # Actions: the token from admin_token_file, and their effect on traffic.
    address = f"127.0.0.1:{proxy.backend.port}"
    code, headers, _ = proxy.admin_("POST", f"/upstreams/app/backends/{address}/drain")
    assert code == 401 and headers["www-authenticate"].startswith("Bearer")
    code, _, body = proxy.admin_("POST", f"/upstreams/app/backends/{address}/drain",
                                 {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and json.loads(body)["state"] == "draining"
    assert proxy.proxied("/two") == 503
    assert proxy.status()["upstreams"]["app"]["backends"][0]["state"] == "draining"
    code, _, body = proxy.admin_("POST", f"/upstreams/app/backends/{address}/enable",
                                 {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and json.loads(body)["state"] == "up"
    assert proxy.proxied("/three") == 200
    output = proxy.process.output()
    assert f"admin: 127.0.0.1:" in output and f"drain backend {address} of upstream app" in output
    assert TOKEN not in output
