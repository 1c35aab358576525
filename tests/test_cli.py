"""
Tests for L{edgeproxy.cli}: C{edgeproxy check} as an operator runs it, with
configurations and certificates made in temporary directories.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeproxy import __version__
from edgeproxy.cli import EXIT_INVALID, EXIT_OK, main
from tests.certutil import CertificateAuthority

CONFIG = """\
[tls]
certificates = certs/live/
default = certs/live/default.pem

[listen:https]
endpoint = tcp:8443:interface=127.0.0.1
tls = yes

[listen:http]
endpoint = tcp:8080:interface=127.0.0.1
redirect_https = yes

[upstream:app]
servers = 127.0.0.1:9001, [::1]:9002 weight=2
tls = yes
ca = certs/internal/ca.pem
server_name = origin.internal

[upstream:plain]
servers = backend.internal:8080

[route:app]
hosts = localhost, 127.0.0.1
paths = /
upstream = app

[route:static]
hosts = www.localhost
paths = /static/
upstream = plain
strip_prefix = yes
"""


@pytest.fixture
def authority() -> CertificateAuthority:
    return CertificateAuthority("edgeproxy cli test root")


@pytest.fixture
def site(tmp_path: Path, authority: CertificateAuthority) -> Path:
    """The layout certs/generate.py makes: certs/live and certs/internal."""
    live = tmp_path / "certs" / "live"
    internal = tmp_path / "certs" / "internal"
    live.mkdir(parents=True)
    internal.mkdir()
    authority.issue(["localhost", "127.0.0.1", "*.localhost"]).writePEM(live / "default.pem")
    authority.writeCertificate(internal / "ca.pem")
    return tmp_path


def write(directory: Path, text: str) -> str:
    path = directory / "edge.ini"
    path.write_text(textwrap.dedent(text))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_validSummary(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A valid configuration exits 0 and prints listeners, certificates (names,
    expiry, days left, file), routes and upstreams.
    """
    path = write(site, CONFIG)
    status, out, err = run(capsys, "check", "--config", path)
    assert (status, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert lines[0] == f"{path}: configuration is valid"
    assert "  https  tcp:8443:interface=127.0.0.1  TLS, HTTP/2 and HTTP/1.1" in lines
    assert (
        "  http   tcp:8080:interface=127.0.0.1  plain HTTP/1.1, "
        "redirects to https (port 8443 of [listen:https])"
    ) in lines
    (certificate,) = [line for line in lines if "certs/live/default.pem" in line]
    names, _, rest = certificate.strip().partition("  expires ")
    assert sorted(names.split(", ")) == ["*.localhost", "127.0.0.1", "localhost"]
    expiry = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=90)).date()
    assert f"expires {expiry.isoformat()}" in certificate
    assert "(89 days left)" in certificate or "(90 days left)" in certificate
    assert certificate.endswith("[default]")
    assert any(line.split() == ["app", "localhost,", "127.0.0.1", "/", "->", "app"] for line in lines)
    assert any(
        line.split()[:3] == ["static", "www.localhost", "/static/"] and "-> plain (strip prefix)" in line
        for line in lines
    )
    app = lines.index("  app    127.0.0.1:9001, [::1]:9002 weight=2")
    assert lines[app + 1].strip() == "TLS, verifies origin.internal against certs/internal/ca.pem"
    assert lines[app + 2].strip() == (
        "balance round_robin, no active checks, ejects after 5 failures in 10s, 2 retries"
    )
    plain = lines.index("  plain  backend.internal:8080")
    assert lines[plain + 1].strip() == "plain HTTP"
    assert "Process: 1 process, no admin listener, drain 30s" in lines
    assert "Warnings:" not in out


