"""
The benchmark suite cannot rot: its parsers read the load generators' real
output, its ratios are right, and C{benchmarks/run.py --quick} runs end to
end against edgeproxy (only: the comparison proxies are for real runs).

The end-to-end test needs C{wrk} (C{apt-get install wrk}) and is skipped,
saying so, without it; it takes about 15 seconds and is bounded at 55.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import httpwire, loadgen, report

REPO = Path(__file__).resolve().parent.parent

# Captured from wrk 4.1.0 (Debian 12).
WRK_OUTPUT = """\
Running 1s test @ https://127.0.0.1:8443/1k
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   115.13us  209.88us   4.19ms   99.00%
    Req/Sec    97.63k     6.25k  104.65k    81.82%
  Latency Distribution
     50%   98.00us
     75%  105.00us
     90%  115.00us
     99%    1.33ms
  106317 requests in 1.10s, 129.58MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  96698.67
Transfer/sec:    117.86MB
"""

# Captured from h2load (nghttp2 1.52.0); the log lines are its --log-file.
H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Application protocol: h2
finished in 1.00s, 95334.00 req/s, 116.19MB/s
requests: 95334 total, 95344 started, 95334 done, 95330 succeeded, 4 failed, 0 errored, 0 timeout
status codes: 95330 2xx, 0 3xx, 0 4xx, 4 5xx
traffic: 116.19MB (121836852) total, 18.46MB (19352802) headers (space savings 0.00%), 93.10MB (97622016) data
                     min         max         mean         sd        +/- sd
time for request:       61us      9.66ms       103us       145us    99.76%
"""


def test_parseWrk() -> None:
    result = loadgen.parseWrk(WRK_OUTPUT)
    assert result.requests == 106317
    assert result.seconds == pytest.approx(1.10)
    assert result.rate == pytest.approx(96698.67)
    assert result.p50ms == pytest.approx(0.098)
    assert result.p99ms == pytest.approx(1.33)
    assert result.errors == 5
    assert result.bad == 7


def test_parseWrkWithoutSummary() -> None:
    with pytest.raises(ValueError, match="no summary"):
        loadgen.parseWrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_parseH2load(tmp_path: Path) -> None:
    log = tmp_path / "h2load.log"
    # 100 requests of 1..100 ms, plus one 5xx that must not count.
    lines = [f"17958064787{i:05d}\t200\t{i * 1000}" for i in range(1, 101)]
    lines.append("1795806478799999\t502\t999999")
    log.write_text("\n".join(lines) + "\n")
    result = loadgen.parseH2load(H2LOAD_OUTPUT, log)
    assert result.requests == 95330
    assert result.rate == pytest.approx(95334.0)
    assert result.seconds == pytest.approx(1.0)
    assert result.bad == 4
    assert result.errors == 0
    assert result.p50ms == pytest.approx(50.5)
    assert result.p99ms == pytest.approx(99.01)


def test_responseFraming() -> None:
    """
    The suite's own clients see where a response ends whether the proxy
    forwards the length or re-frames the body in chunks.
    """
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert httpwire.parse(head + b"hel") is None
    assert httpwire.parse(head + b"hello") == (200, b"hello")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\n"
    assert httpwire.parse(chunked + body) is None
    assert httpwire.parse(chunked + body + b"\r\n") == (200, b"hello")
    assert httpwire.parse(chunked + body + b"X-T: 1\r\n\r\n") == (200, b"hello")
    unframed = b"HTTP/1.1 502 Bad Gateway\r\n\r\nbad"
    assert httpwire.parse(unframed) is None
    assert httpwire.parse(unframed, closed=True) == (502, b"bad")


