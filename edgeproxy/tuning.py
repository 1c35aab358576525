# -*- test-case-name: tests.test_tuning -*-
"""
Process-wide runtime tuning of the proxy, applied once the process has
started: the garbage collector, and how the reactor dispatches I/O events.

Owns nothing else.  Called by L{edgeproxy.serve.service.EdgeService.startService}
for the process's own service (the one that installs signal handlers: the
single process under twistd, and each worker), never for a service a test
builds, since it changes the whole interpreter.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.logger import Logger

from edgeproxy._compat import fastPaths
from edgeproxy._compat.twisted.reactor import dispatchWithoutLogContext

__all__ = ["YOUNG_THRESHOLD", "tuneGarbageCollector", "tuneEventDispatch"]

log = Logger(namespace="edgeproxy.tuning")


YOUNG_THRESHOLD = 10_000
"""The collector's first threshold (Python's is 700): how many more
container objects allocated than freed start a collection of the young."""


def tuneGarbageCollector() -> int:
    """
    Move every object alive now (modules, configuration, certificates,
    listeners: what start-up built) to the collector's permanent
    generation, so that full collections stop scanning them, and collect
    the young generation after L{YOUNG_THRESHOLD} allocations instead of
    700.

    Why freeze: each full collection walked the ~60,000 start-up objects:
    under R1 load 20 of them took 0.48 s of 7.1 s CPU (6.8%), about 24 ms
    each (the p99); frozen, 22 took 0.08 s (docs/performance.rst, Run 5).

    Why the threshold: a request makes no reference cycle (the same Run 5),
    so what the young collections find is objects still in use.  The
    count that starts one goes up with each allocation and down with each
    free, but never below zero after a collection, so a connection that
    holds many requests at once (HTTP/2: the 500 streams of R5) started one
    every 70 requests, collections that found nothing to free; at 10,000
    they stop (gc.callbacks in the proxy, 10 s of R5: 0.27 s of 10.4 s of
    CPU in collections, 0.01 s after).  Under R1 there are three
    collections in 10 s either way.  The cost: cyclic garbage waits for
    10,000 allocations instead of 700 (a few megabytes at most).

    The cost of freezing: a start-up object that later becomes cyclic
    garbage (say, part of a configuration replaced by a reload) is never
    collected; objects freed by reference counting still are.  That is
    bounded by what one start builds, once per process.

    @return: the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *older)
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: {frozen} start-up objects frozen", frozen=frozen)
    return frozen


def tuneEventDispatch(reactor: Any) -> bool:
    """
    Make the epoll reactor call each ready connection directly instead of
    through C{twisted.python.log.callWithLogger}, with the TCP fast paths
    on (L{edgeproxy._compat.FastPaths.tcp}); else leave the reactor as it is.

    Why: Twisted's C{EPollReactor.doPoll} wraps every I/O event in
    C{callWithLogger}, which asks the connection for its C{logPrefix()},
    copies the legacy log context dictionary and pushes it for the call,
    so that I{legacy} C{log.msg}/C{log.err} lines emitted meanwhile are
    tagged with the connection's prefix.  edgeproxy logs through
    C{twisted.logger}, whose events never read that context, so the only
    lines that lose the prefix are Twisted's own legacy ones (an
    unhandled error in a connection's callback is then tagged C{-}; its
    traceback still names the code).  The wrapper was a measurable share
    of the proxy's CPU under load (docs/performance.rst, Run 8).

    Only C{EPollReactor} itself (the default on Linux) is changed
    (L{edgeproxy._compat.twisted.reactor.dispatchWithoutLogContext}); any
    other reactor is left alone.

    @return: whether the reactor was changed.
    """
    if not fastPaths().tcp:
        return False
    if not dispatchWithoutLogContext(reactor):
        return False
    log.debug("reactor: I/O events dispatched without the legacy log context")
    return True
