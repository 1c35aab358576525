"""
The process log of a real C{twistd --nodaemon edgeproxy}: what start-up
says, C{log_level}, and the priorities the journal gets under systemd
(C{$JOURNAL_STREAM} naming standard output), so that C{journalctl -p
warning} shows a refused reload and a backend going down.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, freePort, startTwistd

CONFIG = """\
[edgeproxy]
log_level = {level}
workers = {workers}
admin = tcp:0:interface=127.0.0.1

[tls]
certificates = certs/

[listen:https]
endpoint = tcp:{https}:interface=127.0.0.1
tls = yes

[listen:http]
endpoint = tcp:{http}:interface=127.0.0.1

[upstream:app]
servers = 127.0.0.1:{backend}
health_path = /healthz
health_interval = 200ms
health_timeout = 100ms
health_initial = up
fall = 1

[route:app]
hosts = *
upstream = app
"""


def setUp(tmp_path: Path, level: str = "info", workers: int = 1) -> tuple[Path, int]:
    ca = CertificateAuthority("edgeproxy process log test")
    (tmp_path / "certs").mkdir()
    ca.issue(["localhost"]).writePEM(tmp_path / "certs" / "site.pem")
    http = freePort()
    config = tmp_path / "edge.ini"
    config.write_text(
        CONFIG.format(level=level, workers=workers, https=freePort(), http=http, backend=freePort())
    )
    return config, http


def waitFor(path: Path, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{path.read_text()}"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_startUpSaysWhatAnOperatorNeeds(tmp_path: Path, notify: NotifyReceiver, workers: int) -> None:
    """
    No factory reprs, no port chatter (the supervisor's own copies of the
    ports with workers too), no garbage collector diary; the listeners by
    name.
    """
    config, http = setUp(tmp_path, workers=workers)
    proc = startTwistd(config, tmp_path, notify)
    try:
        with socket.create_connection(("127.0.0.1", http), 5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while conn.recv(65536):
                pass
    finally:
        proc.stop()
    output = proc.output()
    assert "[listen:https]" in output and "[listen:http]" in output
    for noise in ("Starting factory", "object at 0x", "objects frozen", "starting on", "Port", "b'"):
        assert noise not in output, (noise, output)


def test_journalPrioritiesAndLevel(tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    With standard output the journal's stream, every line carries its
    priority: a backend going down is <4>, a refused reload <3>; with
    log_level = warn, info lines are gone.
    """
    config, _ = setUp(tmp_path, level="warn")
    out = tmp_path / "twistd.out"
    out.write_bytes(b"")
    info = os.stat(out)
    proc = startTwistd(
        config, tmp_path, notify, extraEnv={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    )
    try:
        text = waitFor(out, "up -> down")
        config.write_text(config.read_text().replace("log_level = warn", "log_level = warn\nlog_level = info"))
        proc.signal(signal.SIGHUP)
        text = waitFor(out, "Reload refused")
    finally:
        proc.stop()
    lines = [line for line in out.read_text().splitlines() if line]
    assert lines, proc.output()
    assert all(line[:3] in ("<2>", "<3>", "<4>") for line in lines), lines
    (down,) = [line for line in lines if "up -> down" in line]
    assert down.startswith("<4>")
    refused = [line for line in lines if "Reload refused" in line]
    assert refused and all(line.startswith("<3>") for line in refused)
    assert "duplicate key" in refused[0]


def test_logLevelChangesOnReload(tmp_path: Path, notify: NotifyReceiver) -> None:
    """log_level = warn hides the info lines until a reload sets info."""
    config, _ = setUp(tmp_path, level="warn")
    out = tmp_path / "twistd.out"
    proc = startTwistd(config, tmp_path, notify)
    try:
        assert "Listening on" not in out.read_text()
        config.write_text(config.read_text().replace("log_level = warn", "log_level = info"))
        proc.signal(signal.SIGHUP)
        waitFor(out, "Reloaded ")
    finally:
        proc.stop()
    text = out.read_text()
    assert "SIGHUP: reloading" not in text  # logged while the level was warn
    assert "Received SIGTERM, draining" in text
