# -*- test-case-name: tests.test_pool -*-
"""
L{Runtime}: the snapshot a request is served from.

A runtime is the configuration plus what is built from it for proxying: the
router and one L{UpstreamPool} per upstream (with its client TLS loaded).
It is built whole (any bad certificate file raises before anything is
used) and replaced whole; a request keeps the runtime it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList

from edgeproxy.config.model import Config
from edgeproxy.routing import Router
from edgeproxy.tls.client import loadUpstreamTLS
from edgeproxy.upstream.pool import UpstreamPool


@dataclass(frozen=True)
class Runtime:
    """
    @ivar config: the configuration this runtime was built from.
    @ivar router: routes of C{config}.
    @ivar pools: upstream name -> pool.
    """

    config: Config
    router: Router
    pools: dict[str, UpstreamPool]

    @classmethod
    def build(cls, config: Config, reactor: Any) -> Runtime:
        """
        Build every pool of C{config}.

        @raise edgeproxy.errors.CertificateError: an upstream's C{ca} or
            C{client_certificate} cannot be loaded.
        """
        tls = {name: loadUpstreamTLS(upstream) for name, upstream in config.upstreams.items()}
        pools = {
            name: UpstreamPool(reactor, upstream, tls[name])
            for name, upstream in config.upstreams.items()
        }
        return cls(config=config, router=Router(config.routes), pools=pools)

    def close(self) -> Deferred[Any]:
        """
        Close the idle backend connections of every pool.
        """
        return DeferredList(
            [pool.close() for pool in self.pools.values()], consumeErrors=True
        )
