# -*- test-case-name: tests.test_runtime -*-
"""
L{Runtime}: the snapshot a request is served from.

A runtime is the configuration plus what is built from it for proxying: the
router, one L{UpstreamPool} per upstream (with its client TLS loaded) and
the stages of every route (L{edgeproxy.pipeline.stages}).
It is built whole (any bad certificate file raises before anything is
used) and replaced whole; a request keeps the runtime it started with.

A runtime built to replace another (whole-configuration reload) takes over
the previous runtime's pool of every upstream whose configuration did not
change: the same L{Upstream} value and the same bytes in the files its TLS
was loaded from (C{ca}, C{client_certificate} and its paired C{.key}).  Such
a pool is the same object, so its keep-alive connections, backend states,
health checker and counters carry on as if nothing happened.  Every other
pool is new, and the previous runtime's pools that were not taken over are
its I{retired} pools (L{Runtime.retiredFrom}), which the service stops and
closes once their requests are done.  The same goes for the HTTP cache's
stores (L{Runtime.cacheStores}): taken over when C{[cache]} did not change,
else retired (L{Runtime.retiredStoresFrom}) and closed once their writes
are done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

# The packages whose import registers their stage kinds (the pipeline
# knows them only by name, see edgeproxy.pipeline.stages.ORDER).
import edgeproxy.cache.kind  # noqa: F401  (cache)
import edgeproxy.content  # noqa: F401  (compress, images)
import edgeproxy.headers  # noqa: F401  (headers)
import edgeproxy.pipeline.redirect  # noqa: F401  (redirect)
import edgeproxy.security  # noqa: F401  (access, ratelimit, auth)
from edgeproxy.cache.kind import storesOf
from edgeproxy.cache.stores import CacheStores
from edgeproxy.config.model import Config, Upstream
from edgeproxy.headers.requestid import RequestIds
from edgeproxy.pipeline.stages import RoutePipeline, buildPipelines
from edgeproxy.routing import Router
from edgeproxy.tls.client import loadUpstreamTLS
from edgeproxy.tls.layout import pairedKeyPath
from edgeproxy.upstream.pool import UpstreamPool

log = Logger()

Fingerprint = tuple[Upstream, tuple[tuple[str, bytes | None], ...]]
"""What decides whether a pool can be carried over: the upstream's settings
and a digest of each file its TLS reads (L{None}: unreadable)."""


def upstreamFingerprint(upstream: Upstream) -> Fingerprint:
    """
    The settings of C{upstream} and a SHA-256 digest of every file its TLS
    is loaded from, so that a renewed client certificate or CA bundle under
    the same path counts as a change.

    Reads the files; never raises (an unreadable file gets L{None}, which
    compares unequal to any digest and, when equal to a previous L{None},
    still makes L{Runtime.build} load the file and report the problem).
    """
    paths: list[str] = []
    if upstream.tls:
        if upstream.ca is not None:
            paths.append(upstream.ca)
        if upstream.client_certificate is not None:
            paths.append(upstream.client_certificate)
            key = pairedKeyPath(upstream.client_certificate)
            if key is not None:
                paths.append(key)
    digests: list[tuple[str, bytes | None]] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                digests.append((path, hashlib.sha256(f.read()).digest()))
        except OSError:
            digests.append((path, None))
    return upstream, tuple(digests)


@dataclass(frozen=True)
class Runtime:
    """
    @ivar config: the configuration this runtime was built from.
    @ivar router: routes of C{config}.
    @ivar pools: upstream name -> pool.
    @ivar fingerprints: upstream name -> what its pool was built from (see
        L{upstreamFingerprint}).
    @ivar inherited: names of the pools taken over from the previous
        runtime (already started; L{start} leaves them alone).
    """

    config: Config
    router: Router
    pools: dict[str, UpstreamPool]
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    inherited: frozenset[str] = frozenset()
    pipelines: dict[str, RoutePipeline] = field(default_factory=dict)
    """Route name -> its stages (built from C{config} and C{pools} when not
    given)."""
    requestIds: RequestIds | None = field(default=None, init=False, compare=False)
    """What gives each request its ID (C{[edgeproxy] request_id}), or
    L{None} when it is C{off}."""

    def __post_init__(self) -> None:
        if not self.pipelines and self.config.routes:
            object.__setattr__(self, "pipelines", buildPipelines(self.config, self.pools))
        name = self.config.proxy.request_id
        if name is not None:
            object.__setattr__(self, "requestIds", RequestIds(name))

    @property
    def trustedProxies(self) -> tuple[Any, ...]:
        """The C{trusted_proxies} of the configuration."""
        return self.config.proxy.trusted_proxies

    @classmethod
    def build(
        cls,
        config: Config,
        reactor: Any,
        metrics: Any = None,
        activeChecks: bool = True,
        previous: Runtime | None = None,
    ) -> Runtime:
        """
        Build the router and every pool of C{config}, taking over the pools
        of C{previous} whose upstream did not change.  Nothing is started
        (see L{start}), and C{previous} is not touched: when this raises,
        it is still whole and still serving.

        @param metrics: the process's L{edgeproxy.metrics.Metrics}, handed
            to new pools.
        @param activeChecks: whether new pools run their active health
            checks (off in a worker whose supervisor checks for it).
        @param previous: the runtime being replaced, if any.
        @raise edgeproxy.errors.ConfigError: the routes cannot be built.
        @raise edgeproxy.errors.CertificateError: an upstream's C{ca} or
            C{client_certificate} cannot be loaded.
        """
        router = Router(config.routes)
        fingerprints = {
            name: upstreamFingerprint(upstream) for name, upstream in config.upstreams.items()
        }
        kept: dict[str, UpstreamPool] = {}
        if previous is not None:
            for name, fingerprint in fingerprints.items():
                pool = previous.pools.get(name)
                if (
                    pool is not None
                    and previous.fingerprints.get(name) == fingerprint
                    and None not in (digest for _, digest in fingerprint[1])
                ):
                    kept[name] = pool
        # Every file is loaded before any pool is made: a bad one raises
        # with nothing built.
        tls = {
            name: loadUpstreamTLS(upstream)
            for name, upstream in config.upstreams.items()
            if name not in kept
        }
        pools = {
            name: kept[name]
            if name in kept
            else UpstreamPool(
                reactor, upstream, tls[name], metrics=metrics, activeChecks=activeChecks
            )
            for name, upstream in config.upstreams.items()
        }
        return cls(
            config=config,
            router=router,
            pools=pools,
            fingerprints=fingerprints,
            inherited=frozenset(kept),
            pipelines=buildPipelines(
                config,
                pools,
                previous.pipelines if previous is not None else None,
                context={"reactor": reactor, "metrics": metrics},
            ),
        )

    def start(self) -> None:
        """
        Start what runs in the background in the pools this runtime made
        (health checks, re-resolution); inherited pools run already.
        """
        for name, pool in self.pools.items():
            if name in self.inherited:
                continue
            try:
                pool.start()
            except Exception:
                # One pool's checker must not keep the others from starting.
                log.failure("Starting upstream {upstream} failed", upstream=name)

    def retiredFrom(self, previous: Runtime) -> list[UpstreamPool]:
        """
        The pools of C{previous} that this runtime did not take over: what
        the service stops and closes after a reload.
        """
        mine = {id(pool) for pool in self.pools.values()}
        return [pool for pool in previous.pools.values() if id(pool) not in mine]

    @property
    def cacheStores(self) -> CacheStores | None:
        """The HTTP cache's stores, when a route caches."""
        return storesOf(self.pipelines)

    def retiredStoresFrom(self, previous: Runtime) -> list[CacheStores]:
        """
        The cache stores of C{previous} that this runtime did not take
        over: what the service closes after a reload, once their writes
        are done.
        """
        old = previous.cacheStores
        return [] if old is None or old is self.cacheStores else [old]

    def stop(self) -> None:
        """Stop the background work of every pool (see L{stopPool})."""
        for pool in self.pools.values():
            stopPool(pool)

    def close(self) -> Deferred[Any]:
        """
        Close the idle backend connections of every pool.
        """
        return DeferredList(
            [pool.close() for pool in self.pools.values()], consumeErrors=True
        )


def stopPool(pool: UpstreamPool) -> None:
    """
    Stop a pool's health checks and re-resolution, if it runs any; never
    raises (a pool that fails to stop is logged, the rest carry on).
    """
    try:
        pool.stop()
    except Exception:
        log.failure("Stopping upstream {upstream} failed", upstream=pool.upstream.name)


def poolInFlight(pool: UpstreamPool) -> int:
    """
    Requests a pool has in flight: sent (or queued) and whose response body
    is not delivered yet.  A retired pool is closed when this reaches 0.
    """
    return pool.inFlight()
