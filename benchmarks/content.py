# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
The content-optimisation figures (C{docs/performance.rst}, "Compression and
images"), measured in one run:

  - C1: compression throughput of each encoder at its default level
    (MiB of input per CPU-second, one core), on a generated text corpus
    fed in 64 KiB pieces and flushed after each, as the stage does; and the
    compression ratio;
  - C2: the same end to end: MiB/s of uncompressed 1 MiB pages per proxy
    CPU core, through edgeproxy (C{compress = zstd, br, gzip}, each encoding
    asked for by C{Accept-Encoding}) and through nginx's C{gzip} at the same
    level, over kept-alive TLS with C{wrk}, in the same run;
  - I1: conversions per second and bytes saved, for AVIF and WebP at the
    default quality, on a fixed set of generated photos (JPEG) and
    screenshots (PNG), in C{image_workers} (the CPU count) real conversion
    processes (C{python -m edgeproxy.content.worker});
  - I2: the p99 latency of unrelated proxied requests (1 KiB, at a fixed
    rate) while clients keep the conversion pool saturated, against the
    same requests with the pool idle;
  - I3: why processes: the p99 lag of an event loop in this process while
    conversions run in threads of the same process, and while they run in
    conversion processes.

    .venv/bin/python benchmarks/content.py [--quick] [--duration S] [--json out.json]
    .venv/bin/python benchmarks/content.py --figures C1,I1      # some of them

C{benchmarks/run.py --content} runs it after the main table.  Everything
listens on 127.0.0.1; every server is a child stopped by its pid; every
load is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import httpwire, loadgen, servers  # noqa: E402
from benchmarks.servers import Server  # noqa: E402

MiB = 1024 * 1024
FIGURES = ("C1", "C2", "I1", "I2", "I3")
PAGE_PATH = "/page.html"
PHOTO_PATH = "/photo.jpg"


# --- inputs -------------------------------------------------------------------


def textCorpus(size: int, seed: int = 7) -> bytes:
    """
    Generated text that compresses like real pages and API answers: HTML
    with varied words, JSON records with numbers, JavaScript-like lines.
    """
    rng = random.Random(seed)
    words = (
        "edge proxy request response header body cache image compress stream "
        "client backend route upstream listener certificate session ticket "
        "value number string object array function return const let var"
    ).split()
    parts: list[bytes] = []
    total = 0
    while total < size:
        kind = rng.randrange(3)
        if kind == 0:
            text = " ".join(rng.choice(words) for _ in range(rng.randrange(5, 25)))
            piece = f'<div class="{rng.choice(words)}-{rng.randrange(100)}"><p>{text}</p></div>\n'
        elif kind == 1:
            record = {
                "id": rng.randrange(10**9),
                "name": rng.choice(words) + rng.choice(words),
                "price": round(rng.random() * 1000, 2),
                "tags": [rng.choice(words) for _ in range(rng.randrange(1, 5))],
                "active": rng.random() < 0.5,
            }
            piece = json.dumps(record) + ",\n"
        else:
            piece = (
                f"function {rng.choice(words)}{rng.randrange(1000)}(a, b) "
                f"{{ return a.{rng.choice(words)} + b[{rng.randrange(64)}]; }}\n"
            )
        data = piece.encode()
        parts.append(data)
        total += len(data)
    return b"".join(parts)[:size]


def imageSet(quick: bool) -> dict[str, list[bytes]]:
    """The fixed images of I1: photos as JPEG, screenshots as PNG."""
    from tests.imageutil import photoJPEG, screenshotPNG

    if quick:
        return {"photo": [photoJPEG(400, 300, seed=1)], "screenshot": [screenshotPNG(640, 400, seed=2)]}
    return {
        "photo": [photoJPEG(1600, 1200, seed=s) for s in range(1, 5)],
        "screenshot": [screenshotPNG(1280, 800, seed=s) for s in range(1, 5)],
    }


# --- C1 -------------------------------------------------------------------------


def measureEncoders(seconds: float, corpusSize: int) -> dict[str, Any]:
    from edgeproxy.config.stagemodel import COMPRESS_LEVELS
    from edgeproxy.content.encoders import makeEncoder

    corpus = textCorpus(corpusSize)
    pieces = [corpus[i : i + 64 * 1024] for i in range(0, len(corpus), 64 * 1024)]
    results = {}
    for name, (_, _, level) in COMPRESS_LEVELS.items():
        started = time.process_time()
        read = written = passes = 0
        while passes == 0 or time.process_time() - started < seconds:
            encoder = makeEncoder(name.encode(), level)
            for piece in pieces:
                written += len(encoder.compress(piece))
            written += len(encoder.finish())
            read += len(corpus)
            passes += 1
        cpu = time.process_time() - started
        results[name] = {
            "level": level,
            "mibPerCoreSecond": read / MiB / cpu,
            "ratio": read / written,
        }
    return results


# --- the servers of C2 and I2 ---------------------------------------------------------


def nginxOrigin(root: Path, port: int, prefix: Path) -> str:
    """nginx as the origin, with the media types the stages look at."""
    conf = servers.nginxOriginConfig(root, port, prefix)
    return conf.replace(
        "    default_type application/octet-stream;\n",
        "    default_type application/octet-stream;\n"
        "    types { text/html html; image/jpeg jpg; application/octet-stream bin; }\n",
    )


NGINX_GZIP = """\
    gzip on;
    gzip_comp_level {level};
    gzip_proxied any;
    gzip_min_length 1024;
    gzip_types text/html application/json;
"""


class Setup:
    """The temporary directory, certificates, origin and proxies of a run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="edgeproxy-content-"))
        self.work.chmod(0o755)
        self.servers: list[Server] = []
        self.notes: list[str] = []

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def start(self) -> None:
        from tests.certutil import CertificateAuthority

        ca = CertificateAuthority("edgeproxy content benchmark root")
        leaf = ca.issue(["localhost", "127.0.0.1"])
        certs = self.work / "certs"
        (certs / "pem").mkdir(parents=True)
        self.caFile = ca.writeCertificate(certs / "ca.pem")
        self.pemDir = certs / "pem"
        leaf.writePEM(self.pemDir / "bench.pem").chmod(0o600)
        self.crtFile, self.keyFile = leaf.writePair(certs, "bench")
        self.keyFile.chmod(0o600)
        root = self.work / "www"
        root.mkdir()
        (root / PAGE_PATH.lstrip("/")).write_bytes(textCorpus(MiB))
        (root / servers.SMALL_PATH.lstrip("/")).write_bytes(b"x" * servers.SMALL_SIZE)
        from tests.imageutil import photoJPEG

        (root / PHOTO_PATH.lstrip("/")).write_bytes(photoJPEG(1024, 768))
        self.originPort = servers.freePort()
        nginx = shutil.which("nginx")
        if nginx:
            conf = self.work / "origin.conf"
            conf.write_text(nginxOrigin(root, self.originPort, self.work))
            argv = [nginx, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "origin-error.log")]
        else:
            argv = [sys.executable, str(Path(__file__)), "--origin", str(self.originPort), str(root)]
            self.notes.append("nginx is not installed: Python origin, no nginx column in C2")
        self.origin = self.startServer(Server("origin", argv, self.work / "logs"))
        servers.waitOrigin(self.origin, self.originPort, timeout=15)

    def startServer(self, server: Server) -> Server:
        self.servers.append(server)
        server.start()
        return server

    def edgeproxy(self, tag: str, routeExtra: str, proxyExtra: str = "", cpus: set[int] | None = None) -> tuple[Server, int]:
        port = servers.freePort()
        ini = self.work / f"{tag}.ini"
        text = servers.edgeproxyConfig(port, self.originPort, self.pemDir)
        text = text.replace("[edgeproxy]\n", "[edgeproxy]\n" + proxyExtra, 1) + routeExtra
        ini.write_text(text)
        from benchmarks.run import twistdCommand

        command = twistdCommand(self.args.python)
        # This checkout's edgeproxy (and its twistd plugin), whatever the
        # venv has installed.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        argv = command + ["--nodaemon", "--pidfile=", "edgeproxy", "--config", str(ini)]
        server = self.startServer(Server(tag, argv, self.work / "logs", cpus=cpus, env=env))
        servers.waitReady(server, port, self.caFile, 30)
        return server, port

    def nginxGzip(self, level: int, cpus: set[int] | None) -> tuple[Server, int] | None:
        nginx = shutil.which("nginx")
        if nginx is None:
            return None
        port = servers.freePort()
        conf = self.work / "nginx-gzip.conf"
        text = servers.nginxProxyConfig(port, self.originPort, self.crtFile, self.keyFile, self.work, 1, "nginx-gzip")
        conf.write_text(text.replace("    access_log off;\n", "    access_log off;\n" + NGINX_GZIP.format(level=level), 1))
        argv = [nginx, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "nginx-gzip-error.log")]
        server = self.startServer(Server("nginx-gzip", argv, self.work / "logs", cpus=cpus))
        servers.waitReady(server, port, self.caFile, 30)
        return server, port

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        if self.args.keep:
            self.log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def cpuSplit() -> tuple[set[int] | None, set[int] | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


# --- C2 -------------------------------------------------------------------------------


def measureEndToEnd(setup: Setup, seconds: int) -> dict[str, Any]:
    from edgeproxy.config.stagemodel import COMPRESS_LEVELS

    wrk = shutil.which("wrk")
    if wrk is None:
        setup.notes.append("wrk is not installed: C2 left out")
        return {}
    proxyCpus, loadCpus = cpuSplit()
    results: dict[str, Any] = {}
    edge, edgePort = setup.edgeproxy("edgeproxy-compress", "compress = zstd, br, gzip\n", cpus=proxyCpus)
    runs: list[tuple[str, Server, int, str]] = [
        (f"edgeproxy {name}", edge, edgePort, name) for name in ("zstd", "br", "gzip")
    ]
    nginx = setup.nginxGzip(COMPRESS_LEVELS["gzip"][2], proxyCpus)
    if nginx is not None:
        runs.append(("nginx gzip", nginx[0], nginx[1], "gzip"))
    url = "https://127.0.0.1:{port}" + PAGE_PATH
    for label, server, port, encoding in runs:
        before = server.cpuSeconds()
        result = loadgen.runWrk(wrk, url.format(port=port), 10, seconds, loadCpus,
                                headers=(f"Accept-Encoding: {encoding}",))
        cpu = server.cpuSeconds() - before
        cores = cpu / result.seconds if result.seconds else None
        mib = result.requests  # 1 MiB pages
        results[label] = {
            "encoding": encoding,
            "mibPerSecond": mib / result.seconds if result.seconds else None,
            "proxyCores": cores,
            "mibPerCoreSecond": mib / cpu if cpu else None,
            "p99ms": result.p99ms,
            "errors": result.errors + result.bad,
        }
        setup.log(f"C2 {label}: {results[label]}")
    return results


# --- I1 -------------------------------------------------------------------------------


class ConversionProcess:
    """One real conversion process, driven with frames (as the pool does)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy.content.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )

    def convert(self, fields: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        from edgeproxy.content.worker import readFrame, writeFrame

        assert self.process.stdin is not None and self.process.stdout is not None
        writeFrame(self.process.stdin, fields, data)
        frame = readFrame(self.process.stdout)  # type: ignore[arg-type]
        if frame is None:
            raise RuntimeError("the conversion process ended")
        return frame

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measureConversions(seconds: float, quick: bool) -> dict[str, Any]:
    from edgeproxy.config.stagemodel import IMAGE_QUALITY, ImageSettings
    from edgeproxy.content.job import Job

    images = imageSet(quick)
    workers = max(1, os.cpu_count() or 1)
    maxPixels = ImageSettings(formats=()).max_pixels
    results: dict[str, Any] = {"workers": workers}
    processes = [ConversionProcess() for _ in range(workers)]
    try:
        for fmt, quality in IMAGE_QUALITY.items():
            job = Job(fmt, quality, maxPixels)._asdict()
            # Bytes saved: each image once.
            for kind, items in images.items():
                read = written = 0
                for data in items:
                    meta, out = processes[0].convert(job, data)
                    read += len(data)
                    written += len(out) if meta["outcome"] == "converted" else len(data)
                results[f"{fmt} {kind}"] = {
                    "imagesBytes": read,
                    "convertedBytes": written,
                    "saved": 1 - written / read,
                }
            # Conversions per second: every process busy for the duration.
            every = [data for items in images.values() for data in items]
            counts = [0] * workers
            deadline = time.monotonic() + seconds

            def loop(index: int) -> None:
                i = index
                while time.monotonic() < deadline or counts[index] == 0:
                    processes[index].convert(job, every[i % len(every)])
                    counts[index] += 1
                    i += 1

            started = time.monotonic()
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            results[fmt] = {
                "conversionsPerSecond": sum(counts) / elapsed,
                "perWorker": sum(counts) / elapsed / workers,
                "quality": quality,
            }
    finally:
        for process in processes:
            process.close()
    return results


# --- I2 -------------------------------------------------------------------------------


async def _fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str,
                 extra: str = "") -> tuple[int, bytes]:
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    data = b""
    while True:
        parsed = httpwire.parse(data)
        if parsed is not None:
            return parsed
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("closed mid-response")
        data += chunk


