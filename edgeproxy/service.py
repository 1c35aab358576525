# -*- test-case-name: tests.test_service -*-
"""
The running proxy as one L{MultiService}: listeners, certificate reload on
C{SIGHUP}, draining on stop, and the service manager notifications around
each.

Life cycle:

  - I{build} (L{EdgeService.__init__}): certificates are loaded and the
    L{Runtime} built, so a bad certificate or upstream stops the start before
    any socket is opened.
  - I{start} (C{privilegedStartService}, before twistd drops privileges, so
    port 443 can be bound): one listening port per C{[listen:NAME]}.  When
    every C{listen()} Deferred has fired, C{READY=1} is sent.  A port that
    cannot be bound is logged (file, section, endpoint, reason) and the
    start raises C{SystemExit(1)}, so twistd exits with status 1 before the
    reactor runs; a failure that arrives later stops the reactor and exits
    with status 1.
  - I{reload} (C{SIGHUP}, L{EdgeService.reload}): C{RELOADING=1}, a new
    certificate snapshot (or the old one kept, with the file and reason
    logged), the access log reopened, C{READY=1}.
  - I{stop} (C{SIGTERM} stops the reactor, which stops the service):
    C{STOPPING=1}; ports closed at once; idle keep-alive connections closed
    at once and busy ones closed after their current response; in-flight
    requests get C{shutdown_timeout} seconds, then the remaining connections
    are aborted; the upstream pools are closed last.

Requests read the runtime through L{EdgeService.currentRuntime}, so a new
L{Runtime} (whole-configuration reload, later) is swapped by rebinding
L{EdgeService.runtime}.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString, wrapServerTLS
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from edgeproxy.accesslog import AccessLog
from edgeproxy.config.model import Config, Listener
from edgeproxy.errors import CertificateError, EdgeProxyError
from edgeproxy.systemd import Notifier
from edgeproxy.tls.certs import CertificateSet
from edgeproxy.tls.store import DEFAULT_PROTOCOLS, CertificateStore

log = Logger()

DRAIN_POLL_INTERVAL = 0.1
"""Seconds between checks for finished requests while draining."""


class StartupError(EdgeProxyError):
    """A listener could not start listening."""


def channelBusy(channel: object) -> bool:
    """
    Whether a connection of a site has a request in flight.

    This reads Twisted attributes that are not documented API, and is the
    one place that does: C{_GenericHTTPChannelProtocol._channel} (the
    HTTP/1.1 or HTTP/2 protocol behind what C{Site.buildProtocol} returns),
    C{HTTPChannel.requests} (requests received and not yet answered) and
    C{H2Connection.streams} (open streams); L{closeIdle} and
    L{_transportOf} use C{_channel} the same way.  C{tests/test_service.py}
    checks them against real Twisted objects.
    """
    inner = getattr(channel, "_channel", channel)
    requests = getattr(inner, "requests", None)
    if requests is not None:
        return bool(requests)
    streams = getattr(inner, "streams", None)
    if streams is not None:
        return bool(streams)
    return False


def closeAfterResponse(channel: object) -> None:
    """
    Make an HTTP/1.1 connection close once its current response is complete,
    and say so in that response when its head is not sent yet (RFC 9112
    §9.6).  An HTTP/2 connection is left alone: it is closed by the drain
    loop as soon as it has no open stream.
    """
    inner = getattr(channel, "_channel", channel)
    requests = getattr(inner, "requests", None)
    if requests is None or not hasattr(inner, "persistent"):
        return
    inner.persistent = False
    for request in requests:
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])


def closeIdle(channel: object) -> None:
    """
    Close a connection that has no request in flight, cleanly.

    An HTTP/1.1 channel is closed through its own C{loseConnection}, which
    unregisters the channel as its transport's producer first: a TLS
    transport does not send its close_notify (and so never closes) while a
    producer is registered.  An HTTP/2 connection first gets a GOAWAY
    (RFC 9113 §6.8), as Twisted's own idle timeout does, and is
    unregistered from its transport the same way.
    """
    inner: Any = getattr(channel, "_channel", channel)
    if isinstance(inner, HTTPChannel):
        inner.loseConnection()
        return
    transport = getattr(inner, "transport", None)
    if transport is None:
        return
    conn = getattr(inner, "conn", None)
    if conn is not None:
        try:
            conn.close_connection()
            transport.write(conn.data_to_send())
        except Exception:
            # Already closing or closed at the HTTP/2 level: just close.
            pass
    # The ALPN switcher registers the H2Connection as its transport's
    # producer; TLS would wait for it to go away before closing.
    try:
        transport.unregisterProducer()
    except RuntimeError:
        # A test transport with nothing registered; real ones ignore it.
        pass
    transport.loseConnection()


def _transportOf(channel: Any) -> Any:
    # _GenericHTTPChannelProtocol proxies IProtocol only: the transport is
    # its inner channel's (see channelBusy).
    inner = getattr(channel, "_channel", channel)
    return getattr(inner, "transport", None)


class EdgeService(MultiService):
    """
    The proxy built from one L{Config}.

    @ivar config: The configuration being served.
    @ivar store: The L{CertificateStore}, or L{None} without C{[tls]}.
    @ivar runtime: The current L{Runtime}; rebinding it switches every new
        request to another one.
    @ivar sites: The L{EdgeSite} of each listener, in configuration order.
    @ivar ports: The listening ports, once listening.
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
    ) -> None:
        """
        Load the certificates and build the runtime now, so that their errors
        stop the start.

        @param reactor: Provides C{IReactorCore}, C{IReactorTime},
            C{IReactorFromThreads} and the listen methods the endpoint
            descriptions need.
        @param notifier: The service manager notifier (default: from the
            environment).
        @param installSignalHandlers: Whether C{SIGHUP} reloads (off in unit
            tests that run inside another process's signal setup).
        @param accessLogStream: Where C{access_log = -} writes (default: the
            process's standard output).

        @raise CertificateError: a certificate cannot be served.
        @raise edgeproxy.errors.ConfigError: the runtime cannot be built.
        """
        super().__init__()
        from edgeproxy.runtime import Runtime

        self.config = config
        self._reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier()
        self._installSignalHandlers = installSignalHandlers
        self._previousHangup: Any = None
        self._hangupInstalled = False
        self.exitCode = 0
        self.store: CertificateStore | None = None
        if config.tls is not None:
            self.store = CertificateStore(config.tls, reactor)
            self.store.load()
        self.accessLog = AccessLog.fromSettings(config.proxy, reactor, stdout=accessLogStream)
        self.runtime = Runtime.build(config, reactor)
        self.sites: list[Any] = []
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[list[IListeningPort]] = Deferred()
        self._listening: Deferred[list[IListeningPort]] | None = None
        self._stopping: Deferred[None] | None = None

    def currentRuntime(self) -> Any:
        """The runtime new requests are served from (the sites call this)."""
        return self.runtime

    # Start

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listenOrExit()

    def startService(self) -> None:
        super().startService()
        self._listenOrExit()

    def _installHangup(self) -> None:
        # Before READY=1: a manager may send SIGHUP as soon as it sees it,
        # and SIGHUP's default action would end the process.  Until the
        # reactor runs, callFromThread just queues the reload.
        if self._installSignalHandlers and not self._hangupInstalled:
            self._previousHangup = signal.signal(signal.SIGHUP, self._onHangup)
            self._hangupInstalled = True

    def _restoreHangup(self) -> None:
        if self._hangupInstalled:
            # None: the previous handler was not set from Python; the
            # default is the closest we can restore.
            previous = self._previousHangup
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            self._hangupInstalled = False

    def _listenOrExit(self) -> None:
        self._installHangup()
        try:
            self._listen()
        except StartupError as e:
            self._restoreHangup()
            # One clear line rather than a traceback through twistd: the
            # exception leaves privilegedStartService, twistd exits 1 before
            # the reactor runs, and READY=1 is never sent.
            log.critical("{message}; exiting", message=str(e))
            raise SystemExit(1) from e

    def _listen(self) -> None:
        if self._listening is not None:
            return
        from edgeproxy.http.site import EdgeSite

        # Said before READY=1, so that it is in the log once systemd (or a
        # test) sees the service started.
        self._warnAtStart()
        attempts: list[Deferred[IListeningPort]] = []
        for listener in self.config.listeners:
            site = EdgeSite(self.currentRuntime, listener, self._reactor, accessLog=self.accessLog)
            self.sites.append(site)
            attempts.append(self._listenOne(listener, site))
        self._listening = gatherResults(attempts, consumeErrors=True)
        failures: list[Failure] = []
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            # Bound synchronously, as tcp:, ssl:, unix: and systemd: all are.
            self._closePorts()
            raise StartupError(self._describeFailure(failures[0]))
        if not self._listening.called:
            self._listening.addErrback(self._failedLater)

    def _listenOne(self, listener: Listener, site: Any) -> Deferred[IListeningPort]:
        def attempt() -> Deferred[IListeningPort]:
            endpoint = serverFromString(self._reactor, listener.endpoint)
            if listener.tls:
                assert self.store is not None, "a TLS listener needs [tls]"
                protocols = DEFAULT_PROTOCOLS if listener.http2 else (b"http/1.1",)
                endpoint = wrapServerTLS(self.store.serverConnectionCreator(protocols), endpoint)
            return endpoint.listen(site)

        def keep(port: IListeningPort) -> IListeningPort:
            self.ports.append(port)
            return port

        def name(failure: Failure) -> Failure:
            failure.edgeListener = listener  # type: ignore[attr-defined]
            return failure

        return maybeDeferred(attempt).addCallbacks(keep, name)

    def _describeFailure(self, failure: Failure) -> str:
        listener = getattr(failure, "edgeListener", None)
        if listener is None and hasattr(failure.value, "subFailure"):
            failure = failure.value.subFailure
            listener = getattr(failure, "edgeListener", None)
        where = f"[listen:{listener.name}] endpoint {listener.endpoint!r}" if listener else "a listener"
        return f"{self.config.path}: {where}: cannot listen: {failure.getErrorMessage()}"

    def _listened(self, ports: list[IListeningPort]) -> list[IListeningPort]:
        for listener, port in zip(self.config.listeners, ports):
            host = port.getHost()
            log.info(
                "Listening on {address} for [listen:{name}] ({kind})",
                address=_formatAddress(host),
                name=listener.name,
                kind="https" if listener.tls else (
                    "http, redirecting to https" if listener.redirect_https else "http"),
            )
        self.notifier.ready(status=self._status())
        self.ready.callback(ports)
        return ports

    def _failedLater(self, failure: Failure) -> None:
        message = self._describeFailure(failure)
        log.critical("{message}; stopping", message=message)
        self.exitCode = 1
        self._closePorts()
        self.notifier.notify(STATUS=message, ERRNO=1)
        self.ready.errback(StartupError(message))
        self.ready.addErrback(lambda _: None)
        if self._reactor.running:
            # twistd exits 0 after a plain reactor.stop(); the exit status must
            # say the start failed (the unit's Restart= depends on it).
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()

    def _closePorts(self) -> None:
        for port in self.ports:
            port.stopListening()
        self.ports = []

    def _warnAtStart(self) -> None:
        for upstream in self.config.upstreams.values():
            if upstream.insecure:
                log.warn(
                    "[upstream:{name}] insecure = yes: backend certificates are NOT"
                    " verified; anyone on the path to {servers} can read and change"
                    " the traffic",
                    name=upstream.name,
                    servers=", ".join(s.address for s in upstream.servers),
                )
        if self.store is not None:
            self._logCertificates("Serving", self.store.current)

    def _status(self) -> str:
        names = [listener.name for listener in self.config.listeners]
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

    def _onHangup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes of the reactor
        # thread: hand the work to the loop through its waker.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Reload what can be reloaded: the certificates (same C{[tls]}
        settings, files read again) and the access log file.  Never raises.

        @return: whether the new certificates are served.
        """
        self.notifier.reloading()
        log.info("SIGHUP: reloading certificates")
        ok = True
        try:
            if self.store is not None:
                certificates = self.store.reload()
                self._logCertificates("Now serving", certificates)
        except CertificateError as e:
            ok = False
            log.error(
                "Certificate reload failed, still serving the previous certificates:"
                " {error}",
                file=e.file,
                error=str(e),
            )
        except Exception:
            ok = False
            log.failure("Certificate reload failed, still serving the previous certificates")
        try:
            if self.accessLog is not None:
                self.accessLog.reopen()
        except Exception:
            log.failure("Cannot reopen the access log, still writing to the old file")
        self.notifier.ready(status=self._status())
        return ok

    # Stop

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:
            return self._stopping
        self._restoreHangup()
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
            inflight=self._inflight(),
            timeout=timeout,
        )
        # No new connections from now on.
        await DeferredList([maybeDeferred(port.stopListening) for port in self.ports])
        self.ports = []
        deadline = reactor.seconds() + timeout
        for channel in self._channels():
            if channelBusy(channel):
                closeAfterResponse(channel)
        while True:
            remaining = []
            for channel in self._channels():
                if channelBusy(channel):
                    remaining.append(channel)
                else:
                    transport = _transportOf(channel)
                    if transport is not None and not getattr(transport, "disconnecting", False):
                        closeIdle(channel)
            if not remaining:
                break
            if reactor.seconds() >= deadline:
                log.warn(
                    "Shutdown timeout ({timeout}s) reached: aborting {count} connection(s)"
                    " with requests in flight",
                    timeout=timeout,
                    count=len(remaining),
                )
                for channel in remaining:
                    transport = _transportOf(channel)
                    if transport is not None:
                        transport.abortConnection()
                break
            await deferLater(reactor, min(DRAIN_POLL_INTERVAL, max(0.0, deadline - reactor.seconds())))
        await children
        try:
            await maybeDeferred(self.runtime.close)
        except Exception:
            log.failure("Closing the upstream pools failed")
        if self.accessLog is not None:
            self.accessLog.close()
        log.info("Stopped")

    def _channels(self) -> list[Any]:
        channels: list[Any] = []
        for site in self.sites:
            channels.extend(list(getattr(site, "channels", ())))
        return channels

    def _inflight(self) -> int:
        return sum(len(getattr(site, "inflight", ())) for site in self.sites)


def _formatAddress(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