def test_summaryOfResilienceAndAdmin(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Health checks, server options, workers and the admin listener are shown."""
    text = CONFIG.replace(
        "servers = backend.internal:8080",
        "servers = backend.internal:8080 max_conns=7, spare.internal:8080 backup\n"
        "health_path = /healthz\nhealth_interval = 2s\nfall = 2\nretries = 0\nmax_fails = 0",
    )
    text = "[edgeproxy]\nworkers = 2\nadmin = tcp:9901\n\n" + text
    status, out, err = run(capsys, "check", "--config", write(site, text))
    assert (status, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert "Process: 2 workers under a supervisor, admin on tcp:9901 (/status, /metrics; actions off (no token)), drain 30s" in lines
    plain = lines.index("  plain  backend.internal:8080 max_conns=7, spare.internal:8080 backup")
    assert lines[plain + 2].strip() == (
        "balance round_robin, checks GET /healthz every 2s (rise 2, fall 2), no retries"
    )
    assert "  [edgeproxy] admin = tcp:9901 is not bound to loopback: /status and /metrics are readable by anyone who can reach it" in lines


def test_configErrorExits2(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Errors go to stderr as file:line: [section] key: message; exit 2."""
    path = write(site, CONFIG.replace("servers = backend.internal:8080", "servers = backend.internal"))
    status, out, err = run(capsys, "check", "-c", path)
    assert status == EXIT_INVALID
    assert out == ""
    assert err == (
        f"{path}:20: [upstream:plain] servers: expected host:port, got "
        "'backend.internal' (the port is required)\n"
    )


def test_missingConfig(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.ini")
    assert run(capsys, "check", "--config", path) == (EXIT_INVALID, "", f"{path}: no such file\n")


def test_expiredCertificate(
    site: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate the TLS module refuses makes the check fail, naming it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = authority.issue(
        ["old.localhost"],
        notBefore=now - datetime.timedelta(days=100),
        notAfter=now - datetime.timedelta(days=10),
    )
    expired.writePEM(site / "certs" / "live" / "old.pem")
    path = write(site, CONFIG)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert out == ""
    assert "old.pem" in err
    assert "[tls] certificates" in err


def test_badUpstreamCA(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "certs" / "internal" / "ca.pem").write_text("this is not PEM\n")
    path = write(site, CONFIG)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert out == ""
    assert "ca.pem" in err
    assert "[upstream:app] ca" in err


def test_warnings(
    site: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Certificates close to expiry, route hosts no certificate names and
    unverified backends are warned about; the configuration is still valid.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    authority.issue(["soon.example"], notAfter=now + datetime.timedelta(days=3, hours=1)).writePEM(
        site / "certs" / "live" / "soon.pem"
    )
    text = CONFIG.replace("hosts = www.localhost", "hosts = www.localhost, shop.example").replace(
        "servers = backend.internal:8080", "servers = backend.internal:8443\ntls = yes\ninsecure = yes"
    )
    status, out, err = run(capsys, "check", "--config", write(site, text))
    assert (status, err) == (EXIT_OK, "")
    warnings = out.split("Warnings:\n")[1].splitlines()
    assert warnings == [
        "  certs/live/soon.pem expires in 3 days",
        "  [route:static] host shop.example is on no certificate; TLS clients get the "
        "default certificate and a name mismatch",
        "  [upstream:plain] insecure = yes: backend certificates are not verified",
    ]
    assert "TLS, NOT VERIFIED (insecure = yes)" in out


def test_noTLS(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        "[listen:web]\nendpoint = tcp:8080\nmax_body_size = 1MiB\n"
        "[upstream:app]\nservers = 127.0.0.1:9001\n"
        "[route:app]\nhosts = *\nupstream = app\n"
    )
    status, out, err = run(capsys, "check", "--config", write(tmp_path, text))
    assert (status, err) == (EXIT_OK, "")
    assert "Certificates: none (no [tls] section)" in out
    assert "body 1MiB" in out


def test_usageErrors(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == EXIT_INVALID
    assert "usage: edgeproxy" in err
    status, out, err = run(capsys, "frobnicate")
    assert status == EXIT_INVALID
    assert "invalid choice" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"edgeproxy {__version__}\n", "")


def test_pythonDashM(tmp_path: Path) -> None:
    """C{python -m edgeproxy} is the same command, exit status included."""
    path = write(tmp_path, "[listen:web]\nendpoint = tcp:http\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "check", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_INVALID
    assert result.stderr.startswith(f"{path}:2: [listen:web] endpoint: expected a listening port number")
