"""
How a process puts the ACME and OCSP pieces together: one function per
kind of process, so that L{edgeproxy.serve.service} and L{edgeproxy.serve.supervisor}
each call one line.

  - a single process (and a supervisor) orders: an L{ACMEManager} child
    service, its L{ChallengeStore}, and its L{OnDemand} gate, which
    follows C{on_demand} and its keys at every reload
    (L{onDemandGate});
  - a worker of a supervisor orders nothing: its challenge store and its
    managed certificates are filled from the control channel
    (L{edgeproxy.worker}).

In every process with TLS, the challenge store feeds the TLS store's
TLS-ALPN-01 contexts, and OCSP stapling (C{[tls] ocsp_stapling}) follows
every certificate swap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeproxy.config.acmemodel import ACMESettings
from edgeproxy.config.model import Config

if TYPE_CHECKING:
    from edgeproxy.acme.manager import ACMEManager
    from edgeproxy.acme.ondemand import Ask, OnDemand

__all__ = ["onDemandGate", "setUpACME", "setUpOCSP"]


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
    return challenges, manager, onDemandGate(manager, store, reactor)


def onDemandGate(manager: ACMEManager, store: Any, reactor: Any, ask: Ask | None = None) -> OnDemand:
    """
    The on-demand gate (L{edgeproxy.acme.ondemand.OnDemand}) of the
    process whose C{manager} orders, made whether C{on_demand} is on or
    not: the store's handshakes wait for it only while C{on_demand} is on,
    and it follows C{on_demand}, C{ask}, C{on_demand_burst} and
    C{on_demand_interval} at every reload.

    @param ask: how the C{ask} service is asked (default: HTTP, with treq).
    """
    from edgeproxy.acme.ondemand import OnDemand

    gate = OnDemand(manager.settings, manager, reactor, ask)

    def follow(settings: ACMESettings) -> None:
        gate.reconfigure(settings)
        # Without the hook, handshakes are not held at all (no ClientHello
        # read before OpenSSL's).
        store.onDemand = gate.wait if settings.on_demand else None

    follow(manager.settings)
    manager.settingsListeners.append(follow)
    return gate