def test_tableRatios() -> None:
    """
    edgeproxy / nginx is the plain ratio; the per-CPU-second ratio compares
    the figures divided by the cores each proxy used.
    """
    results = {
        "edgeproxy": {
            "R1": {"median": {"value": 5000.0, "perCore": 5000.0, "p99ms": 20.0}},
            "R4": {"median": {"perConnectionKiB": 30.0}},
        },
        "nginx": {
            "R1": {"median": {"value": 40000.0, "perCore": 50000.0, "p99ms": 4.0}},
            "R4": {"median": {"perConnectionKiB": 20.0}},
        },
    }
    rows = {row["figure"]: row for row in report.table(results)}
    r1 = rows["R1 requests/s (TLS keep-alive, 1 KiB)"]
    assert r1["edgeproxy/nginx"] == pytest.approx(0.125)
    assert r1["per-CPU-second ratio"] == pytest.approx(0.1)
    assert r1["haproxy"] is None
    p99 = rows["R1 p99 latency (ms)"]
    assert p99["edgeproxy/nginx"] == pytest.approx(5.0)
    assert p99["per-CPU-second ratio"] is None
    assert rows["R4 KiB per idle TLS connection"]["edgeproxy/nginx"] == pytest.approx(1.5)
    # Figures nobody measured are left out of the table.
    assert "R3 MiB/s (1 MiB responses)" not in rows
    text = report.formatTable(list(rows.values()))
    assert "R1 requests/s (TLS keep-alive, 1 KiB)" in text
    assert "0.125" in text

    # Throughput targets are judged per core, memory and p99 as plain ratios.
    checked = {t["target"]: t for t in report.targets(list(rows.values()))}
    r1Target = checked["R1 requests/s, kept-alive TLS (per core)"]
    assert r1Target["ratio"] == pytest.approx(0.1)
    assert r1Target["firstMet"] is False
    memoryTarget = checked["R4 KiB per idle TLS connection"]
    assert memoryTarget["ratio"] == pytest.approx(1.5)
    assert (memoryTarget["firstMet"], memoryTarget["goalMet"]) == (True, False)
    assert checked["p99 at R1 load"]["firstMet"] is True
    assert checked["R2 new TLS connections/s (per core)"]["ratio"] is None


def test_http2Targets() -> None:
    """
    Issue 16: R5 (HTTP/2) requests/s judged per core against 0.3 (goal
    0.5), its p99 as a plain ratio against 3x.
    """
    results = {
        "edgeproxy": {"R5": {"median": {"value": 8000.0, "perCore": 8000.0, "p99ms": 30.0}}},
        "nginx": {"R5": {"median": {"value": 30000.0, "perCore": 20000.0, "p99ms": 12.0}}},
    }
    checked = {t["target"]: t for t in report.targets(report.table(results))}
    throughput = checked["R5 requests/s, HTTP/2 (per core)"]
    assert throughput["ratio"] == pytest.approx(0.4)
    assert (throughput["first"], throughput["goal"]) == (0.3, 0.5)
    assert (throughput["firstMet"], throughput["goalMet"]) == (True, False)
    latency = checked["p99 at R5 load"]
    assert latency["ratio"] == pytest.approx(2.5) and latency["direction"] == "max"
    assert (latency["firstMet"], latency["goalMet"]) == (True, True)
    assert "R5: issue 16" in report.formatTargets(list(checked.values()))


def test_hitVersusProxied() -> None:
    """Issue 11: edgeproxy's cache hits against its own proxied requests."""
    results = {
        "edgeproxy": {
            "R1": {"median": {"value": 100.0, "perCore": 200.0}},
            "H1": {"median": {"value": 300.0, "perCore": 500.0}},
        },
    }
    compared = report.hitVersusProxied(results)
    assert compared == {"ratio": pytest.approx(3.0), "perCoreRatio": pytest.approx(2.5)}
    assert report.formatHitVersusProxied(compared).endswith("(must be > 1): met")  # type: ignore[arg-type]
    assert report.hitVersusProxied({"edgeproxy": {"R1": results["edgeproxy"]["R1"]}}) is None
    rows = {row["key"] for row in report.table(results)}
    assert {"R1", "H1"} <= rows


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk): benchmarks/run.py needs it",
)
def test_quickRunOfEdgeproxy(tmp_path: Path) -> None:
    """
    C{benchmarks/run.py --quick --proxies edgeproxy} starts the origin and
    edgeproxy, measures every figure once for a second, prints the table,
    writes the JSON and stops everything it started.
    """
    out = tmp_path / "bench.json"
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--quick",
            # Two seconds, not --quick's one: on a loaded CI machine one
            # second of R3 (1 MiB bodies) could end before the first response.
            "--duration",
            "2",
            "--proxies",
            "edgeproxy",
            "--json",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=80)
    except subprocess.TimeoutExpired:
        # SIGTERM lets run.py stop the servers it started before exiting.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
        pytest.fail(f"benchmarks/run.py --quick took more than 80 s:\n{output}")
    assert process.returncode == 0, output
    assert "R1 requests/s (TLS keep-alive, 1 KiB)" in output

    data = json.loads(out.read_text())
    assert data["failures"] == []
    tls = data["tls"]["edgeproxy"]
    assert tls["tlsVersion"] == "TLSv1.3"
    assert tls["keyType"] == "ECDSA secp256r1"
    edge = data["results"]["edgeproxy"]
    for figure in ("R1", "R2", "R2r", "R3", "H1", "H3"):
        median = edge[figure]["median"]
        assert median["value"] > 0, figure
        assert median["errors"] == 0 and median["bad"] == 0, figure
        assert median["proxyCores"] > 0, figure
    assert edge["R1"]["median"]["p99ms"] >= edge["R1"]["median"]["p50ms"] > 0
    for figure in ("R4", "R4b"):
        memory = edge[figure]["runs"][0]
        assert memory["opened"] == 200 and memory["failed"] == 0, figure
        assert memory["restKiB"] > 0 and memory["loadedKiB"] > memory["restKiB"], figure
    if shutil.which("h2load"):
        assert edge["R5"]["median"]["value"] > 0
    assert [row["key"] for row in data["table"]][0] == "R1"


