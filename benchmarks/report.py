# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
From measured runs to medians, ratios and the printed table.

Pure functions over plain dicts (the same dicts that go into the JSON file),
so the arithmetic of the ratios can be tested without running anything.

A ratio is edgeproxy's figure divided by nginx's.  The per-CPU-second ratio
divides each figure first by the CPU the proxy used during the run (in
cores: CPU seconds per wall-clock second), so that it compares work done per
unit of CPU even when the load generator could not saturate the faster
proxy.  It exists only for throughput figures.
"""

from __future__ import annotations

import statistics
from typing import Any

PROXIES = ("edgeproxy", "nginx", "haproxy")


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of every numeric key over C{runs}."""
    keys: list[str] = []
    for run in runs:
        for key, value in run.items():
            if key not in keys and (isinstance(value, (int, float)) or value is None):
                keys.append(key)
    return {key: median([run.get(key) for run in runs]) for key in keys}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# (row label, figure key, metric key in the summary, per-CPU metric or None)
ROWS: list[tuple[str, str, str, str | None]] = [
    ("R1 requests/s (TLS keep-alive, 1 KiB)", "R1", "value", "perCore"),
    ("R1 p50 latency (ms)", "R1", "p50ms", None),
    ("R1 p99 latency (ms)", "R1", "p99ms", None),
    ("R1 proxy CPU (cores)", "R1", "proxyCores", None),
    ("R2 new TLS connections/s (full handshakes)", "R2", "value", "perCore"),
    ("R2 proxy CPU (cores)", "R2", "proxyCores", None),
    ("R2r new TLS connections/s (resumed, wrk)", "R2r", "value", "perCore"),
    ("R2r proxy CPU (cores)", "R2r", "proxyCores", None),
    ("R3 MiB/s (1 MiB responses)", "R3", "value", "perCore"),
    ("R3 proxy CPU (cores)", "R3", "proxyCores", None),
    ("R4 RSS at rest (MiB)", "R4", "restMiB", None),
    ("R4 KiB per idle TLS connection", "R4", "perConnectionKiB", None),
    ("R4b KiB per idle TLS connection, fresh proxy", "R4b", "perConnectionKiB", None),
    ("R5 requests/s (HTTP/2, 1 KiB)", "R5", "value", "perCore"),
    ("R5 p50 latency (ms)", "R5", "p50ms", None),
    ("R5 p99 latency (ms)", "R5", "p99ms", None),
    ("R5 proxy CPU (cores)", "R5", "proxyCores", None),
    ("H1 cache hits/s (TLS keep-alive, 1 KiB)", "H1", "value", "perCore"),
    ("H1 p99 latency (ms)", "H1", "p99ms", None),
    ("H1 proxy CPU (cores)", "H1", "proxyCores", None),
    ("H3 cache hits/s (TLS keep-alive, 1 MiB)", "H3", "value", "perCore"),
    ("H3 proxy CPU (cores)", "H3", "proxyCores", None),
    ("R1x2 requests/s (whole machine, 2 workers)", "R1x2", "value", "perCore"),
    ("R1x2 proxy CPU (cores)", "R1x2", "proxyCores", None),
]