async def _probe(port: int, context: ssl.SSLContext, seconds: float, rate: float,
                 connections: int) -> list[float]:
    """Requests for the 1 KiB file at a fixed rate; their latencies (ms)."""
    latencies: list[float] = []
    interval = connections / rate
    deadline = time.monotonic() + seconds

    async def one(offset: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        await asyncio.sleep(offset)
        next_ = time.monotonic()
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, _ = await _fetch(reader, writer, servers.SMALL_PATH)
            if status == 200:
                latencies.append((time.monotonic() - started) * 1000)
            next_ += interval
            await asyncio.sleep(max(0.0, next_ - time.monotonic()))
        writer.close()

    await asyncio.gather(*(one(i * interval / connections) for i in range(connections)))
    return latencies


async def _images(port: int, context: ssl.SSLContext, seconds: float, clients: int, counts: dict[str, int]) -> None:
    deadline = time.monotonic() + seconds

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        n = 0
        while time.monotonic() < deadline:
            n += 1
            _, body = await _fetch(reader, writer, f"{PHOTO_PATH}?c={index}-{n}",
                                        "Accept: image/avif,image/webp,*/*\r\n")
            kind = "converted" if body[4:12] == b"ftypavif" else "original"
            counts[kind] = counts.get(kind, 0) + 1
        writer.close()

    await asyncio.gather(*(one(i) for i in range(clients)))


def measureLatencyUnderConversions(setup: Setup, seconds: float, quick: bool) -> dict[str, Any]:
    workers = max(1, os.cpu_count() or 1)
    _, port = setup.edgeproxy(
        "edgeproxy-images", "images = avif, webp\n", proxyExtra=f"image_workers = {workers}\n"
    )
    context = ssl.create_default_context(cafile=str(setup.caFile))
    rate, connections = (100.0, 4) if quick else (200.0, 8)

    def probe() -> list[float]:
        return asyncio.run(_probe(port, context, seconds, rate, connections))

    def p(values: list[float], q: int) -> float | None:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 2 else None

    idle = probe()
    counts: dict[str, int] = {}
    # As many image clients as the pool admits (image_workers plus the
    # default queue of twice that): every conversion process is busy and
    # the queue full all the time, and the proxy serves few originals, so
    # what the probe sees is the cost of the conversions, not of image bytes.
    clients = 3 * workers

    # The image clients run in a process of their own: sharing the probe's
    # event loop, their TLS reads of converted images would delay the
    # probe's own reads, and the figure would measure this script.
    load = subprocess.Popen(
        [sys.executable, __file__, "--image-load", str(port), str(seconds + 2), str(clients), str(setup.caFile)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        busy = probe()
        out, _ = load.communicate(timeout=seconds + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    counts.update(json.loads(out or "{}"))
    result = {
        "rate": rate,
        "idleP50ms": p(idle, 50),
        "idleP99ms": p(idle, 99),
        "busyP50ms": p(busy, 50),
        "busyP99ms": p(busy, 99),
        "imagesConverted": counts.get("converted", 0),
        "imagesOriginal": counts.get("original", 0),
        "imageWorkers": workers,
    }
    if result["idleP99ms"] and result["busyP99ms"]:
        result["p99Ratio"] = result["busyP99ms"] / result["idleP99ms"]
    setup.log(f"I2: {result}")
    return result


# --- I3 -------------------------------------------------------------------------------


def _loopLag(seconds: float) -> float:
    """The p99 lag (ms) of a loop that asks to wake every millisecond and does
    200 us of Python work each time, as an event loop serving requests does."""
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = time.monotonic()
        time.sleep(0.001)
        spin = time.perf_counter()
        while time.perf_counter() - spin < 0.0002:
            pass
        lags.append((time.monotonic() - before - 0.0012) * 1000)
    return statistics.quantiles(lags, n=100, method="inclusive")[98]


def measurePoolKinds(seconds: float, quick: bool) -> dict[str, Any]:
    from edgeproxy.content.convert import convert
    from edgeproxy.content.job import Job
    from edgeproxy.content.worker import NICENESS

    workers = max(1, os.cpu_count() or 1)
    images = [data for items in imageSet(quick).values() for data in items]
    job = Job("avif", 60, 25_000_000)
    results: dict[str, Any] = {"workers": workers, "idleLagP99ms": _loopLag(seconds)}
    stop = threading.Event()

    def keepBusy(convertOne: Any) -> list[int]:
        done = [0]

        def run(index: int) -> None:
            i = index
            while not stop.is_set():
                convertOne(images[i % len(images)])
                done[0] += 1
                i += 1

        threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
        for thread in threads:
            thread.start()
        keepBusy.threads = threads  # type: ignore[attr-defined]
        return done

    # Threads of this process, as they come and niced as the processes are
    # (Linux gives each thread its own nice value).
    def nice() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)

    for label, initializer in (("threads", None), ("nicedThreads", nice)):
        stop.clear()
        with ThreadPoolExecutor(workers, initializer=initializer) as pool:
            done = keepBusy(lambda data: pool.submit(convert, data, job).result())
            time.sleep(0.5)
            results[f"{label}LagP99ms"] = _loopLag(seconds)
            stop.set()
            for thread in keepBusy.threads:  # type: ignore[attr-defined]
                thread.join()
        results[f"{label}Conversions"] = done[0]
    # Conversion processes.
    processes = [ConversionProcess() for _ in range(workers)]
    local = threading.local()
    free = list(processes)
    lock = threading.Lock()

    def inProcess(data: bytes) -> None:
        if not hasattr(local, "process"):
            with lock:
                local.process = free.pop()
        local.process.convert(job._asdict(), data)

    stop.clear()
    try:
        done = keepBusy(inProcess)
        time.sleep(0.5)
        results["processesLagP99ms"] = _loopLag(seconds)
        stop.set()
        for thread in keepBusy.threads:  # type: ignore[attr-defined]
            thread.join()
    finally:
        for process in processes:
            process.close()
    results["processesConversions"] = done[0]
    return results


# --- the Python origin (no nginx) ----------------------------------------------------


def serveOrigin(port: int, root: Path) -> None:
    types = {".html": "text/html", ".jpg": "image/jpeg"}
    bodies = {}
    for path in root.iterdir():
        body = path.read_bytes()
        kind = types.get(path.suffix, "application/octet-stream")
        bodies[b"/" + path.name.encode()] = (
            b"HTTP/1.1 200 OK\r\nContent-Type: " + kind.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    notFound = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    class Origin(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].split(b"?")[0]
                self.transport.write(bodies.get(target, notFound))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Origin, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the command ----------------------------------------------------------------------


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny durations and inputs (the smoke test)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10; 1 with --quick)")
    parser.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset of " + ",".join(FIGURES))
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--python", default=sys.executable, help="the Python whose twistd runs edgeproxy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--origin", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--image-load", nargs=4, metavar=("PORT", "SECONDS", "CLIENTS", "CAFILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = set(args.figures) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    if args.duration is None:
        args.duration = 1 if args.quick else 10
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"settings": {"duration": args.duration, "quick": args.quick}, "notes": []}
    wanted = set(args.figures)
    if "C1" in wanted:
        results["C1"] = measureEncoders(args.duration, MiB if args.quick else 8 * MiB)
    if "I1" in wanted:
        results["I1"] = measureConversions(args.duration, args.quick)
    if "I3" in wanted:
        results["I3"] = measurePoolKinds(args.duration, args.quick)
    if wanted & {"C2", "I2"}:
        setup = Setup(args)
        try:
            setup.start()
            if "C2" in wanted:
                results["C2"] = measureEndToEnd(setup, args.duration)
            if "I2" in wanted:
                results["I2"] = measureLatencyUnderConversions(setup, args.duration, args.quick)
        finally:
            setup.stop()
            results["notes"].extend(setup.notes)
    return results


def formatResults(results: dict[str, Any]) -> str:
    lines = []
    if "C1" in results:
        lines.append("C1 compression, one core, default level (input MiB per CPU-second, ratio):")
        for name, r in results["C1"].items():
            lines.append(f"  {name:5} level {r['level']:2}: {r['mibPerCoreSecond']:8.1f} MiB/s  ratio {r['ratio']:.2f}")
    if results.get("C2"):
        lines.append("C2 end to end, 1 MiB pages over TLS (uncompressed MiB/s per proxy core):")
        for label, r in results["C2"].items():
            perCore = r["mibPerCoreSecond"]
            lines.append(f"  {label:15}: {perCore if perCore is None else round(perCore, 1)} MiB/s per core"
                         f"  ({r['mibPerSecond']:.1f} MiB/s on {r['proxyCores'] or 0:.2f} cores, p99 {r['p99ms']} ms)")
    if "I1" in results:
        i1 = results["I1"]
        lines.append(f"I1 conversions ({i1['workers']} conversion processes):")
        for fmt in ("avif", "webp"):
            if fmt in i1:
                lines.append(f"  {fmt}: {i1[fmt]['conversionsPerSecond']:.1f}/s ({i1[fmt]['perWorker']:.2f} per process)"
                             f"; saved: photos {i1[f'{fmt} photo']['saved']:.0%}, screenshots {i1[f'{fmt} screenshot']['saved']:.0%}")
    if "I2" in results:
        r = results["I2"]
        lines.append(f"I2 1 KiB requests at {r['rate']:.0f}/s: p99 idle {r['idleP99ms']:.2f} ms, with the pool saturated "
                     f"{r['busyP99ms']:.2f} ms (x{r.get('p99Ratio', 0):.2f}); images converted {r['imagesConverted']}, "
                     f"sent as originals {r['imagesOriginal']}")
    if "I3" in results:
        r = results["I3"]
        lines.append(f"I3 event-loop lag p99: idle {r['idleLagP99ms']:.2f} ms; conversions in threads "
                     f"{r['threadsLagP99ms']:.2f} ms, in niced threads {r['nicedThreadsLagP99ms']:.2f} ms, "
                     f"in niced processes {r['processesLagP99ms']:.2f} ms")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parseArgs(argv)
    if args.origin:
        serveOrigin(int(args.origin[0]), Path(args.origin[1]))
        return 0
    if args.image_load:
        port, seconds, clients, caFile = args.image_load
        counts: dict[str, int] = {}
        context = ssl.create_default_context(cafile=caFile)
        asyncio.run(_images(int(port), context, float(seconds), int(clients), counts))
        print(json.dumps(counts))
        return 0

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        results = run(args)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}); every server was stopped", file=sys.stderr)
        return 2
    print(formatResults(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    failures = [label for label, r in results.get("C2", {}).items() if r.get("errors")]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
