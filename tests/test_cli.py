"""
Tests for L{edgeproxy.cli}: C{edgeproxy check} as an operator runs it, with
configurations and certificates made in temporary directories.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeproxy import __version__
from edgeproxy.cli import EXIT_INVALID, EXIT_OK, main
from tests.certutil import CertificateAuthority, writeCertbot

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


@pytest.mark.parametrize(
    "lines, content, message",
    [
        ("type = basic\nhtpasswd = auth.file", "carl:$apr1$abc$def\n",
         "htpasswd: {file}: line 1: user 'carl' has a hash that is neither bcrypt nor argon2 "
         "(htpasswd -B makes bcrypt)"),
        ("type = jwt\njwks = auth.file", '{"keys": {}}',
         "jwks: {file}: not a JWKS document (no keys list)"),
    ],
)
def test_badAuthFileExits2(
    site: Path, capsys: pytest.CaptureFixture[str], lines: str, content: str, message: str
) -> None:
    """
    A file an [auth:NAME] section names is read by check: one a start
    could not use is an error naming the file, the section and the key.
    """
    (site / "auth.file").write_text(content)
    text = CONFIG.replace("upstream = app\n", "upstream = app\nauth = staff\n", 1)
    text += f"\n[auth:staff]\n{lines}\n"
    path = write(site, text)
    status, out, err = run(capsys, "check", "-c", path)
    assert (status, out) == (EXIT_INVALID, "")
    line = len(text.splitlines())
    assert err == f"{path}:{line}: [auth:staff] {message.format(file=site / 'auth.file')}\n"


def test_refusedToTheJournalHasTheErrorPriority(site: Path, tmp_path: Path) -> None:
    """
    With standard error the journal's stream (C{$JOURNAL_STREAM}, as under
    the unit's C{ExecReload=} and C{ExecStartPre=}), a refusal is led by a
    line saying so, and every line is at priority 3 (error), so that
    C{journalctl -p warning} shows a refused reload; to anything else, the
    lines are as they were.
    """
    import io

    from edgeproxy.cli import check

    text = CONFIG.replace("servers = backend.internal:8080", "servers = backend.internal")
    path = write(site, text.replace("redirect_https = yes", "redirect_https = perhaps"))
    journal = tmp_path / "journal"
    with open(journal, "w") as stream:
        info = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert check(path, out=io.StringIO(), err=stream, environ=environ) == EXIT_INVALID
    lines = journal.read_text().splitlines()
    assert lines == [
        f"<3>edgeproxy check: configuration refused: {path} (2 problems)",
        f"<3>{path}:11: [listen:http] redirect_https: expected yes or no (or true/false, on/off, 1/0), got 'perhaps'",
        f"<3>{path}:20: [upstream:plain] servers: expected host:port, got 'backend.internal' (the port is required)",
    ]
    elsewhere = io.StringIO()
    assert check(path, out=io.StringIO(), err=elsewhere, environ=environ) == EXIT_INVALID
    assert elsewhere.getvalue().splitlines() == [line[3:] for line in lines[1:]]


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


# Every problem at once, certificates in certbot's layout ------------------


def test_everyProblemAtOnce(
    site: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Problems in the file, in two certificates and in an upstream CA are all
    reported in one run, each at the configuration line it comes from.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    authority.issue(
        ["old.localhost"], notBefore=now - datetime.timedelta(days=100),
        notAfter=now - datetime.timedelta(days=10),
    ).writePEM(site / "certs" / "live" / "old.pem")
    (site / "certs" / "live" / "stray.pem").write_bytes(authority.certificatePEM)
    (site / "certs" / "internal" / "ca.pem").write_text("this is not PEM\n")
    path = write(site, CONFIG)
    status, out, err = run(capsys, "check", "--config", path)
    assert (status, out) == (EXIT_INVALID, "")
    lines = err.splitlines()
    live = site / "certs" / "live"
    assert lines[0].startswith(f"{path}:2: [tls] certificates: {live / 'old.pem'}: the certificate expired on ")
    assert lines[1] == f"{path}:2: [tls] certificates: {live / 'stray.pem'}: no private key: put the key in the same PEM file or next to it as a .key file with the same basename"
    assert lines[2].startswith(f"{path}:16: [upstream:app] ca: {site / 'certs' / 'internal' / 'ca.pem'}: no PEM data")
    assert len(lines) == 3

    # Problems the INI reading finds come first; the certificates are read
    # only once the file itself is right.
    text = CONFIG.replace("keepalive", "x").replace("redirect_https = yes", "redirect_https = perhaps")
    text = text.replace("strip_prefix = yes", "strip_prefix = maybe")
    status, out, err = run(capsys, "check", "--config", write(site, text))
    assert [line.split(": ")[1] for line in err.splitlines()] == [
        "[listen:http] redirect_https",
        "[route:static] strip_prefix",
    ]


def test_endpointStartingWithParameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mutated endpoint (a server option in the wrong key) is a message, not a traceback."""
    path = write(tmp_path, "[listen:web]\nendpoint = weight=abc\n[upstream:a]\nservers = a:1\n[route:a]\nhosts = *\nupstream = a\n")
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert err.startswith(f"{path}:2: [listen:web] endpoint: expected a server endpoint")
    assert "it starts with a parameter, not an endpoint type" in err