def table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The rows of the table: for each figure measured for at least one proxy,
    the median of each proxy, edgeproxy / nginx, and the same per CPU
    second.  C{results} maps a proxy name to C{{figure: {"median": {...}}}}.
    """
    rows = []
    for label, figure, metric, perCpu in ROWS:
        values: dict[str, float | None] = {}
        for proxy in PROXIES:
            summary = results.get(proxy, {}).get(figure, {}).get("median") or {}
            values[proxy] = summary.get(metric)
        if all(v is None for v in values.values()):
            continue
        cpuRatio = None
        if perCpu is not None:
            edge = results.get("edgeproxy", {}).get(figure, {}).get("median") or {}
            nginx = results.get("nginx", {}).get(figure, {}).get("median") or {}
            cpuRatio = ratio(edge.get(perCpu), nginx.get(perCpu))
        rows.append(
            {
                "figure": label,
                "key": figure,
                "metric": metric,
                **values,
                # A ratio of CPU used says nothing by itself (a slower proxy
                # may simply be given less work), so none is printed.
                "edgeproxy/nginx": (
                    None
                    if metric == "proxyCores"
                    else ratio(values["edgeproxy"], values["nginx"])
                ),
                "per-CPU-second ratio": cpuRatio,
            }
        )
    return rows


def _cell(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def formatTable(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table (also valid RST simple table)."""
    header = [
        "figure",
        "edgeproxy",
        "nginx",
        "haproxy",
        "edgeproxy/nginx",
        "per-CPU-second ratio",
    ]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["figure"],
                _cell(row["edgeproxy"], 2),
                _cell(row["nginx"], 2),
                _cell(row["haproxy"], 2),
                _cell(row["edgeproxy/nginx"], 3),
                _cell(row["per-CPU-second ratio"], 3),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def fmt(line: list[str]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    out = [rule, fmt(lines[0]), rule]
    out += [fmt(line) for line in lines[1:]]
    out.append(rule)
    return "\n".join(out)


# Issue 5's targets, raised by issue 10 for R1 and R4 (and issues 11's and
# 16's), as ratios to nginx with one
# worker in the same run, per core: (label, figure, metric, "min" when the
# ratio must reach the target or "max" when it must stay under it, first
# target, where we are going).
TARGETS: list[tuple[str, str, str, str, float, float]] = [
    ("R1 requests/s, kept-alive TLS (per core)", "R1", "value", "min", 0.30, 0.35),
    ("R2 new TLS connections/s (per core)", "R2", "value", "min", 0.6, 0.9),
    ("R3 MiB/s for large bodies (per core)", "R3", "value", "min", 0.5, 0.8),
    ("R4 KiB per idle TLS connection", "R4", "perConnectionKiB", "max", 1.5, 1.2),
    ("p99 at R1 load", "R1", "p99ms", "max", 8.0, 3.0),
    # Issue 11 (the cache): first targets only.
    ("H1 cache hits/s, 1 KiB (per core)", "H1", "value", "min", 0.35, 0.35),
    ("H3 cache hits/s, 1 MiB (per core)", "H3", "value", "min", 0.9, 0.9),
    # Issue 16 (HTTP/2): h2load -c50 -m10.
    ("R5 requests/s, HTTP/2 (per core)", "R5", "value", "min", 0.3, 0.5),
    ("p99 at R5 load", "R5", "p99ms", "max", 3.0, 3.0),
]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Each target of issue 5 with the ratio it is judged on: the
    per-CPU-second ratio for throughput ("per core"), the plain ratio for
    memory and latency.
    """
    byKey = {(row["key"], row["metric"]): row for row in rows}
    out = []
    for label, figure, metric, direction, first, goal in TARGETS:
        row = byKey.get((figure, metric))
        if row is None:
            value = None
        elif direction == "min":
            value = row["per-CPU-second ratio"]
        else:
            value = row["edgeproxy/nginx"]

        def met(target: float) -> bool | None:
            if value is None:
                return None
            return value >= target if direction == "min" else value <= target

        out.append(
            {
                "target": label,
                "ratio": value,
                "first": first,
                "goal": goal,
                "direction": direction,
                "firstMet": met(first),
                "goalMet": met(goal),
            }
        )
    return out


def hitVersusProxied(results: dict[str, dict[str, Any]]) -> dict[str, float | None] | None:
    """
    Issue 11: a cache hit must be faster than the proxied path of the same
    revision.  edgeproxy's H1 over its R1 (the same 1 KiB object), plain
    and per CPU second; L{None} unless both were measured.
    """
    edge = results.get("edgeproxy", {})
    hits = (edge.get("H1") or {}).get("median") or {}
    proxied = (edge.get("R1") or {}).get("median") or {}
    if not hits or not proxied:
        return None
    return {
        "ratio": ratio(hits.get("value"), proxied.get("value")),
        "perCoreRatio": ratio(hits.get("perCore"), proxied.get("perCore")),
    }


def formatHitVersusProxied(compared: dict[str, float | None]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    perCore = compared["perCoreRatio"]
    verdict = "not measured" if perCore is None else ("met" if perCore > 1 else "NOT met")
    return (
        f"edgeproxy cache hits vs proxied requests (H1 / R1, 1 KiB): {cell(compared['ratio'])}, "
        f"per core {cell(perCore)} (must be > 1): {verdict}"
    )


def formatTargets(checked: list[dict[str, Any]]) -> str:
    lines = ["targets (ratio to nginx, 1 worker; R1-R4: issue 5, R5: issue 16, H: issue 11):"]
    for t in checked:
        sign = ">=" if t["direction"] == "min" else "<="
        if t["ratio"] is None:
            verdict = "not measured"
        elif t["goalMet"]:
            verdict = "past the goal"
        elif t["firstMet"]:
            verdict = "first target met"
        else:
            verdict = "first target NOT met"
        ratioText = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        lines.append(
            f"  {t['target']}: {ratioText} (first {sign} {t['first']}, "
            f"goal {sign} {t['goal']}): {verdict}"
        )
    return "\n".join(lines)
