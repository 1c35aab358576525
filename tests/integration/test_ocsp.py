"""
OCSP stapling in a real C{twistd edgeproxy}: a local responder (built with
cryptography's OCSP builder) answers C{good}, C{revoked} or an expired
C{good} for three certificates; a client asking for the status (pyOpenSSL)
gets a staple for the first only.  A certificate naming no responder gets
no staple and puts no OCSP line in the log.
"""

from __future__ import annotations

import datetime
import http.server
import select
import socket
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL

from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, freePort, startTwistd
from tests.test_tls_ocsp import withResponder


class Responder:
    """Answers for a certificate by the path its AIA names: /good, /revoked, /expired."""

    def __init__(self, issuer: CertificateAuthority) -> None:
        self.requests: list[str] = []
        self.certificates: dict[int, x509.Certificate] = {}
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ocsp.load_der_ocsp_request(body)
                responder.requests.append(self.path)
                leaf = responder.certificates[request.serial_number]
                now = datetime.datetime.now(datetime.timezone.utc)
                status = ocsp.OCSPCertStatus.REVOKED if self.path == "/revoked" else ocsp.OCSPCertStatus.GOOD
                thisUpdate, nextUpdate = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
                if self.path == "/expired":
                    thisUpdate, nextUpdate = now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)
                answer = ocsp.OCSPResponseBuilder().add_response(
                    cert=leaf, issuer=issuer.certificate, algorithm=hashes.SHA1(), cert_status=status,
                    this_update=thisUpdate, next_update=nextUpdate,
                    revocation_time=now - datetime.timedelta(days=1) if status == ocsp.OCSPCertStatus.REVOKED else None,
                    revocation_reason=None,
                ).responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.certificate).sign(issuer.key, hashes.SHA256())
                data = answer.public_bytes(serialization.Encoding.DER)
                self.send_response(200)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stapled(port: int, name: str) -> bytes:
    """The OCSP response stapled to a handshake for C{name} (b"" for none)."""
    got: list[bytes] = []

    def callback(connection: SSL.Connection, data: bytes, _: object) -> bool:
        got.append(data)
        return True

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_ocsp_client_callback(callback)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(name.encode())
        connection.request_ocsp()
        connection.set_connect_state()
        deadline = time.monotonic() + 5
        while True:
            try:
                connection.do_handshake()
                break
            except SSL.WantReadError:
                assert time.monotonic() < deadline, "handshake timed out"
                select.select([raw], [], [], 0.5)
    return got[0] if got else b""


def test_goodRevokedExpired(tmp_path: Path, notify: NotifyReceiver) -> None:
    root = CertificateAuthority("ocsp root")
    issuer = root.intermediate("ocsp issuing CA")
    responder = Responder(issuer)
    try:
        certs = tmp_path / "certs"
        certs.mkdir()
        for kind in ("good", "revoked", "expired"):
            leaf = withResponder(issuer, [f"{kind}.example"], f"http://127.0.0.1:{responder.port}/{kind}")
            responder.certificates[leaf.certificate.serial_number] = leaf.certificate
            leaf.writePEM(certs / f"{kind}.pem")
        issuer.issue(["plain.example"]).writePEM(certs / "plain.pem")
        port = freePort()
        config = tmp_path / "edge.ini"
        config.write_text(f"""
[tls]
certificates = certs
default = certs/plain.pem

[listen:https]
endpoint = tcp:{port}:interface=127.0.0.1
tls = yes

[upstream:app]
servers = 127.0.0.1:9

[route:app]
hosts = *
upstream = app
""")
        process = startTwistd(config, tmp_path, notify)
        try:
            deadline = time.monotonic() + 10
            while process.output().count("OCSP: ") < 3:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.05)
            good = ocsp.load_der_ocsp_response(stapled(port, "good.example"))
            assert good.certificate_status == ocsp.OCSPCertStatus.GOOD
            assert good.serial_number == x509.load_pem_x509_certificate((certs / "good.pem").read_bytes()).serial_number
            assert stapled(port, "revoked.example") == b""
            assert stapled(port, "expired.example") == b""
            assert stapled(port, "plain.example") == b""
            output = process.output()
            assert "OCSP: stapling a good response for good.example" in output
            assert "OCSP: no staple for revoked.example" in output and "REVOKED" in output
            assert "OCSP: no staple for expired.example" in output and "expired at" in output
            assert not [line for line in output.splitlines() if "OCSP" in line and "plain.example" in line]
            assert sorted(responder.requests) == ["/expired", "/good", "/revoked"]
        finally:
            process.stop()
    finally:
        responder.close()
