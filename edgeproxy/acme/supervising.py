"""
ACME in a supervisor of C{workers = N}: the one process that talks to the
CA.  L{WorkersACME} starts the manager once every worker is ready, sends
the pending challenges to every worker (and waits until each confirmed it
applied them, so the CA is told to validate only when any worker can
answer), names the certificates to serve after every swap, hands a new
worker both with its initial state, and answers the workers' on-demand
questions.  The messages are in L{edgeproxy.workers}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList

from edgeproxy.workers import answer

__all__ = ["WorkersACME", "SYNC_TIMEOUT"]

SYNC_TIMEOUT = 2.0
"""Seconds a worker has to confirm it applied the pending challenges."""


class WorkersACME:
    def __init__(self, supervisor: Any) -> None:
        """
        @param supervisor: the L{edgeproxy.serve.supervisor.Supervisor}
            (its C{workers}, C{ready}, C{store}, C{acme}, C{challenges},
            C{onDemand}).
        """
        self._supervisor = supervisor
        manager = supervisor.acme
        manager.onChallenges = self.sendChallenges
        supervisor.store.listeners.append(lambda _: self.sendCertificates())
        # Orders start once every worker can answer a challenge.
        manager.disownServiceParent()
        supervisor.ready.addCallback(lambda _: None if manager.running else manager.startService())
        supervisor.ready.addErrback(lambda _: None)

    def stop(self) -> None:
        manager = self._supervisor.acme
        if manager.running:
            manager.stopService()

    def initialState(self) -> list[dict[str, Any]]:
        """What a starting worker reads before it serves."""
        return [
            {"op": "acme-challenges", **self._supervisor.challenges.snapshot()},
            {"op": "acme-certificates", "names": self._managedNames()},
        ]

    def _managedNames(self) -> list[str]:
        states = self._supervisor.acme.states
        return [name for name, state in states.items() if state.entry is not None]

    def sendChallenges(self) -> Deferred[None]:
        message = {"op": "acme-challenges", **self._supervisor.challenges.snapshot()}
        confirmations = []
        for worker in self._supervisor.workers.values():
            # Starting ones too: they read it when their reactor runs.
            worker.send(message)
            confirmations.append(worker.channel.ask("acme-sync", SYNC_TIMEOUT))
        done: Deferred[None] = Deferred()
        DeferredList(confirmations, consumeErrors=True).addBoth(lambda _: done.callback(None))
        return done

    def sendCertificates(self) -> None:
        message = {"op": "acme-certificates", "names": self._managedNames()}
        for worker in self._supervisor.workers.values():
            worker.send(message)

    def demand(self, worker: Any, message: dict[str, Any]) -> None:
        """A worker's handshake waits for an on-demand certificate."""
        onDemand = self._supervisor.onDemand
        name = str(message.get("name") or "")
        waiting = onDemand.wait(name) if onDemand is not None else None
        if waiting is None:
            worker.send(answer(message))
            return
        # The certificates (sent to every worker at the swap) precede this
        # answer on the channel.
        waiting.addBoth(lambda _: worker.send(answer(message)))
