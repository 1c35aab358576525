"""
Pebble (Let's Encrypt's test CA) and pebble-challtestsrv (its mock DNS),
started on 127.0.0.1 for the ACME integration tests, from Debian's
C{pebble} package (C{.ci/run} installs it).  The mock DNS answers
127.0.0.1 for every name (and nothing for AAAA), so the CA validates
challenges against the proxy under test; validation runs without
Pebble's random sleeps, without rejected nonces and without reused
authorizations, so an order takes well under a second.

    ca = Pebble(tmp_path, httpPort=..., tlsPort=...)   # started
    ca.directory, ca.caFile (trust for the directory's TLS)
    ca.rootPEM()      # the root of the certificates it issues
    ca.stop()
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import freePort

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")

needsPebble = pytest.mark.skipif(
    PEBBLE is None or CHALLTESTSRV is None,
    reason="pebble and pebble-challtestsrv are not installed (Debian package pebble; .ci/run installs it)",
)


def _waitForPort(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Pebble:
    def __init__(
        self,
        workdir: Path,
        httpPort: int,
        tlsPort: int,
        validity: int | None = None,
        ocspResponderURL: str = "",
        extraEnv: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir / "pebble"
        self.workdir.mkdir(exist_ok=True)
        self.port = freePort()
        self.managementPort = freePort()
        self.dnsPort = freePort()
        self.challManagementPort = freePort()
        authority = CertificateAuthority("pebble directory test CA")
        served = authority.issue(["localhost", "127.0.0.1"])
        served.writePair(self.workdir, "directory")
        self.caFile = authority.writeCertificate(self.workdir / "directory-ca.pem")
        settings: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.managementPort}",
            "certificate": str(self.workdir / "directory.crt"),
            "privateKey": str(self.workdir / "directory.key"),
            "httpPort": httpPort,
            "tlsPort": tlsPort,
            "ocspResponderURL": ocspResponderURL,
            "externalAccountBindingRequired": False,
        }
        if validity is not None:
            settings["certificateValidityPeriod"] = validity
        config = self.workdir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": settings}))
        self.log = open(self.workdir / "pebble.log", "wb")
        self.dns = subprocess.Popen(
            [
                str(CHALLTESTSRV),
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dnsPort}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{self.challManagementPort}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        env = {
            "PATH": "/usr/bin:/bin",
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
            **(extraEnv or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        try:
            _waitForPort(self.challManagementPort, self.dns)
            self.process = subprocess.Popen(
                [str(PEBBLE), "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dnsPort}", "-strict=false"],
                stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.workdir,
            )
            _waitForPort(self.port, self.process)
            _waitForPort(self.managementPort, self.process)
        except BaseException:
            self.stop()
            raise
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    def _management(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.caFile))
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{self.managementPort}{path}", context=context, timeout=10) as r:
            return r.read()  # type: ignore[no-any-return]

    def rootPEM(self) -> bytes:
        """The root of the certificates this Pebble issues (new at each start)."""
        return self._management("/roots/0")

    def writeRoot(self, path: Path) -> Path:
        path.write_bytes(self.rootPEM())
        return path

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.workdir / "pebble.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in (self.process, self.dns):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        self.log.close()