def test_deviceAsCertificates(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """C{certificates = /dev/zero} is refused at once instead of read forever."""
    path = write(site, CONFIG.replace("certificates = certs/live/", "certificates = /dev/zero"))
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert err == f"{path}:2: [tls] certificates: /dev/zero is a device, expected a regular file\n"


CERTBOT = """\
[tls]
certificates = letsencrypt/live/
default = letsencrypt/live/a.example/

[listen:https]
endpoint = tcp:8443
tls = yes

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = a.example, b.example
upstream = app
"""


def test_certbotLayout(
    tmp_path: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    certbot's C{live/} (a README and one directory of symbolic links per
    name) loads without concatenating anything: C{fullchain.pem} +
    C{privkey.pem}, or C{cert.pem} + C{chain.pem} + C{privkey.pem}.
    """
    intermediate = authority.intermediate()
    writeCertbot(intermediate.issue(["a.example"]), tmp_path / "letsencrypt", "a.example")
    live = writeCertbot(intermediate.issue(["b.example"]), tmp_path / "letsencrypt", "b.example")
    (live / "fullchain.pem").unlink()
    path = write(tmp_path, CERTBOT)
    status, out, err = run(capsys, "check", "--config", path)
    assert (status, err) == (EXIT_OK, "")
    lines = out.splitlines()
    (a,) = [line for line in lines if line.strip().startswith("a.example ")]
    (b,) = [line for line in lines if line.strip().startswith("b.example ")]
    assert a.endswith("letsencrypt/live/a.example/fullchain.pem  [default]")
    assert b.endswith("letsencrypt/live/b.example/cert.pem")

    from edgeproxy.config import load
    from edgeproxy.tls.layout import loadCertificates

    config = load(path)
    assert config.tls is not None
    entries = loadCertificates(config.tls).entries
    assert [entry.chain for entry in entries] == [(intermediate.certificate,)] * 2


def test_keyMismatchNamesKeyFileAndLine(
    tmp_path: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key that does not match its certificate: the key file, the certificate, the config line."""
    live = writeCertbot(authority.issue(["a.example"]), tmp_path / "letsencrypt", "a.example")
    writeCertbot(authority.issue(["b.example"]), tmp_path / "letsencrypt", "b.example")
    other = authority.issue(["a.example"])
    (tmp_path / "letsencrypt" / "archive" / "a.example" / "privkey1.pem").write_bytes(other.keyPEM)
    path = write(tmp_path, CERTBOT)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert err == (
        f"{path}:2: [tls] certificates: the private key in {live / 'privkey.pem'} does not "
        f"match the certificate in {live / 'fullchain.pem'}\n"
    )


def test_keysFromCredentials(
    tmp_path: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    C{keys = ${CREDENTIALS_DIRECTORY}}: the keys systemd's LoadCredential=
    passes in (as C{NAME.key}) serve the certificates whose own key this
    user cannot read, paired by public key.
    """
    issued = {name: authority.issue([name]) for name in ("a.example", "b.example")}
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, certificate in issued.items():
        live = writeCertbot(certificate, tmp_path / "letsencrypt", name)
        (live / "privkey.pem").unlink()  # as if root-only: not ours to read
        (credentials / f"{name}.key").write_bytes(certificate.keyPEM)
    (credentials / "admin-token").write_text("0123456789abcdef0123456789abcdef\n")
    text = CERTBOT.replace("[tls]\n", "[tls]\nkeys = ${CREDENTIALS_DIRECTORY}\n")
    path = write(tmp_path, text)
    status, out, err = run(capsys, "check", "--config", path)
    assert status == EXIT_INVALID
    assert "CREDENTIALS_DIRECTORY is not set" in err

    os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)
    try:
        status, out, err = run(capsys, "check", "--config", path)
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    assert (status, err) == (EXIT_OK, "")
    assert f"= {credentials}  (from ${{CREDENTIALS_DIRECTORY}})" in out


def test_overlappingNamesShown(
    site: Path, authority: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """When two certificates name the same host, check says which one is served."""
    now = datetime.datetime.now(datetime.timezone.utc)
    authority.issue(["localhost"], notAfter=now + datetime.timedelta(days=30)).writePEM(
        site / "certs" / "live" / "older.pem"
    )
    status, out, err = run(capsys, "check", "--config", write(site, CONFIG))
    assert (status, err) == (EXIT_OK, "")
    lines = out.splitlines()
    heading = lines.index("  Names on several certificates (the one expiring last is served):")
    assert lines[heading + 1].split() == [
        "localhost", "served", "from", "certs/live/default.pem", "(expires", "last);",
        "also", "on", "certs/live/older.pem",
    ]


def test_includesAndEnvironmentShown(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check shows the files read and every value taken from the environment, resolved."""
    (site / "conf.d").mkdir()
    (site / "conf.d" / "plain.ini").write_text(
        "[upstream:plain]\nservers = ${BACKEND}:8080\n"
    )
    text = "[edgeproxy]\ninclude = conf.d/*.ini\n\n" + CONFIG.replace(
        "[upstream:plain]\nservers = backend.internal:8080\n", ""
    )
    path = write(site, text)
    os.environ["BACKEND"] = "10.1.2.3"
    try:
        status, out, err = run(capsys, "check", "--config", path)
    finally:
        del os.environ["BACKEND"]
    assert (status, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert lines[2:5] == ["Files:", "  edge.ini", "  conf.d/plain.ini"]
    assert lines[6] == "From the environment:"
    assert lines[7].split() == ["conf.d/plain.ini:2", "[upstream:plain]", "servers", "=", "10.1.2.3:8080", "(from", "${BACKEND}:8080)"]
    assert "  plain  10.1.2.3:8080" in lines


def test_quiet(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """C{--quiet} (the units' ExecStartPre= and ExecReload=): problems only, same exit status."""
    path = write(site, CONFIG)
    assert run(capsys, "check", "--quiet", "--config", path) == (EXIT_OK, "", "")
    broken = write(site, CONFIG.replace("keepalive", "").replace("tcp:8080", "tcp:x"))
    status, out, err = run(capsys, "check", "-q", "-c", broken)
    assert (status, out) == (EXIT_INVALID, "")
    assert "[listen:http] endpoint" in err


def test_checkShowsTheCache(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site, CONFIG + "cache = yes\n\n[cache]\nmemory = 64MiB\ndisk = cache\n")
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == EXIT_OK
    assert "-> plain (strip prefix, cached)" in out
    assert "Cache: memory 64MiB per process, disk cache (10GiB, shared), objects up to 64MiB" in out


def test_checkShowsHeaderRules(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site, CONFIG + "response_headers_set = X-Frame-Options: DENY\n")
    status, out, _ = run(capsys, "check", "--config", path)
    assert status == EXIT_OK
    assert "-> plain (strip prefix, header rules)" in out
def test_redirectRouteIsShownWithItsTarget(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        textwrap.dedent(CONFIG)
        + "\n[route:www]\nhosts = www.example.com\nredirect = https://example.com$request_uri\n"
    )
    status, out, err = run(capsys, "check", "--config", write(site, text))
    assert (status, err) == (EXIT_OK, "")
    assert any(
        line.split() == ["www", "www.example.com", "/", "301", "https://example.com$request_uri"]
        for line in out.splitlines()
    )
