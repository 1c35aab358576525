# -*- test-case-name: tests.test_service,tests.test_workers -*-
"""
Reload as a snapshot swap: what both services (the single process and the
supervisor) do to validate a configuration file again and build what it
asks for before anything is swapped, and what happens afterwards to the
pools the new runtime did not take over.

  - L{checked}: the file and every file it names validated as
    C{edgeproxy check} validates them, each problem logged;
  - L{refused}: the one line a reload that failed later logs (file,
    section, key);
  - L{refusalStatus}: the C{STATUS=} systemd gets after a refused reload;
  - L{accessLogFor}, L{storeFor}: the access log and the certificates of
    the new configuration, built (L{storeFor} swaps the certificates in
    the current store only as its last step, when every file is good);
  - L{discard}: the pools (and cache stores) of a runtime that will not
    be served;
  - L{RetiringPools}: pools of a replaced runtime, stopped at once and
    closed once their last request is done (or at C{shutdown_timeout});
    its cache stores too, closed once their writes are done.

The swap itself, rebinding the service's attributes, is the service's.
"""

from __future__ import annotations

import io
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from edgeproxy.accesslog import AccessLog
from edgeproxy.cache.stores import CacheStores
from edgeproxy.config.model import Config, ProxySettings
from edgeproxy.errors import EdgeProxyError
from edgeproxy.runtime import Runtime, poolInFlight, stopPool
from edgeproxy.tls.certs import CertificateSet
from edgeproxy.tls.store import CertificateStore
from edgeproxy.upstream.pool import UpstreamPool

__all__ = [
    "RETIRE_POLL_INTERVAL",
    "RetiringPools",
    "accessLogFor",
    "checked",
    "discard",
    "refusalStatus",
    "refused",
    "storeFor",
]

RETIRE_POLL_INTERVAL = 0.5
"""Seconds between checks for the last request of a pool a reload retired."""

REFUSED = "Reload refused, still serving the previous configuration: {problem}"


def checked(path: str, now: float, log: Logger) -> str | None:
    """
    Validate C{path} exactly as C{edgeproxy check} does (the same messages).

    @param now: POSIX time, for the certificates' validity.
    @return: L{None} when it is valid; else the first problem (each problem
        has been logged), for L{refusalStatus}.
    """
    from edgeproxy.cli import EXIT_OK, check

    problems = io.StringIO()
    if check(path, out=io.StringIO(), err=problems, now=now) == EXIT_OK:
        return None
    lines = problems.getvalue().splitlines()
    for problem in lines:
        log.error(REFUSED, problem=problem)
    return lines[0] if lines else f"{path}: not valid"


def refused(log: Logger, error: EdgeProxyError | OSError, path: str) -> str:
    """
    Log why a reload was refused after L{checked} passed: files changed
    between the check and the load, or a problem the check does not see
    (a port, a file that cannot be opened for writing).

    @return: the problem, for L{refusalStatus}.
    """
    if isinstance(error, OSError):
        problem = f"{error.filename or path}: {error.strerror or error}"
        log.error(
            "Reload refused, still serving the previous configuration: {path}: {problem}",
            path=error.filename or path,
            problem=error.strerror or str(error),
        )
        return problem
    log.error(
        REFUSED,
        problem=str(error),
        file=getattr(error, "file", None),
        section=getattr(error, "section", None),
        key=getattr(error, "key", None),
    )
    return str(error).splitlines()[0]


def refusalStatus(problem: str, now: float) -> str:
    """
    The C{STATUS=} that goes with C{READY=1} after a refused reload (and
    stays until a reload succeeds), so that C{systemctl status} says the
    configuration on disk is not the one served.

    @param now: POSIX time of the refusal.
    """
    when = time.strftime("%H:%M:%S UTC", time.gmtime(now))
    return f"Reload refused at {when}, serving the previous configuration: {problem}"


def accessLogFor(
    old: ProxySettings,
    new: ProxySettings,
    current: AccessLog | None,
    reactor: Any,
    stdout: Any = None,
) -> tuple[AccessLog | None, bool]:
    """
    The access log the new settings ask for, opened now.

    @param current: the access log of the C{old} settings.
    @param stdout: where C{access_log = -} writes.
    @return: (the log, C{True} when it is C{current}, to reopen).
    @raise OSError: the new file cannot be opened.
    """
    if (old.access_log, old.access_log_format) == (new.access_log, new.access_log_format):
        return current, True
    return AccessLog.fromSettings(new, reactor, stdout=stdout), False


