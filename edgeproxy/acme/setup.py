"""
How a process puts the ACME and OCSP pieces together: one function per
kind of process, so that L{edgeproxy.service} and L{edgeproxy.supervisor}
each call one line.

  - a single process (and a supervisor) orders: an L{ACMEManager} child
    service, its L{ChallengeStore}, and L{OnDemand} when configured;
  - a worker of a supervisor orders nothing: its challenge store and its
    managed certificates are filled from the control channel
    (L{edgeproxy.worker}).

In every process with TLS, the challenge store feeds the TLS store's
TLS-ALPN-01 contexts, and OCSP stapling (C{[tls] ocsp_stapling}) follows
every certificate swap.
"""

from __future__ import annotations

from typing import Any

from edgeproxy.config.model import Config

__all__ = ["setUpACME", "setUpOCSP"]


def setUpOCSP(store: Any, config: Config, reactor: Any) -> None:
    """Staple OCSP responses for the store's certificates (if enabled)."""
    if store is None or config.tls is None or not config.tls.ocsp_stapling:
        return
    from edgeproxy.tls.ocsp import OCSPStapler, treqFetch

    stapler = OCSPStapler(reactor, treqFetch(reactor))
    store.ocsp = stapler
    store.listeners.append(lambda certificates: stapler.update(certificates.entries))
    stapler.update(store.current.entries)


def setUpACME(
    service: Any, config: Config, reactor: Any, metrics: Any, orderCertificates: bool
) -> tuple[Any, Any, Any]:
    """
    @param service: the process's service (a C{MultiService}); the manager
        becomes its child.
    @return: (the challenge store, the manager, the on-demand gate), each
        L{None} when not used.
    """
    store = getattr(service, "store", None)
    setUpOCSP(store, config, reactor)
    if config.acme is None or store is None:
        return None, None, None
    from edgeproxy.acme.challenges import ChallengeStore

    challenges = ChallengeStore()
    challenges.listeners.append(lambda: store.setChallenges(challenges.tlsALPN01Challenges))
    if not orderCertificates:
        return challenges, None, None
    from edgeproxy.acme.manager import ACMEManager

    manager = ACMEManager(config, store, challenges, reactor, metrics)
    manager.setServiceParent(service)
    onDemand = None
    if config.acme.on_demand:
        from edgeproxy.acme.ondemand import OnDemand

        onDemand = OnDemand(config.acme, manager, reactor)
        store.onDemand = onDemand.wait
    return challenges, manager, onDemand
