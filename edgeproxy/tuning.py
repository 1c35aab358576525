# -*- test-case-name: tests.test_tuning -*-
"""
Process-wide runtime tuning of the proxy, applied once the process has
started: today, the garbage collector.

Owns nothing else.  Called by L{edgeproxy.service.EdgeService.startService}
for the process's own service (the one that installs signal handlers: the
single process under twistd, and each worker), never for a service a test
builds, since it changes the whole interpreter.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

__all__ = ["tuneGarbageCollector"]

log = Logger(namespace="edgeproxy.tuning")


def tuneGarbageCollector() -> int:
    """
    Move every object alive now (modules, configuration, certificates,
    listeners: what start-up built) to the collector's permanent
    generation, so that full collections stop scanning them.

    Why: the proxy allocates many container objects per request, so gen0
    collections run every few requests and full collections a few times a
    second under load.  Each full collection walked the ~60,000 start-up
    objects: under R1 load 20 of them took 0.48 s of 7.1 s CPU (6.8%),
    about 24 ms each (the p99); frozen, 22 took 0.08 s (docs/performance.rst,
    Run 5).  The generation thresholds are left at Python's defaults:
    raising gen0's (7,000 or 20,000) made the gen0 collections cost more in
    total than they saved (measured with C{gc.callbacks}).

    The cost: a start-up object that later becomes cyclic garbage (say,
    part of a configuration replaced by a reload) is never collected;
    objects freed by reference counting still are.  That is bounded by what
    one start builds, once per process.

    @return: the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: {frozen} start-up objects frozen", frozen=frozen)
    return frozen
