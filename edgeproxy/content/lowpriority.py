# -*- test-case-name: tests.test_content_pool -*-
"""
How a conversion process gives the CPU back to proxying (Linux; elsewhere
only C{nice}).

An image conversion holds a CPU for tens of milliseconds of C code.  On a
busy machine, what matters for the proxied requests beside it is not the
conversions' share of the CPU (C{nice} alone settles that) but how long a
request that wakes up waits for a CPU a conversion is running on.  Measured
on Linux 6.18 with two CPUs (C{benchmarks/content.py --figures I2}), with
the conversion processes only niced, that wait reached a scheduler tick
(4 ms) often enough to make the p99 of small requests 3 to 4 times its idle
value, for two reasons this module removes:

  - Nice values rank processes within a scheduling group only.  Outside a
    cgroup of its own (a proxy started from a shell), the kernel groups
    processes by session (autogroups) and gives every group the same
    weight, so a niced conversion still competes at full weight with the
    origin, the clients and anything else on the machine.  The process
    starts a session of its own and sets its group to nice 19.
  - A running task keeps its CPU for its whole time slice (EEVDF's run to
    parity), however low its weight, and the next preemption may wait for
    the tick.  Since Linux 6.12 a task can ask for a shorter slice
    (C{sched_setattr}'s C{sched_runtime}); the process asks for the
    shortest, 0.1 ms, so whatever wakes up gets the CPU at once.

Together (neither did much alone) they took that p99 ratio from x3.5 to
x4.5 down to about x2.3 to x2.6 (C{docs/performance.rst} has the runs).  Every step is best effort: what
the system refuses is skipped and the process still converts.
"""

from __future__ import annotations

import os
import platform
import struct

__all__ = ["NICENESS", "SLICE_NS", "lowerPriority"]

NICENESS = 10
"""The conversion process's own nice value."""

GROUP_NICENESS = 19
"""The nice value of its session's scheduling group (autogroup)."""

SLICE_NS = 100_000
"""The time slice asked for: 0.1 ms, the shortest Linux grants."""

# sched_setattr(2) has no wrapper in glibc or in Python's os module.
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274}
# struct sched_attr, SCHED_ATTR_SIZE_VER1: size, policy, flags, nice,
# priority, runtime, deadline, period, util_min, util_max.
_SCHED_ATTR = struct.Struct("=IIQiIQQQII")
_SCHED_OTHER = 0


def lowerPriority() -> list[str]:
    """
    Lower this process's CPU priority as the module docstring says.

    @return: what was done, in order (C{"nice"}, C{"session"},
        C{"group"}, C{"slice"}), for the tests.
    """
    done = []
    try:
        os.nice(NICENESS)
        done.append("nice")
    except OSError:
        pass
    try:
        os.setsid()
        done.append("session")
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(GROUP_NICENESS))
        done.append("group")
    except OSError:
        # Already a session leader, not Linux, or no autogroups: nice
        # still ranks the process within its group.
        pass
    if _askShortSlice():
        done.append("slice")
    return done


def _askShortSlice() -> bool:
    """Ask for a L{SLICE_NS} time slice; whether the kernel took it."""
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None or not hasattr(os, "sched_getscheduler"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(
            _SCHED_ATTR.pack(_SCHED_ATTR.size, _SCHED_OTHER, 0, os.nice(0), 0, SLICE_NS, 0, 0, 0, 0),
            _SCHED_ATTR.size,
        )
        # Kernels before 6.12 accept sched_runtime and ignore it for this
        # policy: nothing changes, nothing breaks.
        return bool(libc.syscall(number, 0, attr, 0) == 0)
    except (OSError, AttributeError):
        return False
