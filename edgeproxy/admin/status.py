# -*- test-case-name: tests.test_admin -*-
"""
What an operator sees of the live proxy: L{statusDocument} (the C{GET
/status} document, a documented API: C{docs/operations.rst}, "Admin API")
and L{stateSamples} (the gauges of L{edgeproxy.metrics} read at scrape
time from the same objects, so C{/status} and C{/metrics} cannot
disagree).

Both builders read the service through a few attributes only
(C{config}, C{currentRuntime()}, C{sites}, C{ports}, C{store},
C{startedAt}), so the workers' supervisor can call them on its own view.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

import edgeproxy
from edgeproxy.metrics import StateSample
from edgeproxy.logs import formatAddress
from edgeproxy.upstream.backend import Backend, BackendState

__all__ = ["backendStatus", "stateSamples", "statusDocument"]


def _inFlight(pool: Any, backend: Backend) -> int:
    counter = getattr(pool, "inFlight", None)
    if counter is None:
        counter = pool.balancer.inFlight
    try:
        return int(counter(backend))
    except KeyError:
        # Removed by a re-resolution between listing and counting.
        return 0


def _available(pool: Any, backend: Backend) -> bool:
    # The balancer's predicate: it knows whether an unknown backend may take
    # requests (only while none of the upstream is up).
    balancer = getattr(pool, "balancer", None)
    if balancer is not None:
        return bool(balancer.isAvailable(backend))
    return backend.isAvailable()


def backendStatus(pool: Any, backend: Backend) -> dict[str, Any]:
    """One backend's entry in C{/status} (and the answer to an action)."""
    check = backend.lastCheck
    return {
        "address": backend.address,
        "server": backend.server.address,
        "state": backend.state.value,
        "reason": backend.reason or None,
        "available": _available(pool, backend),
        "weight": backend.weight,
        "effective_weight": round(float(backend.effectiveWeight()), 3),
        "backup": backend.backup,
        "max_conns": backend.server.max_conns,
        "in_flight": _inFlight(pool, backend),
        "ejected_until": backend.ejectedUntil,
        "ejections": backend.ejections,
        "last_check": None if check is None else {
            "ok": check.ok,
            "at": check.at,
            "detail": check.detail,
            "duration": check.duration,
        },
    }


def upstreamStatus(pool: Any) -> dict[str, Any]:
    """One upstream's entry in C{/status}."""
    upstream = pool.upstream
    return {
        "balance": upstream.balance,
        "health_checks": upstream.health_path is not None,
        "backends": [backendStatus(pool, backend) for backend in pool.backends],
    }


def _portOf(service: Any, site: Any, index: int) -> Any:
    sites = list(getattr(service, "sites", ()))
    ports = list(getattr(service, "ports", ()))
    for port in ports:
        factory = getattr(port, "factory", None)
        # A TLS listener's port serves the TLSMemoryBIOFactory wrapping the site.
        if factory is site or getattr(factory, "wrappedFactory", None) is site:
            return port
    # Ports that do not say what they serve: the service keeps them in the
    # order of its sites.
    if len(ports) == len(sites):
        return ports[index]
    return None


def listenerStatus(service: Any) -> list[dict[str, Any]]:
    """The C{listeners} of C{/status}: one per listener site."""
    listeners = []
    for index, site in enumerate(getattr(service, "sites", ())):
        listener = site.listener
        port = _portOf(service, site, index)
        listeners.append({
            "name": listener.name,
            "endpoint": listener.endpoint,
            "tls": listener.tls,
            "address": None if port is None else formatAddress(port.getHost()),
            "connections": len(site.channels),
            "in_flight": len(site.inflight),
        })
    return listeners


