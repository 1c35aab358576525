"""
C{[acme]} in C{edge.ini}: defaults, and every refusal naming file, line,
section and key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config import load
from edgeproxy.config.acmemodel import LETS_ENCRYPT_DIRECTORY, ACMEChallenge, ACMEKeyType
from edgeproxy.config.parse import defaultACMEStorage
from edgeproxy.errors import ConfigError

BASE = """
[tls]
certificates = site.pem
[listen:https]
endpoint = tcp:443
tls = yes
[upstream:app]
servers = 127.0.0.1:80
[route:app]
hosts = app.example
upstream = app
"""


def write(tmp_path: Path, acme: str, base: str = BASE) -> str:
    (tmp_path / "site.pem").write_text("x\n")
    path = tmp_path / "edge.ini"
    path.write_text(base + "\n[acme]\n" + acme)
    return str(path)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    acme = load(write(tmp_path, "")).acme
    assert acme is not None
    assert acme.directory == LETS_ENCRYPT_DIRECTORY
    assert acme.storage == str(tmp_path / "state" / "acme")
    assert acme.challenges == (ACMEChallenge.TLS_ALPN_01, ACMEChallenge.HTTP_01)
    assert acme.key_type is ACMEKeyType.ECDSA_P256
    assert acme.renew_before == 30 * 86400
    assert acme.names is None and not acme.on_demand


def test_defaultStorage() -> None:
    assert defaultACMEStorage({}) == "/var/lib/edgeproxy/acme"
    assert defaultACMEStorage({"STATE_DIRECTORY": "/var/lib/edge:/var/lib/other"}) == "/var/lib/edge/acme"


def test_absentIsOff(tmp_path: Path) -> None:
    (tmp_path / "site.pem").write_text("x\n")
    (tmp_path / "edge.ini").write_text(BASE)
    assert load(str(tmp_path / "edge.ini")).acme is None


@pytest.mark.parametrize(
    "acme, key, message",
    [
        ("storage = s\nchallenges = dns-01\n", "challenges", "expected challenge types from http-01, tls-alpn-01"),
        ("storage = s\nchallenges = http-01, http-01\n", "challenges", "listed twice"),
        ("storage = s\nkey_type = ed25519\n", "key_type", "expected one of ecdsa-p256, ecdsa-p384, rsa-2048"),
        ("storage = s\ndirectory = ftp://ca.example/dir\n", "directory", "expected an https or http URL"),
        ("storage = s\nemail = nobody\n", "email", "expected an e-mail address"),
        ("storage = s\nrenew_before = soon\n", "renew_before", "soon"),
        ("storage = s\neab_kid = kid\n", "eab_kid", "needs both eab_kid and eab_hmac_key_file"),
        ("storage = s\nnames = *.example.com\n", "names", "host name"),
        ("storage = s\non_demand = yes\n", "on_demand", "needs ask = URL"),
        ("storage = s\nask = https://127.0.0.1/ask\n", "ask", "only used with on_demand = yes"),
        ("storage = s\nnmaes = a.example\n", "nmaes", "did you mean 'names'"),
        ("storage = site.pem\n", "storage", "is not a directory"),
    ],
)
def test_refused(tmp_path: Path, acme: str, key: str, message: str) -> None:
    path = write(tmp_path, acme)
    with pytest.raises(ConfigError) as refused:
        load(path)
    error = refused.value
    assert (error.section, error.key) == ("acme", key)
    assert message in str(error)
    assert error.line is not None and str(error).startswith(f"{path}:{error.line}: [acme] {key}:")


def test_needsTLS(tmp_path: Path) -> None:
    base = BASE.replace("[tls]\ncertificates = site.pem\n", "").replace("tls = yes\n", "")
    with pytest.raises(ConfigError, match=r"\[acme\] needs a \[tls\] section"):
        load(write(tmp_path, "storage = s\n", base))


def test_checkShowsWhatACMEWouldRequest(tmp_path: Path) -> None:
    """edgeproxy check: the directory, and the names no certificate file covers."""
    import io

    from edgeproxy.cli import EXIT_OK, check
    from tests.certutil import CertificateAuthority

    CertificateAuthority("check root").issue(["www.example"]).writePEM(tmp_path / "site.pem")
    path = tmp_path / "edge.ini"
    path.write_text(BASE.replace("hosts = app.example", "hosts = app.example, www.example, *.wild.example")
                    + "\n[acme]\nstorage = s\ndirectory = https://127.0.0.1:14000/dir\n")
    out, err = io.StringIO(), io.StringIO()
    assert check(str(path), out=out, err=err) == EXIT_OK, err.getvalue()
    text = out.getvalue()
    assert "ACME: from https://127.0.0.1:14000/dir" in text
    assert "would request (names = auto: route hosts no certificate file covers): app.example\n" in text
    # No warning for a host ACME covers.
    assert "host app.example is on no certificate" not in text
