"""
What the units in C{docs/systemd} promise, with a real C{twistd edgeproxy}:

  - a restart keeps the listening sockets: the test holds them as a socket
    unit without C{PartOf=} does, and each start of the service goes
    through C{systemd-socket-activate} (which passes them on, named, and
    starts the service on the first connection), so a client that connects
    while no process runs is answered by the next one;
  - C{systemctl reload} fails on a refused configuration: the unit's
    C{ExecReload=} lines run as systemd runs them (in order, stopping at the
    first that fails), and the signal is never sent.

Everything listens on 127.0.0.1, every wait is bounded.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, Twistd, freePort, processEnvironment, readResponse

REPOSITORY = Path(__file__).resolve().parent.parent.parent

CONFIG = """\
[tls]
certificates = certs/

[listen:https]
endpoint = systemd:domain=INET:name=https
tls = yes

[listen:http]
endpoint = systemd:domain=INET:name=http
redirect_https = yes
redirect_port = {https}
"""

# The fds the test holds reach the service at 3, 4, ... with LISTEN_FDS,
# LISTEN_PID and LISTEN_FDNAMES, as systemd passes a socket unit's sockets;
# systemd-socket-activate (which passes inherited sockets on) is exec'd
# next and execs the service on the first connection, keeping the pid.
INHERIT = r"""
import fcntl, os, sys
names, fds = sys.argv[1].split(","), [int(fd) for fd in sys.argv[2].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(names))
os.execvp(sys.argv[3], sys.argv[3:])
"""


class SocketUnits:
    """The listening sockets, open for the whole test as systemd's socket units keep them."""

    def __init__(self, workdir: Path, names: list[str]) -> None:
        self.workdir = workdir
        self.names = names
        self.sockets: dict[str, socket.socket] = {}
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", freePort()))
            sock.listen(128)
            sock.set_inheritable(True)
            self.sockets[name] = sock
        self.script = workdir / "inherit.py"
        self.script.write_text(INHERIT)

    def port(self, name: str) -> int:
        return self.sockets[name].getsockname()[1]

    def prefix(self) -> list[str]:
        fds = ",".join(str(self.sockets[name].fileno()) for name in self.names)
        return [
            sys.executable, str(self.script), ",".join(self.names), fds,
            "systemd-socket-activate", f"--fdname={':'.join(self.names)}",
            # It gives the service a clean environment, as systemd does;
            # these come from the test's.
            *(f"--setenv={name}" for name in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "NOTIFY_SOCKET")),
            "--",
        ]

    def start(self, config: Path, notify: NotifyReceiver) -> Twistd:
        return Twistd(
            config,
            self.workdir,
            notify=notify,
            prefix=self.prefix(),
            passFds=[sock.fileno() for sock in self.sockets.values()],
        )

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture
def units(tmp_path: Path) -> Iterator[SocketUnits]:
    ca = CertificateAuthority("edgeproxy units test")
    (tmp_path / "certs").mkdir()
    ca.issue(["localhost"]).writePEM(tmp_path / "certs" / "site.pem")
    held = SocketUnits(tmp_path, ["https", "http"])
    (tmp_path / "edge.ini").write_text(CONFIG.format(https=held.port("https")))
    try:
        yield held
    finally:
        held.close()