def _isoUTC(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificateStatus(store: Any, now: float, acme: Any = None) -> list[dict[str, Any]]:
    """
    The C{certificates} of C{/status}: every certificate served, with where
    it came from (C{file} or C{acme}), its issuer, its renewal (ACME) and
    its OCSP staple.
    """
    if store is None:
        return []
    stapler = getattr(store, "ocsp", None)
    documents = []
    for entry in store.current.entries:
        document: dict[str, Any] = {
            "names": list(entry.names),
            "file": entry.path,
            "source": getattr(entry, "source", "file"),
            "issuer": entry.certificate.issuer.rfc4514_string(),
            "default": entry.isDefault,
            "not_after": _isoUTC(entry.notAfter),
            "not_after_timestamp": entry.notAfter.timestamp(),
            "expires_in_days": round(entry.secondsLeft(now) / 86400.0, 2),
            "next_renewal": None,
            "last_error": None,
            "ocsp": None if stapler is None else stapler.status(entry, now),
        }
        state = None if acme is None else acme.statusFor(entry)
        if state is not None:
            document["next_renewal"] = state["next_renewal"]
            document["last_error"] = state["last_error"]
        documents.append(document)
    return documents


def acmeStatus(acme: Any) -> dict[str, Any] | None:
    """The C{acme} of C{/status}: the directory and every managed name."""
    if acme is None:
        return None
    return {
        "directory": acme.settings.directory,
        "storage": acme.settings.storage,
        "names": [state.status() for state in acme.states.values()],
    }


def statusDocument(service: Any, now: float | None = None) -> dict[str, Any]:
    """
    The C{GET /status} document of C{service} (an
    L{edgeproxy.serve.service.EdgeService} or anything with the same attributes),
    built from the live objects.  Its shape is documented in
    C{docs/operations.rst} ("Admin API").

    @param now: POSIX time for the certificates' C{expires_in_days}
        (default: the wall clock).
    """
    if now is None:
        now = time.time()
    runtime = service.currentRuntime()
    return {
        "version": edgeproxy.__version__,
        "pid": os.getpid(),
        "started": getattr(service, "startedAt", None),
        "workers": service.config.proxy.workers,
        "listeners": listenerStatus(service),
        "certificates": certificateStatus(getattr(service, "store", None), now, getattr(service, "acme", None)),
        "acme": acmeStatus(getattr(service, "acme", None)),
        "upstreams": {name: upstreamStatus(pool) for name, pool in runtime.pools.items()},
        "cache": _cacheStatus(runtime),
    }


def _cacheStatus(runtime: Any) -> dict[str, Any] | None:
    from edgeproxy.cache.operate import statusOf

    return statusOf(runtime)


# The scrape-time gauges -------------------------------------------------


def stateSamples(service: Any) -> Iterator[StateSample]:
    """
    The gauges of the live state, for L{edgeproxy.metrics.Metrics.setStateSource}
    (names without the C{edgeproxy_} prefix).
    """
    yield ("info", "Always 1; the version in a label.", {"version": edgeproxy.__version__}, 1.0)
    started = getattr(service, "startedAt", None)
    if started is not None:
        yield ("start_time_seconds", "POSIX time the proxy started.", {}, float(started))
    for site in getattr(service, "sites", ()):
        labels = {"listener": site.listener.name}
        yield ("connections_active", "Open client connections, by listener.",
               labels, float(len(site.channels)))
        yield ("requests_in_flight", "Requests received and not yet answered, by listener.",
               labels, float(len(site.inflight)))
    for name, pool in service.currentRuntime().pools.items():
        for backend in pool.backends:
            labels = {"upstream": name, "backend": backend.address}
            for state in BackendState:
                yield (
                    "backend_state",
                    "1 for the state a backend is in, 0 for the others.",
                    {**labels, "state": state.value},
                    1.0 if backend.state is state else 0.0,
                )
            yield ("backend_in_flight", "Requests in flight to a backend.",
                   labels, float(_inFlight(pool, backend)))
            yield ("backend_ejected", "1 while passive health keeps a backend ejected.",
                   labels, 0.0 if backend.ejectedUntil is None else 1.0)
    from edgeproxy.cache.operate import samples as cacheSamples

    yield from cacheSamples(service.currentRuntime())
    store = getattr(service, "store", None)
    if store is not None:
        for entry in store.current.entries:
            for certificateName in entry.names:
                yield (
                    "certificate_expiry_timestamp_seconds",
                    "POSIX time a served certificate expires, by name and file.",
                    {"name": certificateName, "file": entry.path},
                    entry.notAfter.timestamp(),
                )
