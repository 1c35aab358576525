# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
Where edgeproxy spends its time under R1 load (or R2, R3 with C{--figure}):
py-spy samples the proxy while wrk (or, for R2, handshakes.py) drives it, and the samples are
summarised as the functions with the most time of their own and the most
time inclusive.

    .venv/bin/python benchmarks/profile.py [--figure R1|R2|R3] [--duration S] [--out DIR]

It needs C{py-spy} (C{pip install py-spy}, beside the Python that runs
edgeproxy or on C{PATH}) and C{wrk}.  Same setup as C{run.py}: generated
certificate, one origin, edgeproxy pinned to the first CPU, wrk and py-spy
on the second.  py-spy runs with C{--nonblocking}, so
it never stops the proxy; time spent inside C code (OpenSSL, the socket
calls) is counted in the Python function that called it.  The raw collapsed
stacks are kept in C{DIR} for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import loadgen, run, servers  # noqa: E402


_LOADS = {
    "R1": (servers.SMALL_PATH, 50),
    "R2": (servers.SMALL_PATH, 50),
    "R3": (servers.LARGE_PATH, 10),
    "R5": (servers.SMALL_PATH, 50),
}
"""Per figure: the path fetched and the connections (as in C{run.py}); R2
is driven by C{handshakes.py} (a new connection and full TLS handshake per
request), R5 by h2load (10 streams per connection), the others by wrk."""


def summarise(collapsed: str, top: int = 20) -> str:
    """
    The C{top} functions by own samples and by inclusive samples, from
    py-spy's raw (collapsed) output: one C{frame;frame;...;leaf COUNT} line
    per distinct stack, root first.
    """
    own: collections.Counter[str] = collections.Counter()
    ownByFile: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += n
        ownByFile[_file(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples (idle time not sampled)", "", "own time by file:"]
    for name, n in ownByFile.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    lines += ["", "own time by function:"]
    for frame, n in own.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    lines += ["", "inclusive time (the function and what it calls):"]
    for frame, n in inclusive.most_common(top * 2):
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def _function(frame: str) -> str:
    """C{name (path:line)} without the line, so a function counts once."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def _file(frame: str) -> str:
    name, sep, where = frame.partition(" (")
    return where.rstrip(")") if sep else frame


def pySpy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--blocking", action="store_true",
        help="stop the proxy at each sample: complete stacks (every sample placed "
        "under its callers) at the cost of some throughput while sampled",
    )
    parser.add_argument(
        "--figure", choices=sorted(_LOADS), default="R1",
        help="the load: R1 (1 KiB, 50 connections), R2 (a full TLS handshake per "
        "request, 50 at a time), R3 (1 MiB, 10 connections) or R5 (HTTP/2, h2load "
        "-c50 -m10, 1 KiB)",
    )
    args = parser.parse_args(argv)
    path, connections = _LOADS[args.figure]
    figure = args.figure.lower()
    spy = pySpy(args.python)
    if spy is None or shutil.which("wrk") is None:
        print("needs py-spy (pip install py-spy) and wrk", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    bench = run.Bench(run.parseArgs(["--proxies", "edgeproxy", "--python", args.python]))
    bench.work = Path(__import__("tempfile").mkdtemp(prefix="edgeproxy-profile-"))
    bench.work.chmod(0o755)
    try:
        bench.makeCertificates()
        bench.startOrigin()
        bench.startProxies()
        if "edgeproxy" not in bench.proxies:
            print("\n".join(bench.failures), file=sys.stderr)
            return 1
        server = bench.proxies["edgeproxy"]
        url = f"https://127.0.0.1:{bench.ports['edgeproxy']}{path}"
        loadgen.runWrk(bench.tools["wrk"], url, connections, 2, bench.loadCpus)  # warm-up
        raw = args.out / f"edgeproxy-{figure}.collapsed.txt"
        base = [spy, "record", "--pid", str(server.pid), "--rate", str(args.rate),
                "--duration", str(args.duration + 2), "--format", "raw",
                "--output", str(raw)]
        # --nonblocking: py-spy reads the proxy's memory without stopping
        # it.  --native would name the time spent inside OpenSSL, but it
        # has to stop the process at every sample, which cut throughput by
        # three quarters here and counted idle threads as busy.
        spyProcess = subprocess.Popen(
            base + ([] if args.blocking else ["--nonblocking"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=servers.pinTo(bench.loadCpus),
        )
        time.sleep(1.0)
        if spyProcess.poll() is not None:
            print(f"py-spy failed: {spyProcess.stdout.read()}", file=sys.stderr)
            return 1
        if args.figure == "R2":
            result = loadgen.runHandshakes(
                sys.executable, bench.ports["edgeproxy"], connections, args.duration,
                bench.loadCpus,
            )
        elif args.figure == "R5":
            if bench.tools["h2load"] is None:
                print("R5 needs h2load (nghttp2-client)", file=sys.stderr)
                return 1
            result = loadgen.runH2load(
                bench.tools["h2load"], url, connections, 10, args.duration,
                bench.loadCpus, bench.work / "h2load.log",
            )
        else:
            result = loadgen.runWrk(
                bench.tools["wrk"], url, connections, args.duration, bench.loadCpus
            )
        output, _ = spyProcess.communicate(timeout=args.duration + 30)
        summary = summarise(raw.read_text() if raw.exists() else "")
        text = (
            f"edgeproxy under {args.figure} load: {result.rate:.0f} requests/s "
            f"(p50 {result.p50ms} ms, p99 {result.p99ms} ms) while sampled; "
            f"py-spy {'(blocking)' if args.blocking else '--nonblocking'} at {args.rate} Hz"
            f"\n\n{summary}\n"
        )
        (args.out / f"edgeproxy-{figure}.summary.txt").write_text(text)
        print(text)
    finally:
        for s in reversed(bench.servers):
            s.stop()
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