def storeFor(
    config: Config, store: CertificateStore | None, reactor: Any
) -> tuple[CertificateStore | None, CertificateSet | None]:
    """
    The certificate store that serves C{config}: C{store} with its
    certificates reloaded, a new one when there was none, L{None} without
    C{[tls]} (the parser sees to it that no TLS listener is left then;
    ports still closing keep their own reference to the old store).

    Call it last of what can fail: reloading C{store} swaps its
    certificates as its last step, and only when every file is good.

    @return: the store, and the certificates it now serves (L{None}
        without C{[tls]}).
    @raise edgeproxy.errors.EdgeProxyError: a certificate cannot be served.
    """
    if config.tls is None:
        return None, None
    if store is None:
        store = CertificateStore(config.tls, reactor)
        store.load()
        return store, store.current
    return store, store.reload(config.tls)


def discard(runtime: Runtime, serving: Runtime | None = None) -> None:
    """Close the pools of a runtime that will not be served, except those
    it took over from the one that is (C{serving}), and its cache stores
    unless they are C{serving}'s."""
    for name, pool in runtime.pools.items():
        if name not in runtime.inherited:
            pool.close()
    stores = runtime.cacheStores
    if stores is not None and (serving is None or stores is not serving.cacheStores):
        stores.close()


class RetiringPools:
    """
    The pools of replaced runtimes: stopped at once (no new request, no
    health check), closed once their requests in flight are done, or after
    C{timeout} seconds.  Their cache stores (L{retireStores}) likewise,
    once their writes are done.
    """

    def __init__(self, clock: Any, log: Logger) -> None:
        self._clock = clock
        self._log = log
        self._waiting: dict[Deferred[None], UpstreamPool] = {}
        self._stores: dict[Deferred[None], CacheStores] = {}

    def retire(self, pools: list[UpstreamPool], timeout: float) -> None:
        for pool in pools:
            stopPool(pool)
            self._closeWhenIdle(self._waiting, pool, partial(poolInFlight, pool), self._closePool, timeout)

    def retireStores(self, stores: list[CacheStores], timeout: float) -> None:
        for retired in stores:
            self._closeWhenIdle(self._stores, retired, retired.inFlight, self._closeStores, timeout)

    def takeStores(self) -> list[CacheStores]:
        """Stop waiting: the stores still open, for the caller to close (at
        stop, with the current ones)."""
        return _stopWaiting(self._stores)

    def takeAll(self) -> list[UpstreamPool]:
        """Stop waiting: the pools still open, for the caller to close (at
        stop, with the others)."""
        return _stopWaiting(self._waiting)

    def _closeWhenIdle(
        self,
        waiting: dict[Deferred[None], Any],
        retired: Any,
        inFlight: Callable[[], int],
        close: Callable[[Any], Awaitable[None]],
        timeout: float,
    ) -> None:
        """Close C{retired} once C{inFlight()} is 0 or C{timeout} passed;
        C{waiting} holds it meanwhile."""
        closing = Deferred.fromCoroutine(self._whenIdle(retired, inFlight, close, timeout))
        waiting[closing] = retired
        closing.addBoth(lambda _: waiting.pop(closing, None))

    async def _whenIdle(
        self, retired: Any, inFlight: Callable[[], int], close: Callable[[Any], Awaitable[None]], timeout: float
    ) -> None:
        clock = self._clock
        deadline = clock.seconds() + timeout
        try:
            while inFlight() > 0 and clock.seconds() < deadline:
                await deferLater(clock, RETIRE_POLL_INTERVAL)
        except CancelledError:
            # Stopping: whoever took it (takeAll, takeStores) closes it.
            return
        await close(retired)

    async def _closePool(self, pool: UpstreamPool) -> None:
        self._log.info("Upstream {upstream} of the previous configuration closed", upstream=pool.upstream.name)
        try:
            await pool.close()
        except Exception:
            self._log.failure("Closing upstream {upstream} failed", upstream=pool.upstream.name)

    async def _closeStores(self, stores: CacheStores) -> None:
        try:
            stores.close()
        except Exception:
            self._log.failure("Closing the cache stores of the previous configuration failed")


def _stopWaiting(waiting: dict[Deferred[None], Any]) -> list[Any]:
    """Cancel the waits of C{waiting}; what they waited to close."""
    retired = []
    for closing, thing in list(waiting.items()):
        closing.cancel()
        retired.append(thing)
    return retired
