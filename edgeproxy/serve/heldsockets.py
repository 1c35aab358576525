# -*- test-case-name: tests.test_workers -*-
"""
The listening sockets of a supervisor (L{edgeproxy.serve.supervisor}):
one per C{[listen:NAME]}, opened once as a single process would open it
(or adopted from systemd), never read from: the workers inherit them at
file descriptors 3, 4, ... and accept on them, and the kernel spreads the
connections.  Also the admin listener, which only the supervisor runs.

A reload closes the sockets of listeners removed and opens those of
listeners added or moved; running workers cannot inherit a new socket, so
the supervisor replaces them (L{HeldSockets.reload} says when).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.model import Config, Listener
from edgeproxy.errors import StartupError
from edgeproxy.logs import formatAddress
from edgeproxy.systemd import adoptable

__all__ = ["HeldSockets"]

# The supervisor's lines: see edgeproxy.serve.supervisor.
log = Logger(namespace="edgeproxy.supervisor")


class _NoConnections(Factory):
    """The factory of the supervisor's own copies of the listening ports,
    which never accept (the workers do)."""

    noisy = False

    def logPrefix(self) -> str:
        # Twisted logs "<prefix> starting on <port>" for every port.
        return "supervisor (for the workers)"

    def buildProtocol(self, addr: Any) -> None:
        return None


class HeldSockets:
    """
    @ivar ports: listener name -> the supervisor's own listening port, in
        the order they are handed over.
    @ivar adminPort: the admin listener's port, while it listens.
    """

    def __init__(self, reactor: Any, config: Callable[[], Config], service: Any) -> None:
        """
        @param config: returns the configuration being served.
        @param service: what the admin site shows and acts on (the
            supervisor).
        """
        self._reactor = reactor
        self._config = config
        self._service = service
        self.ports: dict[str, Any] = {}
        self.adminPort: Any = None

    def inherited(self) -> list[tuple[str, int]]:
        """(listener name, the supervisor's fd) in the order handed over."""
        return [(name, port.fileno()) for name, port in self.ports.items()]

    # Start ---------------------------------------------------------------------

    def openAll(self) -> None:
        """
        Listen on every listener's endpoint (see L{openOne}) and on the
        admin listener's; if one cannot, close the others and raise.

        @raise StartupError: a listener cannot listen.
        """
        try:
            for listener in self._config().listeners:
                self.ports[listener.name] = self.openOne(listener)
            self.openAdmin()
        except StartupError:
            for port in self.ports.values():
                port.stopListening()
            self.ports = {}
            raise

    def openOne(self, listener: Listener) -> Any:
        """
        Listen on C{listener}'s endpoint, as a single process would, then
        stop reading from the port: the socket stays open for the workers
        to inherit, and the kernel queues connections for them.

        @raise StartupError: it cannot listen.
        """
        config = self._config()
        failures: list[Failure] = []
        ports: list[Any] = []
        try:
            endpoint: Any = adoptable(
                listener.endpoint, lambda: serverFromString(self._reactor, listener.endpoint)
            )
            maybeDeferred(endpoint.listen, _NoConnections()).addCallbacks(ports.append, failures.append)
        except Exception:
            failures.append(Failure())
        if failures or not ports:
            why = failures[0].getErrorMessage() if failures else "listen() did not complete"
            raise StartupError(
                f"{config.path}: [listen:{listener.name}] endpoint "
                f"{listener.endpoint!r}: cannot listen: {why}"
            )
        port = ports[0]
        port.stopReading()
        log.info(
            "Listening on {address} for [listen:{name}] (served by {count} workers)",
            address=formatAddress(port.getHost()),
            name=listener.name,
            count=config.proxy.workers,
        )
        return port

    def openAdmin(self) -> None:
        """
        The admin listener, in this process only (never in a worker).  One
        that cannot listen closes nothing else: at start L{openAll} stops
        everything, after a reload the workers serve on without it.

        @raise StartupError: it cannot listen.
        """
        config = self._config()
        endpoint = config.proxy.admin
        if endpoint is None or self.adminPort is not None:
            return
        from edgeproxy.admin.site import listenAdmin

        failures: list[Failure] = []
        ports: list[Any] = []
        listenAdmin(self._service, self._reactor, endpoint).addCallbacks(ports.append, failures.append)
        if failures or not ports:
            # Bound synchronously, as tcp:, unix: and systemd: all are.
            why = failures[0].getErrorMessage() if failures else "listen() did not complete"
            raise StartupError(
                f"{config.path}: [edgeproxy] admin {endpoint!r}: cannot listen: {why}"
            )
        self.adminPort = ports[0]
        log.info("Admin listener on {address}", address=formatAddress(self.adminPort.getHost()))

    # Reload --------------------------------------------------------------------

    def reload(self, old: Config, new: Config) -> bool:
        """
        Close the sockets of listeners C{new} removed, open those of
        listeners it added or moved (a listener that cannot listen is
        logged; one that moved keeps its old socket), follow a changed
        admin listener.

        @return: whether a socket was opened, which running workers cannot
            inherit.
        """
        opened = False
        before = {listener.name: listener for listener in old.listeners}
        after = {listener.name: listener for listener in new.listeners}
        for name in before:
            if name not in after and name in self.ports:
                self.ports.pop(name).stopListening()
                log.info("Closed [listen:{name}] (no longer configured)", name=name)
        for name, listener in after.items():
            previous = before.get(name)
            if previous is not None and previous.endpoint == listener.endpoint and name in self.ports:
                continue
            try:
                port = self.openOne(listener)
            except StartupError as e:
                # As in a single process: the rest of the configuration is
                # served; a listener that moved keeps its old socket.
                log.error("{message}; the rest of the configuration is served", message=str(e))
                continue
            replaced = self.ports.pop(name, None)
            if replaced is not None:
                replaced.stopListening()
            self.ports[name] = port
            opened = True
        if old.proxy.admin != new.proxy.admin:
            self._reopenAdmin()
        return opened

    def _reopenAdmin(self) -> None:
        port, self.adminPort = self.adminPort, None
        if port is not None:
            port.stopListening()
        try:
            self.openAdmin()
        except StartupError as e:
            log.error("{message}; no admin listener", message=str(e))

    # Stop ----------------------------------------------------------------------

    async def closeAll(self) -> None:
        """
        Close the supervisor's copies of the sockets (the kernel refuses
        connections once the last worker closed its own) and the admin
        listener.
        """
        listening = list(self.ports.values())
        if self.adminPort is not None:
            listening.append(self.adminPort)
            self.adminPort = None
        await DeferredList([maybeDeferred(port.stopListening) for port in listening])
        self.ports = {}