def test_inMemoryBenchmarkProxiesRealResponses(capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{benchmarks/inproc.py} runs the production path (its own check refuses
    a wrong response or a backend connection that was not kept alive) and
    prints its figure.
    """
    from benchmarks import inproc

    bench = inproc.Bench()
    wire = bench.once()
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nServer:" not in wire
    assert wire.endswith(b"x" * 1024)
    assert inproc.main(["--requests", "50", "--runs", "1"]) == 0
    assert "us CPU per request" in capsys.readouterr().out


def test_inMemoryCacheBenchmarkAnswersFromTheCache(capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{benchmarks/inproc.py --cache}: after the first request, the answers
    come from the memory tier (C{Cache-Status} says a hit) and carry the
    stored body.
    """
    from benchmarks import inproc

    bench = inproc.Bench(cache=True)
    first = bench.once()
    assert first.endswith(b"x" * 1024) and b"edgeproxy; hit" not in first
    hit = bench.once()
    assert hit.startswith(b"HTTP/1.1 200 OK\r\n") and hit.endswith(b"x" * 1024)
    assert b"Cache-Status: edgeproxy; hit" in hit
    assert inproc.main(["--cache", "--tls", "--requests", "50", "--runs", "1", "--warmup", "20"]) == 0
    assert "cache hit" in capsys.readouterr().out


def test_inMemoryHTTP2BenchmarkChecksItsResponses(capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{benchmarks/inproc.py --h2} drives the listener's HTTP/2 protocol over
    TLS with ten streams in flight: its checked rounds read every response
    through the h2 library's client, and its built frames get every
    response too (the run refuses a missing one).
    """
    from benchmarks import inproc

    bench = inproc.Bench(h2=True)
    bench.check()
    assert len(bench.pool.endpoint.backends) == inproc.H2_STREAMS
    bench.run(30)
    assert inproc.main(["--h2", "--requests", "50", "--runs", "1", "--warmup", "20"]) == 0
    assert "HTTP/2 over TLS" in capsys.readouterr().out


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk): benchmarks/content.py needs it for C2",
)
def test_quickRunOfTheContentFigures(tmp_path: Path) -> None:
    """
    C{benchmarks/content.py --quick} measures every compression and image
    figure once (tiny inputs, one second each) and stops what it started.
    """
    out = tmp_path / "content.json"
    process = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "content.py"), "--quick", "--json", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert process.returncode == 0, process.stdout
    data = json.loads(out.read_text())
    assert set(data["C1"]) == {"zstd", "br", "gzip"}
    assert all(r["mibPerCoreSecond"] > 0 and r["ratio"] > 2 for r in data["C1"].values())
    assert data["C2"]["edgeproxy zstd"]["mibPerCoreSecond"] > 0
    assert all(r["errors"] == 0 for r in data["C2"].values())
    assert data["I1"]["avif"]["conversionsPerSecond"] > 0
    assert data["I1"]["webp photo"]["saved"] > 0.3
    assert data["I2"]["imagesConverted"] > 0 and data["I2"]["idleP99ms"] > 0
    assert data["I3"]["processesLagP99ms"] > 0
    assert "C1 compression" in process.stdout
