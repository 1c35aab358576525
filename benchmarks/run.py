# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
Run the benchmark suite: edgeproxy against nginx and HAProxy, same run, same
machine, same certificate, same origin.

    .venv/bin/python benchmarks/run.py [--quick] [--duration S] [--runs N]
                                       [--json out.json] [--proxies LIST]

It installs nothing.  It looks for C{nginx}, C{haproxy}, C{wrk} and
C{h2load} on C{PATH}; a missing proxy is left out of the table, a missing
load generator leaves its figures out (C{wrk} is needed for R1-R3).  See
C{docs/performance.rst} for what each figure means.

Layout of a run on a machine with at least two CPUs: the proxies are pinned
to CPU 0, the load generator and the origin to CPU 1.  Every server is our
child, started in a temporary directory and stopped by its pid in a
C{finally:}; every load run is bounded in time; all traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import loadgen, procstat, report, servers  # noqa: E402
from benchmarks.servers import LARGE_PATH, LARGE_SIZE, SMALL_PATH, Server  # noqa: E402

MiB = 1024 * 1024


@dataclass(frozen=True)
class Figure:
    key: str
    description: str
    tool: str
    path: str
    connections: int
    streams: int = 1
    headers: tuple[str, ...] = ()
    bytesPerRequest: int = 0
    """When set, the figure is MiB/s (requests/s times this) instead of
    requests/s."""


FIGURES = [
    Figure("R1", "requests/s over kept-alive TLS, 1 KiB responses", "wrk", SMALL_PATH, 50),
    Figure(
        "R2",
        "new TLS connections/s, full handshakes, one request each",
        "handshakes",
        SMALL_PATH,
        50,
    ),
    Figure(
        "R2r",
        "new TLS connections/s as wrk makes them (session resumed), one request each",
        "wrk",
        SMALL_PATH,
        50,
        headers=("Connection: close",),
    ),
    Figure(
        "R3",
        "MiB/s of 1 MiB responses over kept-alive TLS",
        "wrk",
        LARGE_PATH,
        10,
        bytesPerRequest=LARGE_SIZE,
    ),
    Figure("R5", "requests/s over HTTP/2, 1 KiB responses", "h2load", SMALL_PATH, 50, streams=10),
]
WHOLE_MACHINE = Figure(
    "R1x2", "R1 with 2 workers, nothing pinned", "wrk", SMALL_PATH, 50
)
SECURED = Figure(
    "R1s",
    "R1 with an allow rule, a local rate limit and JWT auth on the route (edgeproxy only)",
    "wrk",
    SMALL_PATH,
    50,
)
SECURED_TARGET = 0.85
"""R1s / R1 of the same revision at least (issue 12)."""
CACHE_FIGURES = [
    Figure("H1", "cache hits/s over kept-alive TLS, 1 KiB objects", "wrk", SMALL_PATH, 50),
    Figure("H3", "cache hits/s over kept-alive TLS, 1 MiB objects", "wrk", LARGE_PATH, 10),
]
"""The cache figures: the same objects as R1 and R3, served from the
proxy's cache (edgeproxy's memory tier, nginx's C{proxy_cache}) by proxies
of their own, filled before they are measured."""
CACHED = ("edgeproxy", "nginx")
"""The proxies measured with their cache (HAProxy's is a small RAM cache of
small objects, not a shared cache: left out)."""


def describe(run: dict[str, Any]) -> str:
    """One load run in one line, for the progress log."""

    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (
        f"{num(run['value'], 1)} (p50 {num(run['p50ms'])} ms, p99 {num(run['p99ms'])} ms; "
        f"CPU cores: proxy {num(run['proxyCores'])}, load generator "
        f"{num(run['loadGeneratorCores'])}, origin {num(run['originCores'])})"
    )


class Interrupted(Exception):
    pass


