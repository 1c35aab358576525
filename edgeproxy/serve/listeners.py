# -*- test-case-name: tests.test_listeners,tests.test_service -*-
"""
The listening ports of one L{edgeproxy.serve.service.EdgeService}: one per
C{[listen:NAME]}, opened at start, opened, kept or closed to match the
configuration a reload brings (L{ListenerSet.apply}), closed at stop.

Owns the server side of a port: the TLS server factory a TLS listener
listens with (L{tlsServerFactory}) and the accepted TCP connection class,
both as the process's fast paths say (L{edgeproxy._compat.fastPaths}).  What a port serves, a listener's site, comes from the
service (L{edgeproxy.serve.sites.makeSite}); the sites of ports closed
while their connections still run are kept for the drain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from edgeproxy._compat import fastPaths
from edgeproxy._compat.twisted.tcp import acceptAsLeanServer
from edgeproxy._compat.twisted.tls import EdgeTLSTransport
from edgeproxy.config.model import Config, Listener
from edgeproxy.errors import StartupError
from edgeproxy.logs import formatAddress
from edgeproxy.security.listening import clientAuthFor, proxyProtocolFactory, securityShape
from edgeproxy.serve.sites import connectionsOf, inFlightOf, reconfigureSite
from edgeproxy.systemd import adoptable
from edgeproxy.tls.contexts import DEFAULT_PROTOCOLS
from edgeproxy.tls.store import CertificateStore

__all__ = ["AdminListener", "ListenerSet", "OpenListener", "tlsServerFactory"]

# The lines of the single-process service: see edgeproxy.serve.service.
log = Logger(namespace="edgeproxy.service")


class OpenListener:
    """One open C{[listen:NAME]}: its settings, site and port."""

    __slots__ = ("listener", "site", "port")

    def __init__(self, listener: Listener, site: Any, port: IListeningPort) -> None:
        self.listener = listener
        self.site = site
        self.port = port


def _shape(listener: Listener) -> tuple[Any, ...]:
    """What cannot change under an open port: a listener with another shape
    is closed and opened again."""
    return (listener.endpoint, listener.tls, listener.http2) + securityShape(listener)


class ListenerSet:
    """
    The open listeners, by name, and the sites of closed ones whose
    connections still run.

    @ivar byName: listener name -> its L{OpenListener}.
    @ivar sites: the site of each open listener, in configuration order.
    @ivar ports: their listening ports, in the same order.
    """

    def __init__(
        self,
        reactor: Any,
        config: Callable[[], Config],
        makeSite: Callable[[Listener], Any],
        store: Callable[[], CertificateStore | None],
    ) -> None:
        """
        @param reactor: what the endpoints listen with (and the TLS layer's
            clock).
        @param config: returns the configuration being served (its
            listeners' order, its path for messages).
        @param makeSite: builds the site a listener serves.
        @param store: returns the certificate store a TLS listener serves
            (there is one whenever a TLS listener is configured).
        """
        self._reactor = reactor
        self._config = config
        self._makeSite = makeSite
        self._store = store
        self.byName: dict[str, OpenListener] = {}
        self.sites: list[Any] = []
        self.ports: list[IListeningPort] = []
        # Sites of closed listeners whose connections still run: drained at
        # stop like the others.
        self._retiredSites: list[Any] = []

    # Opening -----------------------------------------------------------------

    def listenAll(self) -> Deferred[list[IListeningPort]]:
        """
        Open every listener of the configuration.

        @return: fires with the ports in configuration order, or fails with
            the failure of the first that could not listen (named for
            L{describeFailure}).
        """
        attempts = [
            self.listenOne(listener, self._makeSite(listener))
            for listener in self._config().listeners
        ]
        return gatherResults(attempts, consumeErrors=True)

    def listenOne(self, listener: Listener, site: Any) -> Deferred[IListeningPort]:
        """
        Open C{listener}'s port serving C{site}; once it listens it is one
        of L{byName}.  A failure carries the listener for L{describeFailure}.
        """

        def attempt() -> Deferred[IListeningPort]:
            endpoint: Any = adoptable(
                listener.endpoint, lambda: serverFromString(self._reactor, listener.endpoint)
            )
            factory: Any = site
            if listener.tls:
                store = self._store()
                assert store is not None, "a TLS listener needs [tls]"
                protocols = DEFAULT_PROTOCOLS if listener.http2 else (b"http/1.1",)
                factory = tlsServerFactory(
                    store.serverConnectionCreator(protocols, clientAuthFor(listener, site)),
                    site,
                    self._reactor,
                )
            if listener.proxy_protocol:
                # Under TLS: the header comes before the handshake.
                factory = proxyProtocolFactory(listener, factory, site, self._reactor)
            return endpoint.listen(factory)

        def keep(port: IListeningPort) -> IListeningPort:
            if fastPaths().tcp:
                acceptAsLeanServer(port)
            self.byName[listener.name] = OpenListener(listener, site, port)
            self._sync()
            return port

        def name(failure: Failure) -> Failure:
            failure.edgeListener = listener  # type: ignore[attr-defined]
            return failure

        return maybeDeferred(attempt).addCallbacks(keep, name)

    def describeFailure(self, failure: Failure) -> str:
        """The line that says which listener could not listen, and why."""
        listener = getattr(failure, "edgeListener", None)
        if listener is None and hasattr(failure.value, "subFailure"):
            failure = failure.value.subFailure
            listener = getattr(failure, "edgeListener", None)
        where = f"[listen:{listener.name}] endpoint {listener.endpoint!r}" if listener else "a listener"
        return f"{self._config().path}: {where}: cannot listen: {failure.getErrorMessage()}"

    def logListening(self, listener: Listener, port: IListeningPort) -> None:
        log.info(
            "Listening on {address} for [listen:{name}] ({kind})",
            address=formatAddress(port.getHost()),
            name=listener.name,
            kind="https" if listener.tls else (
                "http, redirecting to https" if listener.redirect_https else "http"),
        )

    def _sync(self) -> None:
        # sites and ports follow the configuration's order.
        order = [listener.name for listener in self._config().listeners]
        opened = sorted(
            self.byName.values(),
            key=lambda o: order.index(o.listener.name) if o.listener.name in order else len(order),
        )
        self.sites = [o.site for o in opened]
        self.ports = [o.port for o in opened]

    # Closing -----------------------------------------------------------------

    def closeAll(self) -> list[Deferred[Any]]:
        """
        Stop listening on every port (their connections carry on, and are
        drained with the others).

        @return: one Deferred per port, firing when it stopped.
        """
        stopped = [maybeDeferred(o.port.stopListening) for o in self.byName.values()]
        self._retiredSites.extend(o.site for o in self.byName.values())
        self.byName = {}
        self._sync()
        return stopped

    # Reload ------------------------------------------------------------------

    async def apply(self, config: Config) -> None:
        """
        Open, close or keep listeners so that they match C{config}.

        A listener with the same endpoint, C{tls} and C{http2} keeps its
        port and its connections; its site takes the new settings (limits,
        idle timeout, redirect) for new connections.  A listener removed is
        closed (its open connections carry on).  A listener added is
        opened.  A listener that changed is opened anew: on another endpoint
        the new port opens first and the old one is closed only when it
        did; on the same endpoint the old port must be closed first, and it
        is opened again if the new one cannot be.  A port that cannot be
        opened is logged and the rest of the configuration is served.
        """
        wanted = {listener.name: listener for listener in config.listeners}
        current = dict(self.byName)
        changed: list[tuple[OpenListener, Listener]] = []
        for name, opened in current.items():
            listener = wanted.get(name)
            if listener is not None and _shape(listener) == _shape(opened.listener):
                reconfigureSite(opened.site, listener)
                opened.listener = listener
            elif listener is not None:
                changed.append((opened, listener))
        removed = [opened for name, opened in current.items() if name not in wanted]
        added = [listener for name, listener in wanted.items() if name not in current]

        # Removed ports, and changed ones that must free their endpoint,
        # close first so that a listener renamed or changed in place can
        # bind again.
        sameEndpoint = [
            (opened, listener) for opened, listener in changed
            if opened.listener.endpoint == listener.endpoint
        ]
        closing = removed + [opened for opened, _ in sameEndpoint]
        await self._close(closing)
        for opened in removed:
            log.info("Closed [listen:{name}] (no longer configured)", name=opened.listener.name)

        for listener in added:
            await self._open(listener)
        for opened, listener in changed:
            ok = await self._open(listener)
            if opened.listener.endpoint != listener.endpoint:
                if ok:
                    await self._close([opened])
                else:
                    # The old port still listens: keep it, with its old
                    # shape, under its name.
                    self.byName[listener.name] = opened
                    log.warn(
                        "[listen:{name}] keeps listening on {endpoint} with its previous settings",
                        name=listener.name,
                        endpoint=opened.listener.endpoint,
                    )
            elif not ok:
                reopened = await self._open(opened.listener, quiet=True)
                log.warn(
                    "[listen:{name}] {what}",
                    name=listener.name,
                    what="listens again with its previous settings" if reopened
                    else "could not listen again with its previous settings either: closed",
                )
        self._sync()

    async def _close(self, listenings: list[OpenListener]) -> None:
        stopped = []
        for opened in listenings:
            if self.byName.get(opened.listener.name) is opened:
                del self.byName[opened.listener.name]
            self._retiredSites.append(opened.site)
            stopped.append(maybeDeferred(opened.port.stopListening))
        self._sync()
        if stopped:
            await DeferredList(stopped, consumeErrors=True)

    async def _open(self, listener: Listener, quiet: bool = False) -> bool:
        site = self._makeSite(listener)
        failures: list[Failure] = []
        # The errback sees the failure listenOne named (an await would
        # raise a new one without the name).
        port = await self.listenOne(listener, site).addErrback(failures.append)
        if failures:
            if not quiet:
                log.error(
                    "{message}; the rest of the configuration is served",
                    message=self.describeFailure(failures[0]),
                )
            return False
        assert port is not None  # None only from the errback, handled above
        self.logListening(listener, port)
        return True

    # Connections ---------------------------------------------------------------

    def allSites(self) -> list[Any]:
        """The sites of open listeners, and of closed ones whose connections
        still run."""
        return self.sites + [site for site in self._retiredSites if site not in self.sites]

    def connections(self) -> list[Any]:
        """Every open connection of L{allSites}."""
        channels: list[Any] = []
        # Forget closed listeners' sites once their last connection ended.
        self._retiredSites = [site for site in self._retiredSites if connectionsOf(site)]
        for site in self.allSites():
            channels.extend(connectionsOf(site))
        return channels

    def inFlight(self) -> int:
        """Requests in flight on every site of L{allSites}."""
        return sum(inFlightOf(site) for site in self.allSites())


class AdminListener:
    """
    The admin listener of C{[edgeproxy] admin} (L{edgeproxy.admin}), if
    configured: opened at start, where one that cannot listen stops the
    start like a listener; followed on reload; closed last at stop, so that
    C{/status} and C{/metrics} show the drain until it is over.

    @ivar port: its listening port, while it listens.
    """

    def __init__(self, service: Any, reactor: Any, config: Callable[[], Config]) -> None:
        """
        @param service: what the admin site shows and acts on.
        @param config: returns the configuration being served.
        """
        self._service = service
        self._reactor = reactor
        self._config = config
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._endpoint: str | None = None

    def start(self) -> None:
        """
        Listen on C{[edgeproxy] admin}, if set.

        @raise StartupError: it cannot listen.
        """
        description = self._config().proxy.admin
        if description is None or self._listening is not None:
            return
        from edgeproxy.admin.site import listenAdmin

        path = self._config().path
        failures: list[Failure] = []
        self._endpoint = description
        self._listening = listenAdmin(self._service, self._reactor, description)
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            raise StartupError(
                f"{path}: [edgeproxy] admin {description!r}: cannot listen:"
                f" {failures[0].getErrorMessage()}"
            )
        self._listening.addErrback(
            lambda failure: log.error(
                "{path}: [edgeproxy] admin {endpoint!r}: cannot listen: {why}",
                path=path, endpoint=description, why=failure.getErrorMessage(),
            )
        )

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("Admin listening on {address} (/status, /metrics)",
                 address=formatAddress(port.getHost()))
        return port

    async def stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)

    async def follow(self) -> None:
        """
        After a reload, follow a changed C{[edgeproxy] admin}: the old
        listener is closed first (the new one may want the same port), then
        the new one opened; one that cannot listen is logged and the proxy
        serves on without an admin listener.  The token needs nothing: it is
        read from the current configuration at each request.
        """
        config = self._config()
        wanted = config.proxy.admin
        if wanted == self._endpoint:
            return
        await self.stop()
        self._listening = None
        self._endpoint = None
        if wanted is None:
            log.info("Admin listener closed (no longer configured)")
            return
        from edgeproxy.admin.site import listenAdmin

        self._endpoint = wanted
        self._listening = listenAdmin(self._service, self._reactor, wanted)
        try:
            self._listened(await self._listening)
        except Exception:
            self._listening = None
            self._endpoint = None
            log.error(
                "{path}: [edgeproxy] admin {endpoint!r}: cannot listen: {why};"
                " serving on without an admin listener",
                path=config.path, endpoint=wanted, why=str(Failure().getErrorMessage()),
            )


def tlsServerFactory(creator: Any, site: Any, clock: Any) -> TLSMemoryBIOFactory:
    """
    What C{wrapServerTLS} listens with, built here so that the TLS layer's
    buffered writes are scheduled on the service's own reactor and, with
    the TLS fast paths on, so that every connection of the listener is an
    L{EdgeTLSTransport} from its first byte (not only once the store's
    creator has met the first one); without them, Twisted's own transport.
    """
    factory = TLSMemoryBIOFactory(creator, False, site, clock=clock)
    if fastPaths().tls:
        factory.protocol = EdgeTLSTransport
    return factory
