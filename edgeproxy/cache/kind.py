# -*- test-case-name: tests.test_cache_kind -*-
"""
The C{cache} stage kind (L{edgeproxy.pipeline.stages}): a L{CacheStage}
for every route with C{cache = yes}, all of a runtime's sharing one
L{CacheStores}.

The stores are made once per runtime, for its first route that caches,
and kept in the build's shared context; a runtime replacing another takes
the previous one's stores over when C{[cache]} is the same (its memory
tier, the open disk tier, the fetches in flight).  A changed C{[cache]}
makes new stores, which take the open disk tier over when C{disk} is the
same path; a changed C{disk} path opens the new directory and leaves the
old one as it is.  The stores a runtime no longer uses are closed by the
service that retires it (L{edgeproxy.runtime.Runtime.retiredStoresFrom});
those of a build that failed, by L{CacheKind.abandon}.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any, cast

from edgeproxy.cache.blocking import InlineBlocking, ThreadBlocking
from edgeproxy.cache.stage import CacheStage
from edgeproxy.cache.stores import CacheStores
from edgeproxy.config.model import Config, Route
from edgeproxy.config.stagemodel import CacheSettings
from edgeproxy.errors import ConfigError
from edgeproxy.pipeline.call import Stage
from edgeproxy.pipeline.stages import registerKind

__all__ = ["STORES", "CacheKind", "storesOf"]

STORES = "cache.stores"
"""Where a build's shared context keeps the runtime's stores."""


def storesOf(pipelines: Mapping[str, Any] | None) -> CacheStores | None:
    """The cache stores of a runtime's pipelines (route name -> its
    L{edgeproxy.pipeline.stages.RoutePipeline}), if a route caches."""
    for pipeline in (pipelines or {}).values():
        stage = pipeline.byKind.get("cache")
        if isinstance(stage, CacheStage):
            return stage.stores
    return None


class CacheKind:
    """Builds the cache stage of each route (see the module docstring)."""

    name = "cache"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if route.cache is None:
            return None
        settings = config.cache or CacheSettings()
        shared = cast(dict[str, Any], context)
        stores = shared.get(STORES)
        clock = context.get("reactor")
        if clock is None:
            # A runtime made without Runtime.build (tests of other parts).
            from twisted.internet import reactor as clock
        if stores is None:
            old = storesOf(context.get("previous"))
            if isinstance(previous, CacheStage) and old is None:
                old = previous.stores
            if old is not None and old.settings == settings:
                stores = old
            else:
                metrics = context.get("metrics")
                blocking = context.get("blocking")
                if blocking is None:
                    # A memory reactor (tests) has no threads: its disk work
                    # runs inline.
                    blocking = ThreadBlocking(clock) if hasattr(clock, "getThreadPool") else InlineBlocking()
                try:
                    stores = CacheStores(
                        settings, clock, blocking, counters=None if metrics is None else metrics.cache,
                        previous=old,
                    )
                except (OSError, sqlite3.Error) as e:
                    file, line = (None, None) if config.source is None else config.source.where("cache", "disk")
                    raise ConfigError(
                        f"cannot open the cache directory {settings.disk}: {e}",
                        file=file or config.path, section="cache", key="disk", line=line,
                    ) from None
            shared[STORES] = stores
        return CacheStage(route, settings, stores, clock)

    def abandon(self, context: Mapping[str, Any]) -> None:
        """A build that made stores failed: close them (unless they are
        the previous runtime's, handed over)."""
        stores = context.get(STORES)
        if stores is not None and stores is not storesOf(context.get("previous")):
            stores.close()


registerKind(CacheKind())