def _onSignal(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def detectTools() -> dict[str, str | None]:
    return {name: shutil.which(name) for name in ("nginx", "haproxy", "wrk", "h2load")}


def toolVersions(tools: dict[str, str | None]) -> dict[str, str]:
    flags = {"nginx": ["-v"], "haproxy": ["-v"], "wrk": ["-v"], "h2load": ["--version"]}
    versions = {}
    for name, path in tools.items():
        if path is None:
            continue
        try:
            out = subprocess.run(
                [path, *flags[name]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        versions[name] = out.strip().splitlines()[0] if out.strip() else "?"
    return versions


def gitRevision() -> str | None:
    """The commit measured, with C{-dirty} when the tree has changes."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out or None


def _shortPath(path: str) -> str:
    """C{path} relative to the repository when it is inside it."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def checkoutEnvironment() -> dict[str, str]:
    """
    The environment edgeproxy runs in: this checkout first on C{sys.path},
    so that the revision measured is the one the command was run from
    (the venv may hold another checkout's code), the same for R1 and R1s.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def twistdCommand(python: str) -> list[str]:
    """The twistd that belongs to C{python} (the venv's, normally)."""
    beside = Path(python).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    return [python, "-c", "from twisted.scripts.twistd import run; run()"]


class Bench:
    """One run of the suite: its directory, servers, results and notes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tools = detectTools()
        self.servers: list[Server] = []
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.probes: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, int] = {}
        self.proxies: dict[str, Server] = {}
        self.originKind = ""
        twoCpus = len(os.sched_getaffinity(0)) >= 2 and not args.no_pin
        cpus = sorted(os.sched_getaffinity(0))
        self.proxyCpus = {cpus[0]} if twoCpus else None
        self.loadCpus = {cpus[1]} if twoCpus else None
        if not twoCpus:
            self.notes.append("fewer than two CPUs (or --no-pin): nothing is pinned")

    # --- setup ------------------------------------------------------------

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def makeCertificates(self) -> None:
        from tests.certutil import CertificateAuthority

        ca = CertificateAuthority("edgeproxy benchmark root")
        leaf = ca.issue(["localhost", "127.0.0.1"])
        certs = self.work / "certs"
        for sub in ("pem", "pair"):
            (certs / sub).mkdir(parents=True)
        self.caFile = ca.writeCertificate(certs / "ca.pem")
        # One PEM (key + certificate) for edgeproxy and HAProxy, the same key
        # and certificate as a .crt/.key pair for nginx.
        self.pemDir = certs / "pem"
        self.pemFile = leaf.writePEM(self.pemDir / "bench.pem")
        self.crtFile, self.keyFile = leaf.writePair(certs / "pair", "bench")
        # Throwaway keys, but the directory is world-readable (for nginx's
        # workers): only the servers' own user (the masters read keys) needs them.
        self.pemFile.chmod(0o600)
        self.keyFile.chmod(0o600)

    def startServer(self, server: Server) -> Server:
        self.servers.append(server)
        server.start()
        return server

    def startOrigin(self) -> None:
        port = servers.freePort()
        root = self.work / "www"
        root.mkdir()
        (root / SMALL_PATH.lstrip("/")).write_bytes(b"x" * servers.SMALL_SIZE)
        (root / LARGE_PATH.lstrip("/")).write_bytes(b"x" * LARGE_SIZE)
        if self.tools["nginx"] and not self.args.python_origin:
            conf = self.work / "origin.conf"
            conf.write_text(servers.nginxOriginConfig(root, port, self.work))
            argv = [self.tools["nginx"], "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "origin-error.log")]
            self.originKind = "nginx (static files, 1 worker, sendfile, keep-alive)"
        else:
            argv = [sys.executable, str(REPO / "benchmarks" / "origin.py"), str(port)]
            self.originKind = "Python asyncio (benchmarks/origin.py, fixed bodies from memory)"
        self.origin = self.startServer(
            Server("origin", argv, self.work / "logs", cpus=self.loadCpus)
        )
        servers.waitOrigin(self.origin, port, timeout=15)
        self.originPort = port
        self.log(f"origin: {self.originKind} on 127.0.0.1:{port}")

    def proxyServer(
        self, name: str, workers: int = 1, pinned: bool = True, cache: bool = False, suffix: str = ""
    ) -> tuple[Server, int]:
        """Configure (but do not start) proxy C{name}; (server, port).
        C{suffix} tells its files from those of another of the same kind."""
        port = servers.freePort()
        tag = name if workers == 1 else f"{name}-w{workers}"
        if cache:
            tag += "-cache"
        tag += suffix
        cpus = self.proxyCpus if pinned else None
        logs = self.work / "logs"
        env = None
        if name == "edgeproxy":
            ini = self.work / f"{tag}.ini"
            ini.write_text(
                servers.edgeproxyConfig(
                    port, self.originPort, self.pemDir, workers if workers != 1 else None, cache=cache
                )
            )
            argv = twistdCommand(self.args.python) + [
                "--nodaemon", "--pidfile=", "edgeproxy", "--config", str(ini)
            ]
            env = checkoutEnvironment()
        elif name == "nginx":
            conf = self.work / f"{tag}.conf"
            conf.write_text(
                servers.nginxProxyConfig(
                    port, self.originPort, self.crtFile, self.keyFile, self.work, workers, tag,
                    cache=cache,
                )
            )
            argv = [self.tools["nginx"], "-p", str(self.work), "-c", str(conf), "-e", str(self.work / f"{tag}-error.log")]
        else:
            conf = self.work / f"{tag}.cfg"
            conf.write_text(servers.haproxyConfig(port, self.originPort, self.pemFile, workers))
            argv = [self.tools["haproxy"], "-db", "-f", str(conf)]
        return Server(tag, argv, logs, cpus=cpus, env=env), port

    def startProxies(self) -> None:
        for name in self.args.proxies:
            if name != "edgeproxy" and not self.tools[name]:
                self.notes.append(f"{name} is not installed: left out")
                continue
            server, port = self.proxyServer(name)
            self.startServer(server)
            try:
                found = servers.waitReady(server, port, self.caFile, self.args.start_timeout)
            except RuntimeError as e:
                self.failures.append(f"{name} did not start: {e}")
                self.log(f"FAILED: {name} did not start: {e}")
                server.stop()
                continue
            self.proxies[name] = server
            self.ports[name] = port
            self.probes[name] = asdict(found)
            self.results[name] = {}
            self.log(
                f"{name}: pid {server.pid} on 127.0.0.1:{port}, {found.tlsVersion} "
                f"{found.cipher}, {found.keyType}, ALPN {found.alpn}, "
                f"session resumption {'yes' if found.resumption else 'no'}"
            )

    # --- measuring --------------------------------------------------------

    def measureMemory(self, name: str) -> None:
        """R4: RSS at rest, then with C{--idle} idle TLS connections open."""
        self.results[name]["R4"] = self.idleMemory(name, self.proxies[name], self.ports[name], "R4")

    def measureMemoryAtStart(self, name: str) -> None:
        """
        R4b: the same, given to a proxy started for it that nothing has
        connected to yet (its listening socket alone tells it is up: one
        connection before the burst would set up what the burst should), the
        first 64 connections all accepted before any handshake ends
        (C{idle.py queued}): a proxy restarted into the clients queued in
        its listen backlog.  R4's proxy has answered its readiness request
        first, and its connections come a few at a time.
        """
        server, port = self.proxyServer(name, suffix="-fresh")
        self.startServer(server)
        try:
            servers.waitListening(server, port, self.args.start_timeout)
            self.results[name]["R4b"] = self.idleMemory(name, server, port, "R4b", queued=True)
        finally:
            server.stop()

    def idleMemory(self, name: str, server: Server, port: int, figure: str, queued: bool = False) -> dict[str, Any]:
        """C{figure}'s runs and median: RSS at rest, then with C{--idle}
        idle TLS connections open against C{port}."""
        time.sleep(0.5)
        rest = server.rssKiB()
        holder = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "idle.py"), str(port), str(self.args.idle), "120"]
            + (["queued"] if queued else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=servers.pinTo(self.loadCpus),
        )
        try:
            line = holder.stdout.readline().split()
            if len(line) != 3 or line[0] != "READY":
                raise RuntimeError(f"idle connection holder said {line!r}")
            opened, failed = int(line[1]), int(line[2])
            # Let the server finish whatever it does after the last response.
            time.sleep(1.0)
            loaded = server.rssKiB()
        finally:
            holder.stdin.close()
            try:
                holder.wait(30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        perConnection = (loaded - rest) / opened if opened else None
        run = {
            "restKiB": rest,
            "restMiB": rest / 1024,
            "loadedKiB": loaded,
            "opened": opened,
            "failed": failed,
            "perConnectionKiB": perConnection,
            "pids": server.servingPids(),
        }
        if failed:
            self.failures.append(f"{name} {figure}: {failed} of {self.args.idle} idle connections failed")
        self.log(
            f"{name} {figure}: rest {rest / 1024:.1f} MiB, {opened} idle connections "
            f"(+{failed} failed): {perConnection if perConnection is None else round(perConnection, 1)} KiB each"
        )
        return {"runs": [run], "median": report.summarise([run])}

    def loadRun(self, figure: Figure, name: str, server: Server, port: int, seconds: int,
                threads: int = 1, loadCpus: set[int] | None = None) -> dict[str, Any]:
        url = f"https://127.0.0.1:{port}{figure.path}"
        originBefore = self.origin.cpuSeconds()
        before = server.cpuSeconds()
        if figure.tool == "handshakes":
            result = loadgen.runHandshakes(
                sys.executable, port, figure.connections, seconds, loadCpus
            )
        elif figure.tool == "wrk":
            result = loadgen.runWrk(
                self.tools["wrk"], url, figure.connections, seconds, loadCpus,
                threads=threads, headers=figure.headers,
            )
        else:
            result = loadgen.runH2load(
                self.tools["h2load"], url, figure.connections, figure.streams, seconds,
                loadCpus, self.work / "h2load.log", threads=threads,
            )
        proxyCpu = server.cpuSeconds() - before
        originCpu = self.origin.cpuSeconds() - originBefore
        value = result.rate * figure.bytesPerRequest / MiB if figure.bytesPerRequest else result.rate
        cores = proxyCpu / result.seconds if result.seconds else None
        run = {
            "value": value,
            "requestsPerSecond": result.rate,
            "requests": result.requests,
            "seconds": result.seconds,
            "p50ms": result.p50ms,
            "p99ms": result.p99ms,
            "errors": result.errors,
            "bad": result.bad,
            "proxyCpuSeconds": proxyCpu,
            "proxyCores": cores,
            "perCore": value / cores if cores else None,
            "loadGeneratorCores": result.loadCpuSeconds / result.seconds if result.seconds else None,
            "originCores": originCpu / result.seconds if result.seconds else None,
        }
        if result.errors or result.bad:
            self.failures.append(
                f"{name} {figure.key}: {result.errors} errors, {result.bad} non-2xx/3xx "
                f"of {result.requests} requests"
            )
        if not server.alive():
            raise RuntimeError(f"{name} died during {figure.key}:\n{server.logTail()}")
        return run

    def measureLoad(self, figure: Figure) -> None:
        tool = sys.executable if figure.tool == "handshakes" else self.tools[figure.tool]
        if tool is None:
            self.notes.append(f"{figure.tool} is not installed: {figure.key} left out")
            return
        for round in range(self.args.runs):
            for name, server in self.proxies.items():
                self.measureRun(figure, name, server, self.ports[name], round)

    def measureRun(self, figure: Figure, name: str, server: Server, port: int, round: int) -> None:
        """One run of C{figure} against C{name}, recorded (or its failure)."""
        try:
            run = self.loadRun(figure, name, server, port, self.args.duration, loadCpus=self.loadCpus)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            self.failures.append(f"{name} {figure.key} run {round + 1}: {e}")
            self.log(f"FAILED: {name} {figure.key} run {round + 1}: {e}")
            return
        entry = self.results[name].setdefault(figure.key, {"runs": []})
        entry["runs"].append(run)
        entry["median"] = report.summarise(entry["runs"])
        self.log(f"{name} {figure.key} run {round + 1}/{self.args.runs}: {describe(run)}")

    def warmUp(self) -> None:
        if self.tools["wrk"] is None or self.args.warmup <= 0:
            return
        for name, server in self.proxies.items():
            try:
                loadgen.runWrk(
                    self.tools["wrk"], f"https://127.0.0.1:{self.ports[name]}{SMALL_PATH}",
                    50, self.args.warmup, self.loadCpus,
                )
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                self.log(f"warm-up of {name} failed: {e}")

    def measureWholeMachine(self) -> None:
        """R1x2: each proxy with two workers (threads for HAProxy), unpinned."""
        if self.tools["wrk"] is None:
            return
        for name in list(self.proxies):
            server, port = self.proxyServer(name, workers=2, pinned=False)
            self.startServer(server)
            try:
                servers.waitReady(server, port, self.caFile, self.args.start_timeout)
            except RuntimeError as e:
                why = str(e).strip().splitlines()[-1]
                self.notes.append(f"{name} with 2 workers did not start, R1x2 left out: {why}")
                self.log(f"{name} with 2 workers did not start: {e}")
                server.stop()
                continue
            try:
                self.loadRun(WHOLE_MACHINE, name, server, port, 1, threads=2)  # warm-up
                for round in range(self.args.runs):
                    run = self.loadRun(WHOLE_MACHINE, name, server, port, self.args.duration, threads=2)
                    entry = self.results[name].setdefault("R1x2", {"runs": []})
                    entry["runs"].append(run)
                    entry["median"] = report.summarise(entry["runs"])
                    self.log(f"{name} R1x2 run {round + 1}/{self.args.runs}: {describe(run)}")
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                self.failures.append(f"{name} R1x2: {e}")
            finally:
                server.stop()

    def measureSecured(self) -> None:
        """
        R1s: R1 against a second edgeproxy, on the same CPUs, whose route has
        an allow rule, a local rate limit and JWT authentication (every
        request carries a valid token); reported as a ratio to R1.
        """
        if "edgeproxy" not in self.proxies or self.tools["wrk"] is None:
            self.notes.append("R1s needs edgeproxy and wrk: left out")
            return
        token, jwks = servers.securedCredentials(self.work)
        port = servers.freePort()
        ini = self.work / "edgeproxy-secured.ini"
        ini.write_text(servers.edgeproxySecuredConfig(port, self.originPort, self.pemDir, jwks))
        argv = twistdCommand(self.args.python) + [
            "--nodaemon", "--pidfile=", "edgeproxy", "--config", str(ini)
        ]
        server = Server(
            "edgeproxy-secured", argv, self.work / "logs", cpus=self.proxyCpus, env=checkoutEnvironment()
        )
        self.startServer(server)
        try:
            servers.waitReady(server, port, self.caFile, self.args.start_timeout)
        except RuntimeError as e:
            self.failures.append(f"edgeproxy R1s did not start: {e}")
            server.stop()
            return
        figure = replace(SECURED, headers=(f"Authorization: Bearer {token}",))
        try:
            if self.args.warmup > 0:
                self.loadRun(figure, "edgeproxy", server, port, 1)
            for round in range(self.args.runs):
                run = self.loadRun(figure, "edgeproxy", server, port, self.args.duration,
                                   loadCpus=self.loadCpus)
                entry = self.results["edgeproxy"].setdefault("R1s", {"runs": []})
                entry["runs"].append(run)
                entry["median"] = report.summarise(entry["runs"])
                self.log(f"edgeproxy R1s run {round + 1}/{self.args.runs}: {describe(run)}")
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            self.failures.append(f"edgeproxy R1s: {e}")
        finally:
            server.stop()
        plain = self.results["edgeproxy"].get("R1", {}).get("median") or {}
        secured = self.results["edgeproxy"].get("R1s", {}).get("median") or {}
        self.secured = {
            "ratio": report.ratio(secured.get("value"), plain.get("value")),
            "perCoreRatio": report.ratio(secured.get("perCore"), plain.get("perCore")),
            "target": SECURED_TARGET,
        }

    def measureCache(self) -> None:
        """
        H1 and H3: cache hits over kept-alive TLS, each proxy with its
        cache filled by a first request and a warm-up, pinned like R1; the
        proxies take turns within each round as in L{measureLoad}.
        """
        figures = [figure for figure in CACHE_FIGURES if self.wanted(figure.key)]
        if self.tools["wrk"] is None or not figures:
            return
        started: dict[str, tuple[Server, int]] = {}
        try:
            for name in self.proxies:
                if name not in CACHED:
                    continue
                server, port = self.proxyServer(name, cache=True)
                self.startServer(server)
                try:
                    servers.waitReady(server, port, self.caFile, self.args.start_timeout)
                except RuntimeError as e:
                    self.failures.append(f"{name} with its cache did not start: {e}")
                    self.log(f"FAILED: {name} with its cache did not start: {e}")
                    server.stop()
                    continue
                started[name] = (server, port)
            for figure in figures:
                for name, (server, port) in started.items():
                    # The first request stores the object; the warm-up run
                    # makes sure every connection finds it.
                    try:
                        self.loadRun(figure, name, server, port, 1, loadCpus=self.loadCpus)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                        self.log(f"warm-up of {name} {figure.key} failed: {e}")
                for round in range(self.args.runs):
                    for name, (server, port) in started.items():
                        self.measureRun(figure, name, server, port, round)
        finally:
            for server, _ in started.values():
                server.stop()

    # --- the whole run ----------------------------------------------------

    def wanted(self, key: str) -> bool:
        """Whether C{--figures} asks for figure C{key} (all by default)."""
        figures = getattr(self.args, "figures", None)
        return not figures or key in figures

    def run(self) -> dict[str, Any]:
        started = datetime.datetime.now(datetime.timezone.utc)
        self.work = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
        # nginx workers drop to nobody when we are root: they must read the
        # static files and write their temporary directories.
        self.work.chmod(0o755)
        try:
            self.makeCertificates()
            self.startOrigin()
            self.startProxies()
            if self.proxies:
                for name in self.proxies if self.wanted("R4") else ():
                    try:
                        self.measureMemory(name)
                    except (RuntimeError, OSError, ValueError) as e:
                        self.failures.append(f"{name} R4: {e}")
                        self.log(f"FAILED: {name} R4: {e}")
                for name in list(self.proxies) if self.wanted("R4b") else ():
                    try:
                        self.measureMemoryAtStart(name)
                    except (RuntimeError, OSError, ValueError) as e:
                        self.failures.append(f"{name} R4b: {e}")
                        self.log(f"FAILED: {name} R4b: {e}")
                self.warmUp()
                for figure in FIGURES:
                    if self.wanted(figure.key):
                        self.measureLoad(figure)
                if self.wanted("R1s"):
                    self.measureSecured()
                self.measureCache()
                if self.args.whole_machine:
                    self.measureWholeMachine()
        finally:
            for server in reversed(self.servers):
                server.stop()
            if self.args.keep:
                self.log(f"kept {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        rows = report.table(self.results)
        return {
            "command": " ".join([_shortPath(sys.executable), *sys.argv]),
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {
                "nproc": os.cpu_count(),
                "cpu": procstat.cpuModel(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "tools": toolVersions(self.tools),
            "revision": gitRevision(),
            "origin": self.originKind,
            "pinning": {
                "proxies": sorted(self.proxyCpus) if self.proxyCpus else None,
                "loadGeneratorAndOrigin": sorted(self.loadCpus) if self.loadCpus else None,
            },
            "settings": {
                "duration": self.args.duration,
                "runs": self.args.runs,
                "idleConnections": self.args.idle,
                "figures": {f.key: asdict(f) for f in [*FIGURES, *CACHE_FIGURES, WHOLE_MACHINE, SECURED]},
            },
            "tls": self.probes,
            "results": self.results,
            "table": rows,
            "targets": report.targets(rows),
            "secured": getattr(self, "secured", None),
            "hitVersusProxied": report.hitVersusProxied(self.results),
            "notes": self.notes,
            "failures": self.failures,
        }


def runContent(args: argparse.Namespace) -> dict[str, Any]:
    """
    The compression and image figures (C{benchmarks/content.py}, its own
    servers, after this run's are stopped); their table is printed, their
    results returned for the JSON.
    """
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        completed = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "content.py"), "--duration",
             str(args.duration), "--python", args.python, "--json", out.name,
             *(["--quick"] if args.quick else [])],
            stdout=subprocess.PIPE, text=True, timeout=60 * (args.duration + 10),
        )
        print(completed.stdout, end="")
        try:
            return json.loads(Path(out.name).read_text())
        except ValueError:
            return {"failed": completed.returncode}


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny durations, one run, 200 idle connections (the smoke test)")
    parser.add_argument("--duration", type=int, help="seconds per load run (default 10; 1 with --quick)")
    parser.add_argument("--runs", type=int, help="runs per figure, the median is reported (default 3; 1 with --quick)")
    parser.add_argument("--idle", type=int, help="idle TLS connections for R4 (default 2000; 200 with --quick)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load per proxy (default 2; 0 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--proxies", default="edgeproxy,nginx,haproxy",
                        help="comma-separated subset of edgeproxy,nginx,haproxy")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python whose twistd runs edgeproxy (default: this one)")
    parser.add_argument("--python-origin", action="store_true",
                        help="use the Python origin even when nginx is installed")
    parser.add_argument("--whole-machine", dest="whole_machine", action="store_true", default=None,
                        help="also measure R1x2 (2 workers, unpinned); default on unless --quick")
    parser.add_argument("--no-whole-machine", dest="whole_machine", action="store_false")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything to CPUs")
    parser.add_argument("--start-timeout", type=float, default=30.0,
                        help="seconds a proxy has to answer its first request")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--content", dest="content", action="store_true", default=None,
                        help="also run benchmarks/content.py (compression and images) after the "
                        "table; default on unless --quick")
    parser.add_argument("--no-content", dest="content", action="store_false")
    parser.add_argument("--figures", default="",
                        help="comma-separated figures to measure, e.g. R1,R3 (default: all); "
                        "for quick A/B runs of one change")
    args = parser.parse_args(argv)
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    known = {f.key for f in [*FIGURES, *CACHE_FIGURES]} | {"R4", "R4b", "R1s"}
    if set(args.figures) - known:
        parser.error(f"unknown figures: {', '.join(sorted(set(args.figures) - known))}")
    defaults = {"duration": (10, 1), "runs": (3, 1), "idle": (2000, 200), "warmup": (2, 0)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.whole_machine is None:
        args.whole_machine = not args.quick
    if args.content is None:
        args.content = not args.quick
    args.proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    unknown = set(args.proxies) - set(report.PROXIES)
    if unknown:
        parser.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    if args.duration < 1:
        parser.error("--duration must be at least 1 (wrk counts whole seconds)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parseArgs(argv)
    # 2,000 idle connections, 50 load connections, pools: more than the usual
    # soft limit of 1,024 descriptors.  Children inherit it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, _onSignal)
    signal.signal(signal.SIGHUP, _onSignal)
    bench = Bench(args)
    try:
        result = bench.run()
    except Interrupted as e:
        print(f"interrupted ({e}); every server was stopped", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print()
    print(f"edgeproxy benchmarks, {result['date']}, revision {result['revision']}, "
          f"{result['machine']['nproc']} CPUs ({result['machine']['cpu']}), "
          f"origin: {result['origin']}")
    print(f"{args.runs} run(s) of {args.duration}s per figure, medians; proxies on CPU "
          f"{result['pinning']['proxies']}, load generator and origin on CPU "
          f"{result['pinning']['loadGeneratorAndOrigin']}")
    print(report.formatTable(result["table"]))
    if any(t["ratio"] is not None for t in result["targets"]):
        print(report.formatTargets(result["targets"]))
    secured = result.get("secured")
    if secured and secured.get("ratio") is not None:
        perCore = secured.get("perCoreRatio")
        print(
            f"R1s / R1 (allow rule, local rate limit, JWT auth): {secured['ratio']:.2f}"
            + (f", per CPU second {perCore:.2f}" if perCore is not None else "")
            + f" (target >= {secured['target']})"
        )
    if result["hitVersusProxied"] is not None:
        print(report.formatHitVersusProxied(result["hitVersusProxied"]))
    for note in result["notes"]:
        print(f"note: {note}")
    for failure in result["failures"]:
        print(f"FAILURE: {failure}")
    if args.content:
        result["content"] = runContent(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
