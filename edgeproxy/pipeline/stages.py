# -*- test-case-name: tests.test_pipeline -*-
"""
The stages of each route, in their fixed order, built from the
configuration.

Order of the stage kinds (a request passes them left to right, its answer
comes back right to left through the ones that asked to see it):

    redirects, access rules, rate limits, authentication, header rules,
    cache, compression, image optimisation, forward

so that nobody is let in, counted or authenticated by a stage that a later
one could bypass, the cache stores what compression and image optimisation
made of a response (one variant each), and the last stage is always the one
that talks to the upstream pool.  A route configures only some of them; a
route with none configured is L{Forward} alone, which costs nothing beyond
the forwarding itself.

The stages of a route are built at start and on every reload (with the
runtime); what a stage keeps across requests (a cache store, rate-limit
counters, a Redis client) is handed over from the previous runtime's stage
of the same route when its settings did not change (L{StageKind.build}'s
C{previous}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from edgeproxy.config.model import Config, Route
from edgeproxy.pipeline.call import Stage
from edgeproxy.pipeline.forward import Forward

__all__ = ["ORDER", "RoutePipeline", "StageKind", "buildPipelines"]

ORDER = (
    "redirect",
    "access",
    "ratelimit",
    "auth",
    "headers",
    "cache",
    "compress",
    "images",
    "forward",
)
"""The stage kinds, in the order a request meets them."""


class StageKind(Protocol):
    """How one kind of stage is made from the configuration."""

    name: str
    """One of L{ORDER}."""

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        """
        The stage of this kind for C{route}, or L{None} when the route does
        not use it.

        @param context: what the runtime built that stages may use (the
            upstream pools under C{"pools"}, the runtime being replaced's
            pipelines under C{"previous"}, C{"reactor"} and C{"metrics"}
            when built by L{edgeproxy.runtime.Runtime.build}...); one dict
            for every route of the build, in which a kind may keep what
            all its stages share (under a key of its own).
        @param previous: this kind's stage of the same route in the
            runtime being replaced, to take its state over when the
            settings are the same.

        A kind that keeps in C{context} what must be let go of (open
        files) also has C{abandon(context)}, called when the build fails.
        """


class RoutePipeline:
    """
    The stages of one route, first to last (the last is L{Forward}, or on
    a redirect route the redirect alone).

    @ivar idleTimeout: seconds a body of this route may go without a byte
        (its upstream's C{idle_timeout}).
    @ivar quietPaths: the paths whose query carries a credential (the
        C{credentialPaths} of the stages that have them: an OpenID Connect
        callback's code): the request's target is recorded without its
        query from the start, whichever stage answers it.
    """

    __slots__ = ("stages", "idleTimeout", "byKind", "quietPaths")

    def __init__(self, stages: tuple[tuple[str, Stage], ...], idleTimeout: float) -> None:
        self.stages = tuple(stage for _, stage in stages)
        self.byKind = dict(stages)
        self.idleTimeout = idleTimeout
        self.quietPaths: frozenset[bytes] = frozenset().union(
            *(getattr(stage, "credentialPaths", ()) for stage in self.stages)
        )


_KINDS: dict[str, StageKind] = {}
"""The kinds other than C{forward} that are built, by name."""


def registerKind(kind: StageKind) -> None:
    """Make stages of C{kind} part of every route that configures it."""
    if kind.name not in ORDER or kind.name == "forward":
        raise ValueError(f"unknown stage kind {kind.name!r}")
    _KINDS[kind.name] = kind


def buildPipelines(
    config: Config,
    pools: Mapping[str, Any],
    previous: Mapping[str, RoutePipeline] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, RoutePipeline]:
    """
    The pipeline of every route of C{config}.

    @param pools: upstream name to its pool (in the runtime being built).
    @param previous: the pipelines of the runtime being replaced.
    """
    shared = {"pools": pools, "previous": previous or {}, **(context or {})}
    try:
        return _build(config, pools, previous, shared)
    except BaseException:
        for kind in _KINDS.values():
            abandon = getattr(kind, "abandon", None)
            if abandon is not None:
                abandon(shared)
        raise


def _build(
    config: Config,
    pools: Mapping[str, Any],
    previous: Mapping[str, RoutePipeline] | None,
    shared: dict[str, Any],
) -> dict[str, RoutePipeline]:
    pipelines = {}
    for route in config.routes:
        before = previous.get(route.name) if previous else None
        stages: list[tuple[str, Stage]] = []
        for name in ORDER[:-1]:
            kind = _KINDS.get(name)
            if kind is None:
                continue
            stage = kind.build(
                route, config, shared, before.byKind.get(name) if before is not None else None
            )
            if stage is not None:
                stages.append((name, stage))
        if route.upstream is None:
            # A redirect route: its redirect stage answers every request.
            pipelines[route.name] = RoutePipeline(tuple(stages), 0.0)
            continue
        pool = pools[route.upstream]
        stages.append(("forward", Forward(route, pool, config.proxy)))
        pipelines[route.name] = RoutePipeline(tuple(stages), pool.upstream.idle_timeout)
    return pipelines

