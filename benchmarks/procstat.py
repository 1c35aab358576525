# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
What the benchmarks read from C{/proc}: the process tree of a server, its
resident memory and the CPU time it used.

Linux only, like the rest of the suite.  A process that exits between two
reads simply stops counting; nothing here raises for a vanished pid.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """
    The direct children of C{pid}.  C{/proc/PID/task/TID/children} is read
    when the kernel has it; otherwise every C{/proc/*/stat} is scanned for
    the parent pid.
    """
    found: list[int] = []
    taskDir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(taskDir.iterdir())
    except OSError:
        return []
    listed = False
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        listed = True
        found.extend(int(p) for p in text.split())
    if listed:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _readStat(int(entry.name))
        if stat is not None and int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def tree(pid: int) -> list[int]:
    """C{pid} and all its live descendants, parents first."""
    result: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop(0)
        if not Path(f"/proc/{current}").exists():
            continue
        result.append(current)
        pending.extend(children(current))
    return result


def _readStat(pid: int) -> list[str] | None:
    """
    The fields of C{/proc/PID/stat} after the command name, or L{None}.

    The command name is in parentheses and may itself hold spaces and
    parentheses, so the split starts after the last C{)}: field 3 (state)
    is index 0 of the result, field 14 (utime) index 11.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpuSeconds(pids: list[int]) -> float:
    """
    User plus system CPU seconds used so far by C{pids} (utime + stime of
    each, C{proc(5)} fields 14 and 15).  Children that already exited are not
    in the list, which is why callers pass the live tree (e.g. the nginx
    master and its workers).
    """
    ticks = 0
    for pid in pids:
        fields = _readStat(pid)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def rssKiB(pid: int) -> int:
    """C{VmRSS} of C{pid} in KiB, 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpuModel() -> str:
    """The first C{model name} of C{/proc/cpuinfo}."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