def ask(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(b"GET /kept HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    return conn


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_restartKeepsTheSockets(units: SocketUnits, notify: NotifyReceiver) -> None:
    """
    C{systemctl restart edgeproxy} with the shipped socket units: the ports
    stay open while no process runs, and a client that connected then is
    answered by the new process.
    """
    config = units.workdir / "edge.ini"
    http = units.port("http")
    first = units.start(config, notify)
    try:
        # systemd-socket-activate starts the service on the first connection.
        with ask(http) as conn:
            notify.waitFor(b"READY=1", 30, alive=first.alive)
            status, headers, _ = readResponse(conn)
        assert (status, headers["location"]) == (308, f"https://localhost:{units.port('https')}/kept")
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        first.stop()

    # No process now: the port accepts and the request waits in the backlog.
    waiting = ask(http)
    second = units.start(config, notify)
    try:
        with waiting:
            status, headers, _ = readResponse(waiting)
        assert status == 308
        notify.waitFor(b"READY=1", 30, alive=second.alive)
    finally:
        second.stop()


def execReload(
    environ: dict[str, str], mainPid: int, config: Path, journal: Path | None = None
) -> tuple[int, str]:
    """
    Run the unit's ExecReload= lines as systemd does: in order, each to its
    end, stopping at the first that fails.

    @param journal: a file standing for the journal: the commands' standard
        output and error go there, and C{$JOURNAL_STREAM} names it, as
        systemd connects and names its stream.
    @return: the status of the reload (0, or the failing command's) and what
        the commands wrote.
    """
    service = (REPOSITORY / "docs" / "systemd" / "edgeproxy.service").read_text()
    lines = [line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecReload=")]
    output = ""
    for line in lines:
        command = shlex.split(line.replace("$MAINPID", str(mainPid)))
        if command[0] == "/opt/edgeproxy/bin/edgeproxy":
            command = [sys.executable, "-m", "edgeproxy", *command[1:]]
        command = [str(config) if part == "/etc/edgeproxy/edge.ini" else part for part in command]
        if journal is None:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
            output += result.stdout + result.stderr
            returncode = result.returncode
        else:
            with open(journal, "a") as stream:
                info = os.fstat(stream.fileno())
                stream_env = dict(environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
                returncode = subprocess.run(
                    command, stdout=stream, stderr=stream, timeout=60, env=stream_env
                ).returncode
            output = journal.read_text()
        if returncode != 0:
            return returncode, output
    return 0, output


def test_reloadFailsOnARefusedConfiguration(tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    C{systemctl reload edgeproxy} fails when the new configuration would be
    refused, says why, and sends no signal; a good one reloads.
    """
    ca = CertificateAuthority("edgeproxy reload test")
    (tmp_path / "certs").mkdir()
    ca.issue(["localhost"]).writePEM(tmp_path / "certs" / "site.pem")
    config = tmp_path / "edge.ini"
    good = (
        "[tls]\ncertificates = certs/\n"
        f"[listen:http]\nendpoint = tcp:{freePort()}:interface=127.0.0.1\n"
    )
    config.write_text(good)
    proc = Twistd(config, tmp_path, notify=notify)
    try:
        notify.waitFor(b"READY=1", 30, alive=proc.alive)
        environ = processEnvironment()
        config.write_text(good + "[upstream:app]\nservers = app.internal\n")
        status, output = execReload(environ, proc.pid, config)
        assert status == 2
        assert f"{config}:6: [upstream:app] servers: expected host:port" in output
        # Under systemd (standard error the journal's stream) every line is
        # at priority 3, so that journalctl -p warning shows the refusal.
        journal = tmp_path / "journal"
        status, output = execReload(environ, proc.pid, config, journal)
        assert status == 2
        assert output.splitlines() == [
            f"<3>edgeproxy check: configuration refused: {config} (1 problem)",
            f"<3>{config}:6: [upstream:app] servers: expected host:port, got 'app.internal' "
            "(the port is required)",
        ]
        time.sleep(0.5)
        assert "SIGHUP" not in proc.output()
        assert proc.alive()

        config.write_text(good + "[upstream:app]\nservers = app.internal:80\n")
        assert execReload(environ, proc.pid, config) == (0, "")
        proc.waitForOutput("Reloaded", 30)
    finally:
        proc.stop()
    assert os.path.exists(config)


def test_refusedReloadSaysSoInItsStatus(tmp_path: Path, notify: NotifyReceiver) -> None:
    """
    A reload the process refuses ends with READY=1 and a STATUS= that says
    it was refused (what systemctl status shows), until a reload succeeds.
    """
    ca = CertificateAuthority("edgeproxy status test")
    (tmp_path / "certs").mkdir()
    ca.issue(["localhost"]).writePEM(tmp_path / "certs" / "site.pem")
    config = tmp_path / "edge.ini"
    good = f"[tls]\ncertificates = certs/\n[listen:http]\nendpoint = tcp:{freePort()}:interface=127.0.0.1\n"
    config.write_text(good)
    proc = Twistd(config, tmp_path, notify=notify)
    try:
        notify.waitFor(b"READY=1", 30, alive=proc.alive)
        config.write_text(good + "[upstream:app]\nservers = app.internal\n")
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 30, alive=proc.alive)
        ready = notify.waitFor(b"READY=1", 30, alive=proc.alive)
        fields = dict(line.split(b"=", 1) for line in ready.split(b"\n"))
        status = fields[b"STATUS"].decode()
        assert status.startswith("Reload refused at "), status
        assert status.endswith(
            f"serving the previous configuration: {config}:6: [upstream:app] servers: "
            "expected host:port, got 'app.internal' (the port is required)"
        )
        config.write_text(good)
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 30, alive=proc.alive)
        ready = notify.waitFor(b"READY=1", 30, alive=proc.alive)
        assert b"STATUS=serving 1 listener(s) (http)" in ready
    finally:
        proc.stop()


def test_aSocketNotPassedIsNamed(units: SocketUnits, notify: NotifyReceiver) -> None:
    """
    A systemd: endpoint whose socket systemd did not pass: the start stops
    with the names it did pass and what to change, not a bare KeyError.
    """
    config = units.workdir / "edge.ini"
    config.write_text(
        config.read_text().replace("name=https", "name=web")
    )
    proc = Twistd(
        config, units.workdir, notify=notify,
        prefix=[sys.executable, str(units.script), "https,http",
                ",".join(str(units.sockets[n].fileno()) for n in ("https", "http"))],
        passFds=[sock.fileno() for sock in units.sockets.values()],
    )
    try:
        assert proc.wait(30) == 1
    finally:
        proc.stop()
    output = proc.output()
    assert (
        f"{config}: [listen:https] endpoint 'systemd:domain=INET:name=web': cannot listen: "
        "systemd passed no socket named 'web' (it passed: https, http); give a socket unit "
        "FileDescriptorName=web, name that unit in the service's Sockets= and restart the "
        "service (a running process cannot receive new sockets)"
    ) in output
    assert "KeyError" not in output and "Traceback" not in output
