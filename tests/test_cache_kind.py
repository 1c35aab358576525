"""
Tests for L{edgeproxy.cache.kind}: one cache stage per route with
C{cache = yes}, one set of stores per runtime, handed over by a reload
when C{[cache]} is unchanged, new (in a new directory, the old one left
alone) when it changed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.kind import storesOf
from edgeproxy.cache.stage import CacheStage
from edgeproxy.config.model import Config, ProxySettings, Route, Server, Upstream
from edgeproxy.config.stagemodel import CacheSettings, RouteCache
from edgeproxy.errors import ConfigError
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.forward import Forward
from edgeproxy.pipeline.stages import buildPipelines
from tests.memorypool import MemoryPool

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 80),))


def config(cache: CacheSettings | None, routes: tuple[Route, ...] | None = None) -> Config:
    return Config(
        path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(), upstreams={"app": UPSTREAM},
        routes=routes or (
            Route(name="a", hosts=("a.example",), paths=("/",), upstream="app", cache=RouteCache()),
            Route(name="b", hosts=("b.example",), paths=("/",), upstream="app",
                  cache=RouteCache(stale_if_error=60.0)),
            Route(name="plain", hosts=("c.example",), paths=("/",), upstream="app"),
        ),
        cache=cache,
    )


def build(made: Config, previous: object = None, metrics: Metrics | None = None) -> dict[str, object]:
    return buildPipelines(  # type: ignore[return-value]
        made, {"app": MemoryPool(UPSTREAM)}, previous,  # type: ignore[arg-type]
        context={"reactor": MemoryReactorClock(), "blocking": InlineBlocking(), "metrics": metrics or Metrics()},
    )


def test_aStagePerCachedRouteSharingTheStores(tmp_path: Path) -> None:
    pipelines = build(config(CacheSettings(disk=str(tmp_path / "c"))))
    a, b, plain = (pipelines[name] for name in ("a", "b", "plain"))
    assert [type(stage) for stage in a.stages] == [CacheStage, Forward]  # type: ignore[attr-defined]
    assert [type(stage) for stage in plain.stages] == [Forward]  # type: ignore[attr-defined]
    assert a.byKind["cache"].stores is b.byKind["cache"].stores  # type: ignore[attr-defined]
    assert b.byKind["cache"].staleIfError == 60.0  # type: ignore[attr-defined]


def test_withoutACacheSectionTheDefaults() -> None:
    stores = storesOf(build(config(None)))  # type: ignore[arg-type]
    assert stores is not None and stores.settings == CacheSettings()
    assert stores.memory is not None and stores.disk is None


def test_noRouteCachesNoStores() -> None:
    plain = (Route(name="plain", hosts=("c.example",), paths=("/",), upstream="app"),)
    assert storesOf(build(config(CacheSettings(), plain))) is None  # type: ignore[arg-type]


def test_reloadKeepsTheStoresWhenTheSectionIsUnchanged(tmp_path: Path) -> None:
    settings = CacheSettings(disk=str(tmp_path / "c"))
    first = build(config(settings))
    stores = storesOf(first)  # type: ignore[arg-type]
    # Route settings may change; a route may come or go.
    routes = (Route(name="new", hosts=("n.example",), paths=("/",), upstream="app",
                    cache=RouteCache(default_ttl=5.0)),)
    second = build(config(settings, routes), first)
    assert storesOf(second) is stores  # type: ignore[arg-type]
    assert second["new"].byKind["cache"].rules.defaultTTL == 5.0  # type: ignore[attr-defined]


def test_changedSectionNewStoresOldDirectoryLeft(tmp_path: Path) -> None:
    old = tmp_path / "old"
    first = build(config(CacheSettings(disk=str(old))))
    before = storesOf(first)  # type: ignore[arg-type]
    bigger = build(config(CacheSettings(disk=str(old), memory=2**30)), first)
    assert storesOf(bigger) is not before  # type: ignore[arg-type]
    moved = build(config(CacheSettings(disk=str(tmp_path / "new"))), bigger)
    stores = storesOf(moved)  # type: ignore[arg-type]
    assert stores is not None and stores.disk is not None
    assert stores.disk.directory == str(tmp_path / "new")
    assert os.path.exists(old / "index.sqlite")


def test_anUnusableDirectoryIsAConfigError(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as raised:
        build(config(CacheSettings(disk=str(blocker / "cache"))))
    assert raised.value.section == "cache" and raised.value.key == "disk"


def test_countersArePerProcess() -> None:
    metrics = Metrics()
    first = build(config(CacheSettings()), metrics=metrics)
    second = build(config(dataclasses.replace(CacheSettings(), memory=2**20)), first, metrics=metrics)
    assert storesOf(first).counters is storesOf(second).counters is metrics.cache  # type: ignore[union-attr, arg-type]
