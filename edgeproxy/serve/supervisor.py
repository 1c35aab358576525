# -*- test-case-name: tests.test_workers -*-
"""
L{Supervisor}: the process C{twistd edgeproxy} runs when C{[edgeproxy]
workers} is more than 1.

It opens every listening socket once (or adopts the ones systemd passed),
never accepts on them itself, and starts C{workers} processes
(C{python -m edgeproxy.worker}) that inherit them at file descriptors 3,
4, ... with C{LISTEN_FDS}/C{LISTEN_FDNAMES}, the way systemd hands sockets
over: each worker serves them through the ordinary, tested
C{systemd:} endpoint path, and the kernel spreads the connections.

The supervisor also:
  - runs the active health checks, once for the instance (a L{Runtime}
    built with no listener), and sends every backend state change to every
    worker over its control channel (L{edgeproxy.workers}); a (re)started
    or reloaded worker first gets the whole current state;
  - passes every line a worker logs to its own log, tagged with the
    worker's number (C{[worker 2 edgeproxy.service#info]});
  - restarts a worker that dies (logged with its exit status or signal),
    at once after a long healthy run, else with a growing delay; a worker
    that cannot start
    L{MAX_START_ATTEMPTS <edgeproxy.serve.slots.MAX_START_ATTEMPTS>} times
    in a row stops the supervisor with status 1 (the worker processes, by
    slot: L{edgeproxy.serve.slots});
  - forwards C{SIGHUP} to every worker (each reloads itself) and reloads
    its own view (configuration, health checks);
  - is the only process talking to systemd: C{READY=1} once every worker
    reported itself ready, C{RELOADING=1}/C{READY=1} around a reload,
    C{STOPPING=1}; workers do not inherit C{NOTIFY_SOCKET};
  - on stop (C{SIGTERM}), closes its copies of the sockets, sends
    C{SIGTERM} to every worker (each drains for C{shutdown_timeout}),
    waits for them (C{shutdown_timeout} plus L{STOP_MARGIN}, then
    C{SIGKILL}) and exits with status 0.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from edgeproxy import logs
from edgeproxy.accesslog import AccessLog
from edgeproxy.config.model import Config
from edgeproxy.errors import EdgeProxyError, StartupError
from edgeproxy.metrics import Metrics
from edgeproxy.runtime import Runtime, stopPool
from edgeproxy.serve.aggregate import aggregateMetrics, aggregateStatus
from edgeproxy.serve.heldsockets import HeldSockets
from edgeproxy.serve.reload import checked, discard, refusalStatus, refused, storeFor
from edgeproxy.serve.signals import ProcessSignals
from edgeproxy.serve.slots import WorkerSlots
from edgeproxy.serve.workerprocess import WorkerProcess, describeExit
from edgeproxy.systemd import Notifier
from edgeproxy.tls.store import CertificateStore
from edgeproxy.upstream.backend import Backend

# The namespace operators see and filter on ("[edgeproxy.supervisor#info]", docs/operations.rst):
# it names the job, and stays when the module moves.
log = Logger(namespace="edgeproxy.supervisor")

STOP_MARGIN = 5.0
"""Seconds a worker gets beyond C{shutdown_timeout} to exit on SIGTERM
before it is killed."""


class Supervisor(MultiService):
    """
    The supervising process of C{workers > 1}.

    @ivar config: the configuration (its listeners' sockets are opened
        here; the workers read the same file).
    @ivar sockets: the listening sockets the workers inherit, and the admin
        listener (L{HeldSockets}).
    @ivar signals: the process signals (L{ProcessSignals}), installed only
        with C{installSignalHandlers}.
    @ivar slots: the worker processes, by slot (L{WorkerSlots}).
    @ivar exitCode: 1 once a fatal problem stopped the supervisor.
    @ivar ready: fires once every worker reported itself ready.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        notifier: Notifier | None = None,
        installSignalHandlers: bool = True,
        publisher: ILogObserver = globalLogPublisher,
        executable: str = sys.executable,
    ) -> None:
        super().__init__()
        self.config = config
        self.clock = reactor
        self._reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier()
        self._installSignalHandlers = installSignalHandlers
        self.sockets = HeldSockets(reactor, lambda: self.config, self)
        self.slots = WorkerSlots(self, reactor, executable, publisher)
        self._everReady: set[int] = set()
        self._stopping: Deferred[None] | None = None
        self.signals = ProcessSignals(
            reactor,
            log,
            reload=self.reload,
            stopping=lambda: self.stopping,
            draining="stopping the workers",
            forcing="the workers abort what is still in flight",
            onForce=self._forceWorkers,
            keepCatching=True,
        )
        self._reloadPending: set[int] = set()
        self._socketsChanged = False
        self.exitCode = 0
        self.ready: Deferred[None] = Deferred()
        self.startedAt: float | None = None
        self.metrics = Metrics(config.proxy.latency_buckets)
        self.refusal: str | None = None
        """The C{STATUS=} after a refused reload, until one succeeds."""
        # Opened now so that an unwritable access log stops the start here,
        # not in every worker; the workers open it themselves.
        accessLog = AccessLog.fromSettings(config.proxy, reactor)
        if accessLog is not None:
            accessLog.close()
        self.store: CertificateStore | None = None
        if config.tls is not None:
            # For /status and the expiry metrics; the workers serve their own.
            self.store = CertificateStore(config.tls, reactor)
            self.store.load()
        # The one process that talks to the ACME CA (edgeproxy.acme.supervising).
        from edgeproxy.acme.setup import setUpACME

        self.challenges, self.acme, self.onDemand = setUpACME(self, config, reactor, self.metrics, True)
        self.workersACME: Any = None
        if self.acme is not None:
            from edgeproxy.acme.supervising import WorkersACME

            self.workersACME = WorkersACME(self)
        # The health checks of the whole instance, and the backend states
        # the admin listener shows and acts on.
        self.runtime = Runtime.build(config, reactor, metrics=self.metrics, activeChecks=True)
        self._observe(self.runtime)
        self._runtimeStarted = False
        from edgeproxy.admin.status import stateSamples

        self.metrics.setStateSource(lambda: stateSamples(self))

    def currentRuntime(self) -> Runtime:
        """The runtime whose pools hold the backend states (no listener)."""
        return self.runtime

    @property
    def ports(self) -> dict[str, Any]:
        """Listener name -> the supervisor's own listening port."""
        return self.sockets.ports

    @property
    def sites(self) -> list[Any]:
        """The supervisor serves no site (for the admin builders)."""
        return []

    @property
    def count(self) -> int:
        """Number of worker processes."""
        return self.config.proxy.workers

    @property
    def workers(self) -> dict[int, WorkerProcess]:
        """Slot number -> the running worker process, if any."""
        return self.slots.workers

    @property
    def stopping(self) -> bool:
        """Whether the supervisor is stopping (no restart, no reload)."""
        return self._stopping is not None

    # Start -------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._openOrExit()

    def startService(self) -> None:
        super().startService()
        self._openOrExit()
        if self.startedAt is None:
            self.startedAt = self.clock.seconds()
        if not self._runtimeStarted:
            self._runtimeStarted = True
            self.runtime.start()
        if self._installSignalHandlers:
            # SIGHUP stays installed while stopping: it is ignored then
            # (its default action would end the supervisor mid-drain).
            self.signals.installHangup()
            self.signals.installTermination()
        for number in range(1, self.count + 1):
            if not self.slots.taken(number):
                self.slots.spawn(number)

    def _openOrExit(self) -> None:
        if self.ports:
            return
        try:
            self.sockets.openAll()
        except StartupError as e:
            log.critical("{message}; exiting", message=str(e))
            raise SystemExit(1) from e

    def initialState(self) -> list[dict[str, Any]]:
        """
        What a starting worker reads before it accepts its first connection
        (L{edgeproxy.worker.readInitialState}): every backend's state, the
        ACME challenges and certificates, then the end of it.
        """
        messages = self.verdicts()
        if self.workersACME is not None:
            messages.extend(self.workersACME.initialState())
        messages.append({"op": "state-end"})
        return messages

    # What workers say ----------------------------------------------------------

    def workerNotified(self, worker: WorkerProcess, fields: dict[str, str]) -> None:
        """A worker sent what a single process would send to systemd."""
        if self.workers.get(worker.number) is not worker:
            return
        if fields.get("READY") == "1":
            first = self.slots.ready(worker)
            self.workerReady(worker, first)
        if fields.get("ERRNO") and "STATUS" in fields:
            log.error(
                "worker {number}: {status}",
                number=worker.number,
                status=fields["STATUS"],
            )

    def workerReady(self, worker: WorkerProcess, first: bool) -> None:
        """
        A worker finished starting or reloading: it gets the whole backend
        state first, and the supervisor may now be ready itself.
        """
        if first:
            log.info("worker {number} (pid {pid}) ready", number=worker.number, pid=worker.pid)
            self.slots.retireReplaced(worker.number)
        # Started or reloaded, its pools may be new: they get every
        # backend's state before anything else.
        for message in self.verdicts():
            worker.send(message)
        wasPending = worker.number in self._reloadPending
        self._reloadPending.discard(worker.number)
        if first and worker.number not in self._everReady:
            self._everReady.add(worker.number)
            if len(self._everReady) >= self.count and not self.ready.called:
                log.info("All {count} workers ready", count=self.count)
                self.notifier.ready(status=self._status())
                self.ready.callback(None)
        elif wasPending and not self._reloadPending and self.ready.called:
            self.notifier.ready(status=self._status())

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        """The process of C{worker} is gone: log it, restart it unless stopping."""
        number = worker.number
        if self.slots.ended(worker):
            log.info("worker {number} (pid {pid}) {how}", number=number, pid=worker.pid, how=describeExit(reason))
            return
        how = describeExit(reason)
        if self._stopping is not None:
            log.info("worker {number} (pid {pid}) {how}", number=number, pid=worker.pid, how=how)
            return
        if number in self._reloadPending:
            # Its replacement starts with the new configuration: the reload
            # need not wait for it.
            self._reloadPending.discard(number)
            if not self._reloadPending and self.ready.called:
                self.notifier.ready(status=self._status())
        log.error(
            "worker {number} (pid {pid}) {how}",
            number=number,
            pid=worker.pid,
            how=how,
            exitStatus=getattr(reason.value, "exitCode", None),
            exitSignal=getattr(reason.value, "signal", None),
        )
        self.slots.restartAfter(worker, how)

    def fatal(self, message: str) -> None:
        """Stop everything and make the process exit with status 1."""
        if self.exitCode:
            return
        log.critical("{message}; stopping", message=message)
        self.exitCode = 1
        self.notifier.notify(STATUS=message, ERRNO=1)
        if not self.ready.called:
            self.ready.errback(StartupError(message))
            self.ready.addErrback(lambda _: None)
        if self._reactor.running:
            # twistd exits 0 after a plain reactor.stop(): the status must
            # say the start failed (the unit's Restart= depends on it).
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()

    def _status(self) -> str:
        if self.refusal is not None:
            return self.refusal
        names = list(self.ports)
        return f"serving {len(names)} listener(s) ({', '.join(names)}) with {self.count} workers"

    # Backend states ------------------------------------------------------------

    def _observe(self, runtime: Runtime, skip: frozenset[str] = frozenset()) -> None:
        for name, pool in runtime.pools.items():
            if name in skip:
                # A pool taken over by a reload is observed already.
                continue
            pool.observers.append(partial(self.backendChanged, name))

    def backendChanged(self, upstream: str, backend: Backend) -> None:
        """
        A backend changed state here (a health check's verdict, an admin
        action): every worker applies it too.
        """
        if self.runtime.pools.get(upstream) is None or backend not in self.runtime.pools[upstream].backends:
            # A pool a reload retired: its verdicts no longer matter.
            return
        message = _verdict(upstream, backend)
        for worker in self.workers.values():
            if worker.ready:
                worker.send(message)

    def verdicts(self) -> list[dict[str, Any]]:
        """The state of every backend, as the messages a worker applies."""
        return [
            _verdict(name, backend)
            for name, pool in self.runtime.pools.items()
            for backend in pool.backends
        ]

    # What the admin listener shows ---------------------------------------------

    def aggregateMetrics(self) -> Deferred[bytes]:
        """C{GET /metrics} of the instance (L{edgeproxy.serve.aggregate})."""
        return aggregateMetrics(self)

    def aggregateStatus(self, now: float | None = None) -> Deferred[dict[str, Any]]:
        """C{GET /status} of the instance (L{edgeproxy.serve.aggregate})."""
        return aggregateStatus(self, now)

    # Signals and reload ----------------------------------------------------------

    def _forceWorkers(self) -> None:
        # A second signal is passed on: each worker's own second signal
        # aborts what it still has in flight.
        for worker in list(self.workers.values()) + list(self.slots.retiring):
            worker.signal("TERM")

    def reload(self) -> None:
        """
        C{SIGHUP}: the supervisor reloads its own view (L{reloadOwnView})
        and every worker reloads itself; C{READY=1} goes to systemd when
        each has reported its reload done.
        """
        if self._stopping is not None:
            return
        self.notifier.reloading()
        log.info("SIGHUP: reloading {path} and {count} workers", path=self.config.path, count=len(self.workers))
        before = dict(self.workers)
        ok = self.reloadOwnView()
        self.metrics.reloaded(ok)
        if self._socketsChanged:
            # The running workers cannot be given the new sockets: a new
            # worker replaces each, and the old one drains once its
            # replacement is ready.  (Workers started by this reload, for
            # a larger `workers`, have the new sockets already.)
            self._socketsChanged = False
            self._reloadPending = {
                number for number, worker in before.items()
                if self.workers.get(number) is worker and worker not in self.slots.retiring
            }
            for number in sorted(self._reloadPending):
                self.slots.replace(number)
        else:
            self._reloadPending = {number for number, worker in self.workers.items() if worker.ready}
            for number in sorted(self._reloadPending):
                self.workers[number].signal("HUP")
        if not self._reloadPending and self.ready.called:
            # (Before the start is complete, READY=1 waits for the workers.)
            self.notifier.ready(status=self._status())

    def reloadOwnView(self) -> bool:
        """
        Read the configuration again, validated as C{edgeproxy check} does,
        and swap what the supervisor runs: the health checks (pools of
        unchanged upstreams are kept with their states), the certificates
        shown by C{/status}, the admin listener.  An invalid configuration
        changes nothing (each worker refuses it too, and logs it).

        A listener removed by the reload has its socket closed.  For a
        listener added, or moved to another endpoint, a socket is opened
        (its old one closed), and since running workers cannot inherit it,
        L{reload} replaces them (each new worker ready, then the old one
        drains).

        @return: whether the new configuration is in use.
        """
        from edgeproxy.config import load

        path = self.config.path
        now = self.clock.seconds()
        problem = checked(path, now, log)
        if problem is not None:
            self.refusal = refusalStatus(problem, now)
            return False
        try:
            config = load(path)
            runtime = Runtime.build(
                config, self._reactor, metrics=self.metrics, activeChecks=True, previous=self.runtime
            )
        except (EdgeProxyError, OSError) as e:
            self.refusal = refusalStatus(refused(log, e, path), now)
            return False
        try:
            self.store, _ = storeFor(config, self.store, self._reactor)
        except (EdgeProxyError, OSError) as e:
            # The workers refuse the reload for the same reason.
            self.refusal = refusalStatus(refused(log, e, path), now)
            discard(runtime, self.runtime)
            return False
        self.refusal = None
        logs.policy.configure(config.proxy.log_level, config.proxy.log_format)
        if self.acme is not None:
            self.acme.reconfigure(config)
        previous, self.runtime = self.runtime, runtime
        self._observe(runtime, skip=runtime.inherited)
        runtime.start()
        for pool in runtime.retiredFrom(previous):
            stopPool(pool)
            pool.close()
        # The supervisor serves no request: its cache stores (purges,
        # /status) are closed at once.
        for stores in runtime.retiredStoresFrom(previous):
            stores.close()
        old, self.config = self.config, config
        if self.sockets.reload(old, config):
            self._socketsChanged = True
        if config.proxy.workers != old.proxy.workers:
            self.slots.resize(old.proxy.workers, config.proxy.workers)
        return True

    # Stop ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:
            return self._stopping
        # The signal handlers stay: SIGHUP while stopping is ignored (its
        # default action would end the supervisor mid-drain), a second
        # SIGTERM is forwarded.
        children = maybeDeferred(super().stopService)
        self._stopping = Deferred.fromCoroutine(self._stop(children))
        return self._stopping

    async def _stop(self, children: Deferred[Any]) -> None:
        reactor = self._reactor
        self.notifier.stopping()
        if self.workersACME is not None:
            self.workersACME.stop()
        self.slots.cancelTimers()
        running = list(self.workers.values())
        log.info("Stopping: {count} worker(s) drain their requests", count=len(running))
        # The workers have their own copies: closing these makes the
        # kernel refuse connections once the last worker closed its own.
        await self.sockets.closeAll()
        running += [worker for worker in self.slots.retiring if worker not in running]
        for worker in running:
            worker.signal("TERM")
        timeout = self.config.proxy.shutdown_timeout + STOP_MARGIN
        if running:
            ended = DeferredList([worker.ended for worker in running])
            await _within(reactor, ended, timeout)
            stragglers = [worker for worker in running if not worker.ended.called]
            for worker in stragglers:
                log.warn(
                    "worker {number} (pid {pid}) still running {timeout}s after SIGTERM: killing it",
                    number=worker.number,
                    pid=worker.pid,
                    timeout=timeout,
                )
                worker.signal("KILL")
            if stragglers:
                await _within(reactor, DeferredList([w.ended for w in stragglers]), 5.0)
        await children
        for pool in self.runtime.pools.values():
            stopPool(pool)
        await _within(reactor, self.runtime.close(), 2.0)
        stores = self.runtime.cacheStores
        if stores is not None:
            stores.close()
        if self.exitCode == 0:
            self.signals.exitCleanly()
        log.info("Stopped")


def _verdict(upstream: str, backend: Backend) -> dict[str, Any]:
    return {
        "op": "verdict",
        "upstream": upstream,
        "address": backend.address,
        "state": backend.state.value,
        "reason": backend.reason,
    }


async def _within(clock: Any, waiting: Deferred[Any], timeout: float) -> None:
    """Wait for C{waiting}, at most C{timeout} seconds (never fails)."""
    done: Deferred[None] = Deferred()
    timer = clock.callLater(timeout, lambda: None if done.called else done.callback(None))
    waiting.addBoth(lambda _: None if done.called else done.callback(None))
    await done
    if timer.active():
        timer.cancel()
