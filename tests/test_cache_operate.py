"""
Tests for L{edgeproxy.cache.operate}: the purge API (its query, the
bearer token, the answer), purges made from control messages and relayed
between workers, and the C{cache} of C{/status} combined over workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.cache.entry import Entry
from edgeproxy.cache.freshness import Policy
from edgeproxy.cache.operate import combineStatus, parsePurge, purgeHere, relayFromWorker, statusOf
from edgeproxy.config.stagemodel import CacheSettings
from edgeproxy.h1.fields import Fields
from tests.test_admin import TOKEN, Admin


@pytest.mark.parametrize(
    "query, kind, value, soft",
    [
        ({"url": ["https://A.example/x?y=1"]}, "url", b"https://a.example/x?y=1", False),
        ({"url": ["https://a.example/x"], "soft": ["1"]}, "url", b"https://a.example/x", True),
        ({"prefix": ["https://a.example"]}, "prefix", b"https://a.example/", False),
        ({"tag": ["product-42"], "soft": ["0"]}, "tag", b"product-42", False),
    ],
)
def test_parsePurge(query: dict[str, list[str]], kind: str, value: bytes, soft: bool) -> None:
    purge = parsePurge(query)
    assert (purge.kind, purge.value, purge.soft) == (kind, value, soft)


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"url": ["https://a.example/"], "tag": ["x"]},
        {"url": ["https://a.example/", "https://b.example/"]},
        {"url": ["a.example/x"]},
        {"tag": ["two tags"]},
        {"tag": ["x"], "soft": ["maybe"]},
        {"tag": ["x"], "force": ["1"]},
    ],
)
def test_parsePurgeRefused(query: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError):
        parsePurge(query)


def entry(key: bytes, tags: tuple[bytes, ...] = ()) -> Entry:
    return Entry(key=key, url=key, status=200, reason=b"OK", fields=Fields(), length=2, responseTime=0.0,
                 initialAge=0.0, policy=Policy(60.0), tags=tags, body=b"hi")


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path, cache=CacheSettings(disk=str(tmp_path / "cache")))


def fill(admin: Admin) -> Any:
    stores = admin.service.currentRuntime().pipelines["app"].byKind["cache"].stores
    for key, tags in ((b"https://a.example/1", (b"red",)), (b"https://a.example/2", (b"blue",))):
        stores.memory.put(entry(key, tags))
        writer = stores.disk.writer(entry(key, tags)._replace(length=-1, body=None))
        writer.write(b"hi")
        writer.finish(entry(key, tags)._replace(body=None))
    return stores


def test_adminPurgeByTag(admin: Admin) -> None:
    stores = fill(admin)
    code, _, body = admin.ask(
        "POST", "/cache/purge?tag=red", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert code == 200
    assert json.loads(body) == {"purged": 2, "memory": 1, "disk": 1, "soft": False}
    assert stores.lookup(b"https://a.example/1") is None
    assert stores.lookup(b"https://a.example/2") is not None
    assert admin.service.metrics.cache.purges["tag"] == 1


def test_adminSoftPurgeByPrefix(admin: Admin) -> None:
    stores = fill(admin)
    code, _, body = admin.ask(
        "POST", "/cache/purge?prefix=https%3A%2F%2Fa.example%2F&soft=1", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert code == 200 and json.loads(body)["purged"] == 4
    assert stores.lookup(b"https://a.example/1").policy.lifetime == 0.0


@pytest.mark.parametrize(
    "path, headers, code",
    [
        ("/cache/purge?tag=red", {}, 401),
        ("/cache/purge?tag=red", {"Authorization": "Bearer wrong-token-0123456789"}, 401),
        ("/cache/purge?colour=red", {"Authorization": f"Bearer {TOKEN}"}, 400),
        ("/cache/purge?url=nota%20url", {"Authorization": f"Bearer {TOKEN}"}, 400),
    ],
)
def test_adminPurgeRefused(admin: Admin, path: str, headers: dict[str, str], code: int) -> None:
    stores = fill(admin)
    assert admin.ask("POST", path, headers)[0] == code
    assert stores.lookup(b"https://a.example/1") is not None


def test_adminPurgeIsAPost(admin: Admin) -> None:
    assert admin.ask("GET", "/cache/purge?tag=red")[0] == 405


def test_statusShowsTheTiers(admin: Admin) -> None:
    fill(admin)
    code, _, body = admin.ask("GET", "/status")
    cache = json.loads(body)["cache"]
    assert cache["name"] == "edgeproxy"
    assert cache["memory"]["objects"] == 2 and cache["disk"]["objects"] == 2
    assert cache["disk"]["path"].endswith("cache")


def test_purgeHereFromAControlMessage(admin: Admin) -> None:
    stores = fill(admin)
    counts = purgeHere(
        admin.service.currentRuntime(),
        {"kind": "url", "value": "https://a.example/2", "soft": False, "tiers": ["memory"]},
    )
    assert counts == {"memory": 1}
    assert stores.memory.get(b"https://a.example/2") is None
    assert stores.disk.get(b"https://a.example/2") is not None
    assert purgeHere(admin.service.currentRuntime(), {"kind": "nonsense"}) == {}


class Worker:
    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def test_relayFromWorker() -> None:
    sender, other, starting = Worker(), Worker(), Worker(ready=False)

    class Supervisor:
        workers = {1: sender, 2: other, 3: starting}

    relayFromWorker(Supervisor(), sender, {"op": "cache-purged", "kind": "url", "value": "https://a/x", "soft": False})
    assert sender.sent == [] and starting.sent == []
    assert other.sent == [
        {"op": "cache-purge", "kind": "url", "value": "https://a/x", "soft": False, "tiers": ["memory"]}
    ]


def test_combineStatus() -> None:
    own = {"name": "edge", "memory": {"bytes": 0, "capacity": 10, "objects": 0, "lookups": 0, "hits": 0,
                                      "hit_ratio": None},
           "disk": {"path": "/c", "bytes": 500, "capacity": 1000, "objects": 5, "lookups": 0, "hits": 0,
                    "hit_ratio": None},
           "collapsing": 0}
    worker = {"name": "edge", "memory": {"bytes": 100, "capacity": 10, "objects": 2, "lookups": 10, "hits": 5,
                                         "hit_ratio": 0.5},
              "disk": {"path": "/c", "bytes": 499, "capacity": 1000, "objects": 4, "lookups": 5, "hits": 1,
                       "hit_ratio": 0.2},
              "collapsing": 1}
    combined = combineStatus(own, [worker, worker, None])
    assert combined is not None
    assert combined["memory"]["bytes"] == 200 and combined["memory"]["hit_ratio"] == 0.5
    assert combined["disk"]["bytes"] == 500 and combined["disk"]["lookups"] == 10
    assert combined["disk"]["hit_ratio"] == 0.2
    assert combined["collapsing"] == 2
    assert combineStatus(None, [None]) is None


def test_statusOfARuntimeWithoutCache(tmp_path: Path) -> None:
    plain = Admin(tmp_path)
    assert statusOf(plain.service.currentRuntime()) is None
    assert json.loads(plain.ask("GET", "/status")[2])["cache"] is None
