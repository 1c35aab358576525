"""
Tests for the systemd units in C{docs/systemd} and the install and run
instructions around them: what systemd itself says of the units
(C{systemd-analyze verify}), the promises their comments make, and that the
documents give one install instruction and foreground commands only.

The units' behaviour (a restart keeps the sockets, a refused reload fails
C{systemctl reload}) is tested for real in
C{tests/integration/test_systemd_units.py}.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
UNITS = REPOSITORY / "docs" / "systemd"


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("name", ["edgeproxy.socket", "edgeproxy-http.socket"])
def test_socketUnitsOutliveTheService(name: str) -> None:
    """
    No dependency that stops the socket with the service: with PartOf=
    (or BindsTo=), C{systemctl restart edgeproxy} closed the ports.
    """
    section = unit(name)["Unit"]
    for key in ("PartOf", "BindsTo", "Requires", "Requisite", "StopPropagatedFrom"):
        assert "edgeproxy.service" not in " ".join(section.get(key, [])), (name, key)
    assert unit(name)["Socket"]["Service"] == ["edgeproxy.service"]


def test_reloadChecksFirst() -> None:
    """
    ExecReload= runs C{edgeproxy check} before the signal: systemd stops at
    the first command that fails, so a refused configuration fails the
    reload.
    """
    service = unit("edgeproxy.service")["Service"]
    check, signal = service["ExecReload"]
    assert check.split() == [
        "/opt/edgeproxy/bin/edgeproxy", "check", "--quiet", "--config", "/etc/edgeproxy/edge.ini",
    ]
    assert signal == "/bin/kill -HUP $MAINPID"
    assert service["ExecStartPre"] == [check]
    assert "--nodaemon --pidfile= edgeproxy --config /etc/edgeproxy/edge.ini" in service["ExecStart"][0]


def test_hardeningAndCredentials() -> None:
    service = unit("edgeproxy.service")["Service"]
    assert service["SystemCallErrorNumber"] == ["EPERM"]
    assert service["LoadCredential"] == ["admin-token:/etc/edgeproxy/admin.token"]
    text = (UNITS / "edgeproxy.service").read_text()
    # The per-name key line is shown, for certbot's root-only privkey.pem.
    assert "#LoadCredential=example.com.key:/etc/letsencrypt/live/example.com/privkey.pem" in text
    assert "${CREDENTIALS_DIRECTORY}/admin-token" in text


@pytest.mark.parametrize("name", ["edgeproxy.service", "edgeproxy.socket", "edgeproxy-http.socket"])
def test_documentationExists(name: str) -> None:
    """
    Every Documentation= names a document the install steps put where it
    points (docs/*.rst copied to /usr/share/doc/edgeproxy).
    """
    links = unit(name)["Unit"].get("Documentation", [])
    assert links, name
    install = installBlock()
    assert '"$SRC"/docs/*.rst' in install and "/usr/share/doc/edgeproxy/" in install
    for link in " ".join(links).split():
        prefix = "file:///usr/share/doc/edgeproxy/"
        assert link.startswith(prefix), link
        assert (REPOSITORY / "docs" / link[len(prefix):]).is_file(), link


def installBlock() -> str:
    operations = (REPOSITORY / "docs" / "operations.rst").read_text()
    section = operations.split("Installing\n----------\n", 1)[1].split("\n\n", 2)[1]
    return section


def test_oneInstallInstruction() -> None:
    """
    The install steps are written once (docs/operations.rst, Installing);
    the unit files and the README point there instead of giving their own.
    """
    install = installBlock()
    for step in ("python3 -m venv /opt/edgeproxy", "useradd --system", "systemctl daemon-reload",
                 "getPlugins(IPlugin)", "/etc/systemd/system/", "admin.token"):
        assert step in install, step
    for path in [*UNITS.iterdir(), REPOSITORY / "README.rst", *(REPOSITORY / "docs").glob("*.rst")]:
        text = path.read_text()
        if path.name == "operations.rst":
            text = text.replace(install, "")
        assert "useradd" not in text and "/opt/edgeproxy/bin/pip" not in text, path
    assert 'docs/operations.rst, "Installing"' in (UNITS / "edgeproxy.service").read_text()
    assert "docs/operations.rst, Installing" in (REPOSITORY / "README.rst").read_text()


_TWISTD = re.compile(r"twistd((?:\s+-[-\w]+(?:=\S*)?)*)\s+edgeproxy\s+--config")


def test_commandsRunInTheForeground() -> None:
    """
    Every C{twistd ... edgeproxy --config} an operator may copy keeps the
    process in the foreground and writes no pid file, so nobody is left with
    a daemon and a C{twistd.pid} in the current directory.
    """
    paths = [
        REPOSITORY / "README.rst",
        REPOSITORY / "edge.ini",
        REPOSITORY / "scripts" / "run-example",
        *(REPOSITORY / "docs").glob("*.rst"),
        *UNITS.iterdir(),
        *(REPOSITORY / "edgeproxy").rglob("*.py"),
    ]
    found = 0
    for path in paths:
        for match in _TWISTD.finditer(path.read_text()):
            options = match.group(1).split()
            assert "--nodaemon" in options or "-n" in options, (path, match.group(0))
            assert "--pidfile=" in options, (path, match.group(0))
            found += 1
    assert found >= 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemdAnalyzeVerify(tmp_path: Path) -> None:
    """
    systemd itself finds nothing to say about the units: no unknown key
    (a typo is silently ignored by systemd, and only reported here), no bad
    value, no missing unit.
    """
    binaries = Path(sys.executable).parent
    if not (binaries / "edgeproxy").exists() or not (binaries / "twistd").exists():
        pytest.skip("needs the edgeproxy and twistd scripts next to the interpreter")
    for path in UNITS.iterdir():
        text = path.read_text().replace("/opt/edgeproxy/bin/", f"{binaries}/")
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unitParserAgreesWithConfigparser() -> None:
    """The little parser above reads what configparser reads (first value of each key)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / "edgeproxy.socket")
    assert parser["Socket"]["FileDescriptorName"] == unit("edgeproxy.socket")["Socket"]["FileDescriptorName"][0]
