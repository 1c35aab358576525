# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
The load generators (C{wrk} for HTTP/1.1, C{h2load} for HTTP/2): the command
lines the suite runs and the parsing of what they print.

The parsers are pure functions over the tools' text output so they can be
tested against captured output; L{runWrk} and L{runH2load} run the tools,
bounded in time, pinned to the load generator's CPU.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.servers import pinTo


@dataclass
class LoadResult:
    """One load run, as the tool saw it."""

    requests: int
    seconds: float
    rate: float
    """Completed requests per second."""
    p50ms: float | None
    p99ms: float | None
    errors: int
    """Socket errors, timeouts and failed requests."""
    bad: int
    """Responses that were not 2xx or 3xx."""
    loadCpuSeconds: float = 0.0
    """CPU seconds the load generator itself used (to see when it, not the
    proxy, was the limit)."""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parseWrk(text: str) -> LoadResult:
    """
    Parse the output of C{wrk --latency}.  Raise C{ValueError} when the
    summary is missing (wrk failed to run).
    """
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not done or not rate:
        raise ValueError(f"wrk printed no summary:\n{text}")
    percentiles = dict(
        (int(p), _ms(v))
        for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", text, re.M)
    )
    errors = 0
    socketErrors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socketErrors:
        errors = sum(int(n) for n in socketErrors.groups())
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000.0,
        rate=float(rate.group(1)),
        p50ms=percentiles.get(50),
        p99ms=percentiles.get(99),
        errors=errors,
        bad=int(bad.group(1)) if bad else 0,
    )


def parseH2load(text: str, logFile: Path | None = None) -> LoadResult:
    """
    Parse the output of C{h2load}; percentiles come from its C{--log-file}
    (one line per request: start time, status, duration in microseconds),
    since h2load itself prints only min/max/mean.
    """
    finished = re.search(r"finished in ([\d.]+)(us|ms|s|m|h), ([\d.]+) req/s", text)
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored(?:, (\d+) timeout)?",
        text,
    )
    if not finished or not requests:
        raise ValueError(f"h2load printed no summary:\n{text}")
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    bad = int(codes.group(3)) + int(codes.group(4)) if codes else 0
    p50 = p99 = None
    if logFile is not None and logFile.exists():
        durations = []
        for line in logFile.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and fields[1].isdigit() and 200 <= int(fields[1]) < 400:
                durations.append(int(fields[2]) / 1000.0)
        if len(durations) >= 2:
            cuts = statistics.quantiles(durations, n=100, method="inclusive")
            p50, p99 = cuts[49], cuts[98]
    succeeded = int(requests.group(4))
    return LoadResult(
        requests=succeeded,
        seconds=_ms(finished.group(1) + finished.group(2)) / 1000.0,
        rate=float(finished.group(3)),
        p50ms=p50,
        p99ms=p99,
        errors=int(requests.group(5)) - bad,
        bad=bad,
    )


def _childCpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str], cpus: set[int] | None, timeout: float) -> tuple[str, float]:
    """Run a tool to completion; its output and the CPU seconds it used."""
    before = _childCpu()
    completed = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=pinTo(cpus),
        timeout=timeout,
        text=True,
    )
    used = _childCpu() - before
    if completed.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} exited with {completed.returncode}:\n{completed.stdout}"
        )
    return completed.stdout, used


def wrkCommand(
    wrk: str,
    url: str,
    connections: int,
    seconds: int,
    threads: int = 1,
    headers: tuple[str, ...] = (),
) -> list[str]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        # A generous timeout, so a slow proxy shows up in p99 instead of
        # as requests wrk gave up on.
        "--timeout",
        "10s",
        "--latency",
    ]
    for header in headers:
        argv += ["-H", header]
    return argv + [url]


def runWrk(
    wrk: str,
    url: str,
    connections: int,
    seconds: int,
    cpus: set[int] | None,
    threads: int = 1,
    headers: tuple[str, ...] = (),
) -> LoadResult:
    argv = wrkCommand(wrk, url, connections, seconds, threads, headers)
    text, used = _run(argv, cpus, timeout=seconds + 30)
    result = parseWrk(text)
    result.loadCpuSeconds = used
    return result


def h2loadCommand(
    h2load: str,
    url: str,
    connections: int,
    streams: int,
    seconds: int,
    logFile: Path,
    threads: int = 1,
) -> list[str]:
    return [
        h2load,
        f"--threads={threads}",
        f"--clients={connections}",
        f"--max-concurrent-streams={streams}",
        f"--duration={seconds}",
        f"--log-file={logFile}",
        url,
    ]


def runH2load(
    h2load: str,
    url: str,
    connections: int,
    streams: int,
    seconds: int,
    cpus: set[int] | None,
    logFile: Path,
    threads: int = 1,
) -> LoadResult:
    argv = h2loadCommand(h2load, url, connections, streams, seconds, logFile, threads)
    if logFile.exists():
        logFile.unlink()
    text, used = _run(argv, cpus, timeout=seconds + 30)
    result = parseH2load(text, logFile)
    result.loadCpuSeconds = used
    return result


def runHandshakes(
    python: str,
    port: int,
    connections: int,
    seconds: int,
    cpus: set[int] | None,
) -> LoadResult:
    """Run C{benchmarks/handshakes.py} (full TLS handshakes, R2)."""
    script = Path(__file__).resolve().parent / "handshakes.py"
    argv = [python, str(script), str(port), str(connections), str(seconds)]
    text, used = _run(argv, cpus, timeout=seconds + 30)
    try:
        data = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ValueError(f"handshakes.py printed no result:\n{text}") from None
    return LoadResult(
        requests=data["connections"],
        seconds=data["seconds"],
        rate=data["rate"],
        p50ms=data["p50ms"],
        p99ms=data["p99ms"],
        errors=data["errors"],
        bad=data["bad"],
        loadCpuSeconds=used,
    )
