# -*- test-case-name: tests.test_service -*-
"""
L{EdgeService}: the running proxy as one L{MultiService}, composed of the
modules of L{edgeproxy.serve}, each owning one job:

  - the listening ports (L{edgeproxy.serve.listeners}), serving sites
    built by L{edgeproxy.serve.sites} (the one module that knows the HTTP
    server's classes);
  - the signals (L{edgeproxy.serve.signals}): C{SIGHUP} reloads, C{SIGTERM}
    drains and the process exits 0;
  - the reload's validation and building (L{edgeproxy.serve.reload});
  - the drain of connections and pools (L{edgeproxy.serve.drain}).

This module owns the life cycle that orders them, the snapshot swap, and
the service manager notifications around each step:

  - I{build} (L{EdgeService.__init__}): certificates are loaded and the
    L{Runtime} built, so a bad certificate or upstream stops the start before
    any socket is opened.
  - I{start} (C{privilegedStartService}, before twistd drops privileges, so
    port 443 can be bound): one listening port per C{[listen:NAME]}.  When
    every C{listen()} Deferred has fired, C{READY=1} is sent.  A port that
    cannot be bound is logged (file, section, endpoint, reason) and the
    start raises C{SystemExit(1)}, so twistd exits with status 1 before the
    reactor runs; a failure that arrives later stops the reactor and exits
    with status 1.  C{startService} starts the runtime's pools (health
    checks, re-resolution).
  - I{reload} (C{SIGHUP}, L{EdgeService.reload}): C{RELOADING=1}; the file
    and everything it names validated as C{edgeproxy check} does, the whole
    new state built, then swapped as one snapshot (certificates, runtime,
    access log) and the listeners opened or closed to match; C{READY=1}.
    An invalid configuration changes nothing.  See
    L{EdgeService.reloadConfiguration}.
  - I{stop} (C{SIGTERM}): C{STOPPING=1}; ports closed at once; idle
    keep-alive connections closed at once and busy ones closed after their
    current response; in-flight requests (and upgraded tunnels) get
    C{shutdown_timeout} seconds, or until a second C{SIGTERM}, then the
    remaining connections are aborted; the upstream pools are stopped and
    closed last.

Requests read the runtime through L{EdgeService.currentRuntime} once, when
routed, so rebinding L{EdgeService.runtime} switches new requests only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy import logs
from edgeproxy._compat import decideFastPaths, useFastPaths
from edgeproxy.accesslog import AccessLog
from edgeproxy.config import load
from edgeproxy.config.model import Config, Listener
from edgeproxy.errors import EdgeProxyError, StartupError
from edgeproxy.metrics import Metrics
from edgeproxy.runtime import Runtime
from edgeproxy.serve.drain import closePools, drainConnections
from edgeproxy.serve.listeners import AdminListener, ListenerSet
from edgeproxy.serve.reload import (
    RetiringPools,
    accessLogFor,
    checked,
    discard,
    refusalStatus,
    refused,
    storeFor,
)
from edgeproxy.serve.signals import ProcessSignals
from edgeproxy.serve.sites import makeSite, useAccessLog
from edgeproxy.systemd import Notifier
from edgeproxy.tls.certs import CertificateSet
from edgeproxy.tls.store import CertificateStore
from edgeproxy.tuning import tuneEventDispatch, tuneGarbageCollector

# The namespace operators see and filter on ("[edgeproxy.service#info]", docs/operations.rst):
# it names the job, and stays when the module moves.
log = Logger(namespace="edgeproxy.service")


class EdgeService(MultiService):
    """
    The proxy built from one L{Config}.

    @ivar config: The configuration being served.
    @ivar store: The L{CertificateStore}, or L{None} without C{[tls]}.
    @ivar runtime: The current L{Runtime}; rebinding it switches every new
        request to another one.
    @ivar metrics: The process's L{Metrics}.
    @ivar listeners: The open listeners (L{ListenerSet}).
    @ivar admin: The admin listener (L{AdminListener}).
    @ivar signals: The process signals (L{ProcessSignals}), installed only
        with C{installSignalHandlers}.
    @ivar ready: Fires with the list of ports when every listener listens.
    @ivar exitCode: 1 once a start-up failure stopped the process.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        notifier: Notifier | None = None,
        installSignalHandlers: bool = True,
        accessLogStream: Any = None,
        metrics: Metrics | None = None,
        activeChecks: bool = True,
        prepareConfig: Callable[[Config], Config] | None = None,
        orderCertificates: bool = True,
    ) -> None:
        """
        Load the certificates and build the runtime now, so that their errors
        stop the start.

        @param reactor: Provides C{IReactorCore}, C{IReactorTime},
            C{IReactorFromThreads} and the listen methods the endpoint
            descriptions need.
        @param notifier: The service manager notifier (default: from the
            environment).
        @param installSignalHandlers: Whether C{SIGHUP} reloads and
            C{SIGTERM} drains to exit status 0 (off in unit tests that run
            inside another process's signal setup).
        @param accessLogStream: Where C{access_log = -} writes (default: the
            process's standard output).
        @param activeChecks: Whether the pools run their active health
            checks (a worker of a supervisor does not: see
            L{edgeproxy.serve.supervisor}).
        @param prepareConfig: Applied to every configuration read again by
            a reload before it is used (a worker rewrites its listeners to
            the sockets it inherited: L{edgeproxy.workers.workerConfig}).
        @param metrics: Where the proxy's metrics are recorded (default: a
            new L{Metrics}).
        @param orderCertificates: Whether this process talks to the ACME CA
            (C{[acme]}); a worker of a supervisor does not: its challenges
            and certificates come from the supervisor.

        @raise CertificateError: a certificate cannot be served.
        @raise edgeproxy.errors.ConfigError: the runtime cannot be built.
        """
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier()
        self._installSignalHandlers = installSignalHandlers
        self.signals = ProcessSignals(
            reactor,
            log,
            reload=self.reload,
            stopping=lambda: self._stopping is not None,
            draining="draining",
            forcing="aborting what is still in flight",
        )
        self.exitCode = 0
        # The histogram buckets are the start's: a reload keeps them, so
        # that the series stay comparable.
        self.metrics = metrics if metrics is not None else Metrics(config.proxy.latency_buckets)
        self.refusal: str | None = None
        """The C{STATUS=} of the last reload when it was refused, until one
        succeeds (L{edgeproxy.serve.reload.refusalStatus})."""
        self.startedAt = reactor.seconds()
        self.admin = AdminListener(self, reactor, lambda: self.config)
        from edgeproxy.admin.status import stateSamples

        # The gauges of /metrics are read from this service at each scrape.
        self.metrics.setStateSource(lambda: stateSamples(self))
        self.store: CertificateStore | None = None
        if config.tls is not None:
            self.store = CertificateStore(config.tls, reactor)
            self.store.load()
        # ACME and OCSP (edgeproxy.acme, edgeproxy.tls.ocsp).
        from edgeproxy.acme.setup import setUpACME

        self.challenges, self.acme, self.onDemand = setUpACME(
            self, config, reactor, self.metrics, orderCertificates
        )
        self.configListeners: list[Callable[[Config], None]] = []
        """Called with each configuration a reload swaps in, after the swap
        (a worker's on-demand certificates, L{edgeproxy.acme.worker})."""
        self._accessLogStream = accessLogStream
        self.accessLog = AccessLog.fromSettings(config.proxy, reactor, stdout=accessLogStream)
        self._activeChecks = activeChecks
        self._prepareConfig = prepareConfig
        self.runtime = Runtime.build(
            config, reactor, metrics=self.metrics, activeChecks=activeChecks
        )
        self._runtimeStarted = False
        self.listeners = ListenerSet(reactor, lambda: self.config, self._makeSite, lambda: self.store)
        # Pools of replaced runtimes, closed once their requests are done.
        self._retiring = RetiringPools(reactor, log)
        self._reloadInProgress: Deferred[bool] | None = None
        self._reloadAgain = False
        self.ready: Deferred[list[IListeningPort]] = Deferred()
        self._listening: Deferred[list[IListeningPort]] | None = None
        self._stopping: Deferred[None] | None = None

    def currentRuntime(self) -> Runtime:
        """The runtime new requests are served from (the sites call this)."""
        return self.runtime

    @property
    def sites(self) -> list[Any]:
        """The site of each open listener, in configuration order."""
        return self.listeners.sites

    @property
    def ports(self) -> list[IListeningPort]:
        """The listening ports, in the same order, once listening."""
        return self.listeners.ports

    @property
    def adminPort(self) -> IListeningPort | None:
        """The admin listener's port, while it listens."""
        return self.admin.port

    # Start

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listenOrExit()

    def startService(self) -> None:
        super().startService()
        self._listenOrExit()
        if not self._runtimeStarted:
            self._runtimeStarted = True
            self.runtime.start()
        if self._installSignalHandlers:
            self.signals.installTermination()
            # Process-wide, so only for the process's own service (as the
            # signal handlers): once running, everything start-up built is
            # kept out of full collections (edgeproxy.tuning says why).
            self._reactor.callWhenRunning(tuneGarbageCollector)
            tuneEventDispatch(self._reactor)

    def _listenOrExit(self) -> None:
        if self._installSignalHandlers:
            # Before READY=1: a manager may send SIGHUP as soon as it sees it.
            self.signals.installHangup()
        try:
            self._listen()
            self.admin.start()
        except StartupError as e:
            # Bound synchronously, as tcp:, ssl:, unix: and systemd: all
            # are: the ports that did open are closed.
            self.listeners.closeAll()
            self.signals.restoreHangup()
            # One clear line rather than a traceback through twistd: the
            # exception leaves privilegedStartService, twistd exits 1 before
            # the reactor runs, and READY=1 is never sent.
            log.critical("{message}; exiting", message=str(e))
            raise SystemExit(1) from e

    def _makeSite(self, listener: Listener) -> Any:
        """The site C{listener}'s port serves, built by
        L{edgeproxy.serve.sites.makeSite} from this service's runtime,
        access log and metrics."""
        site = makeSite(
            self.currentRuntime, listener, self._reactor, accessLog=self.accessLog, metrics=self.metrics
        )
        # The challenges the ACME HTTP-01 hook answers (edgeproxy.http.acmehook).
        site.acmeChallenges = self.challenges
        return site

    def _listen(self) -> None:
        if self._listening is not None:
            return
        if self._installSignalHandlers:
            # Process-wide, so only for the process's own service (as the
            # signal handlers), and before anything is built with them.
            self._useFastPaths()
        # Said before READY=1, so that it is in the log once systemd (or a
        # test) sees the service started.
        self._warnAtStart()
        self._listening = self.listeners.listenAll()
        failures: list[Failure] = []
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            raise StartupError(self.listeners.describeFailure(failures[0]))
        if not self._listening.called:
            self._listening.addErrback(self._failedLater)

    def _listened(self, ports: list[IListeningPort]) -> list[IListeningPort]:
        for listener, port in zip(self.config.listeners, ports):
            self.listeners.logListening(listener, port)
        self.notifier.ready(status=self._status())
        self.ready.callback(ports)
        return ports

    def _failedLater(self, failure: Failure) -> None:
        message = self.listeners.describeFailure(failure)
        log.critical("{message}; stopping", message=message)
        self.exitCode = 1
        self.listeners.closeAll()
        self.notifier.notify(STATUS=message, ERRNO=1)
        self.ready.errback(StartupError(message))
        self.ready.addErrback(lambda _: None)
        if self._reactor.running:
            # twistd exits 0 after a plain reactor.stop(); the exit status must
            # say the start failed (the unit's Restart= depends on it).
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()

    def _useFastPaths(self) -> None:
        """Decide the process's fast paths (L{edgeproxy._compat}), once, and say which."""
        decision = decideFastPaths(self.config.proxy.fast_paths)
        useFastPaths(decision)
        log.info("Fast paths {summary} ({why})", summary=decision.summary, why=decision.why)

    def _warnAtStart(self) -> None:
        self._warnInsecure()
        if self.store is not None:
            self._logCertificates("Serving", self.store.current)

    def _warnInsecure(self) -> None:
        for upstream in self.config.upstreams.values():
            if upstream.insecure:
                log.warn(
                    "[upstream:{name}] insecure = yes: backend certificates are NOT"
                    " verified; anyone on the path to {servers} can read and change"
                    " the traffic",
                    name=upstream.name,
                    servers=", ".join(s.address for s in upstream.servers),
                )

    def _status(self) -> str:
        if self.refusal is not None:
            return self.refusal
        names = [listener.name for listener in self.config.listeners if listener.name in self.listeners.byName]
        certificates = len(self.store.current.entries) if self.store is not None else 0
        return f"serving {len(names)} listener(s) ({', '.join(names)}), {certificates} certificate(s)"

    def _logCertificates(self, verb: str, certificates: CertificateSet) -> None:
        for entry in certificates.entries:
            log.info(
                "{verb} certificate {path} for {names}{default}, valid until {notAfter}",
                verb=verb,
                path=entry.path,
                names=", ".join(entry.names),
                default=" (default)" if entry.isDefault else "",
                notAfter=entry.notAfter.isoformat(),
            )

    # Reload

    def reload(self) -> Deferred[bool]:
        """
        Reload the whole configuration (see L{reloadConfiguration}) between
        C{RELOADING=1} and C{READY=1}.  A reload asked for while one is
        still opening or closing listeners runs once that one is done.
        Never fails.

        @return: fires with whether the new configuration is served, once
            its listeners are open (or failed to open, which is logged).
        """
        if self._reloadInProgress is not None:
            self._reloadAgain = True
            return self._reloadInProgress
        done: Deferred[bool] = Deferred.fromCoroutine(self._reloadOnce())
        self._reloadInProgress = done

        def finished(ok: bool) -> bool:
            self._reloadInProgress = None
            if self._reloadAgain:
                self._reloadAgain = False
                self.reload()
            return ok

        done.addCallback(finished)
        return done

    async def _reloadOnce(self) -> bool:
        if self._stopping is not None:
            log.info("SIGHUP while stopping: not reloading")
            return False
        self.notifier.reloading()
        log.info("SIGHUP: reloading {path}", path=self.config.path)
        try:
            changes = self.reloadConfiguration()
        except Exception:
            log.failure("Reload failed, still serving the previous configuration")
            self.refusal = refusalStatus("an unexpected error (see the log)", self._reactor.seconds())
            changes = None
        ok = changes is not None
        if changes is not None:
            try:
                await changes
            except Exception:
                log.failure("Applying the listeners of the new configuration failed")
        self.metrics.reloaded(ok)
        self.notifier.ready(status=self._status())
        return ok

    def reloadConfiguration(self) -> Deferred[None] | None:
        """
        Read the configuration file again, with every file it names, and
        serve it: certificates, routes, upstreams, limits, access log,
        trusted proxies, C{via}, listeners.

        It is validated exactly as C{edgeproxy check} validates it; then the
        whole new state is built (certificate contexts, router, pools,
        access log file) before anything is swapped, so an invalid
        configuration, or any file that cannot be loaded, changes nothing
        and is logged with its file, line, section and key.

        What is in flight is not touched: requests finish on the runtime
        (and pools) they were routed with, upgraded tunnels carry on,
        kept-alive connections send their next request through the new
        runtime.  Pools of unchanged upstreams are taken over by the new
        runtime; the others are stopped now and closed once their requests
        are done (at most C{shutdown_timeout} later).

        @return: L{None} when the configuration was refused; else a
            Deferred that fires when the listeners that changed are open or
            closed.
        """
        path = self.config.path
        now = self._reactor.seconds()
        problem = checked(path, now, log)
        if problem is not None:
            self.refusal = refusalStatus(problem, now)
            return None
        try:
            config = load(path)
            if self._prepareConfig is not None:
                config = self._prepareConfig(config)
            changes = self._swap(config)
        except (EdgeProxyError, OSError) as e:
            self.refusal = refusalStatus(refused(log, e, path), now)
            return None
        self.refusal = None
        return changes

    def _swap(self, config: Config) -> Deferred[None]:
        reactor = self._reactor
        # Build everything that can fail first; nothing is swapped until
        # the last of it succeeded.
        runtime = Runtime.build(
            config,
            reactor,
            metrics=self.metrics,
            activeChecks=self._activeChecks,
            previous=self.runtime,
        )
        try:
            accessLog, reopen = accessLogFor(
                self.config.proxy, config.proxy, self.accessLog, reactor, stdout=self._accessLogStream
            )
        except BaseException:
            discard(runtime, self.runtime)
            raise
        try:
            store, certificates = storeFor(config, self.store, reactor)
        except BaseException:
            discard(runtime, self.runtime)
            if not reopen and accessLog is not None:
                accessLog.close()
            raise

        # The swap.  Nothing below can make the reload fail.
        previous = self.runtime
        if config.proxy.workers != self.config.proxy.workers and self._prepareConfig is None:
            # One process cannot become a supervisor (nor a worker of one)
            # in place; a supervisor follows the change itself.
            log.warn(
                "[edgeproxy] workers = {workers}: takes effect at the next restart"
                " (this process serves on alone)",
                workers=config.proxy.workers,
            )
        if config.proxy.fast_paths != self.config.proxy.fast_paths:
            log.warn(
                "[edgeproxy] fast_paths = {value}: takes effect at the next restart",
                value=config.proxy.fast_paths,
            )
        self.config = config
        self.runtime = runtime
        self.store = store
        logs.policy.configure(config.proxy.log_level, config.proxy.log_format)
        if reopen:
            try:
                if self.accessLog is not None:
                    self.accessLog.reopen()
            except Exception:
                log.failure("Cannot reopen the access log, still writing to the old file")
        else:
            old = self.accessLog
            self.accessLog = accessLog
            for site in self.listeners.allSites():
                useAccessLog(site, accessLog)
            if old is not None:
                old.close()
        try:
            runtime.start()
        except Exception:
            # Served already; a pool whose checks did not start is still a
            # pool (its backends keep their initial state).
            log.failure("Starting the upstream pools of the new configuration failed")
        self._retiring.retire(runtime.retiredFrom(previous), config.proxy.shutdown_timeout)
        self._retiring.retireStores(runtime.retiredStoresFrom(previous), config.proxy.shutdown_timeout)
        log.info(
            "Reloaded {path}: {routes} route(s), {upstreams} upstream(s)"
            " ({kept} kept with their connections)",
            path=config.path,
            routes=len(config.routes),
            upstreams=len(config.upstreams),
            kept=len(runtime.inherited),
        )
        self._warnInsecure()
        if certificates is not None:
            self._logCertificates("Now serving", certificates)
        if self.acme is not None:
            self.acme.reconfigure(config)
        elif config.acme is not None and self._prepareConfig is None:
            log.warn("[acme] added by a reload: takes effect at the next restart")
        for follow in self.configListeners:
            try:
                follow(config)
            except Exception:
                log.failure("Following the reloaded configuration failed")
        return Deferred.fromCoroutine(self._applyListeners(config))

    async def _applyListeners(self, config: Config) -> None:
        await self.listeners.apply(config)
        await self.admin.follow()

    # Stop

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:
            return self._stopping
        self.signals.restoreHangup()
        children = maybeDeferred(super().stopService)
        self._stopping = Deferred.fromCoroutine(self._drain(children))
        return self._stopping

    async def _drain(self, children: Deferred[Any]) -> None:
        reactor = self._reactor
        timeout = self.config.proxy.shutdown_timeout
        self.notifier.stopping()
        log.info(
            "Stopping: closing listeners, {inflight} request(s) in flight get up to"
            " {timeout}s to finish",
            inflight=self.listeners.inFlight(),
            timeout=timeout,
        )
        if self._reloadInProgress is not None:
            # A reload still opening ports would open them after these
            # close: let it finish first (it only waits on ports).
            self._reloadAgain = False
            await self._reloadInProgress
        # No new connections from now on.
        await DeferredList(self.listeners.closeAll(), consumeErrors=True)
        await drainConnections(reactor, self.listeners.connections, timeout, lambda: self.signals.forced)
        await children
        # Pools: the current runtime's and those of replaced runtimes still
        # waiting for their last requests.
        pools = list(self.runtime.pools.values()) + self._retiring.takeAll()
        await closePools(reactor, pools)
        # The cache's stores, the same way: the uses batched are written.
        current = self.runtime.cacheStores
        for stores in ([] if current is None else [current]) + self._retiring.takeStores():
            try:
                stores.close()
            except Exception:
                log.failure("Closing the cache stores failed")
        # Last: /status and /metrics show the drain until it is over.
        await self.admin.stop()
        if self.accessLog is not None:
            self.accessLog.close()
        if self.exitCode == 0:
            self.signals.exitCleanly()
        log.info("Stopped")
