# -*- test-case-name: tests.test_cache_operate -*-
"""
What operators see of the cache and do to it: the C{cache} of C{/status}
(L{statusOf}, L{combineStatus} for a supervisor), its gauges for
C{/metrics} (L{samples}), and purges (L{adminPurge} for C{POST
/cache/purge}, L{purgeHere} for the control channel).

With C{workers = N} a purge reaches every process: the admin listener lives
in the supervisor, which purges the disk tier (shared) once and asks every
worker to purge its memory tier; a C{PURGE} request served by a worker, and
an invalidation after an unsafe method (RFC 9111 4.4), purge both tiers
there and are relayed (L{setRelay}: the worker's control channel) through
the supervisor to the other workers' memory tiers.  The messages
(C{cache-purge}, C{cache-purged}) are in L{edgeproxy.workers}.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from edgeproxy.cache.key import purgeURL
from edgeproxy.cache.kind import storesOf
from edgeproxy.cache.stores import PURGE_KINDS, CacheStores, relay, setRelay

__all__ = [
    "PurgeRequest",
    "adminPurge",
    "combineStatus",
    "parsePurge",
    "purgeHere",
    "relay",
    "relayFromWorker",
    "samples",
    "setRelay",
    "statusOf",
]

log = Logger()

ASK_TIMEOUT = 2.0
"""Seconds a worker has to answer a purge."""

def cacheStores(runtime: Any) -> CacheStores | None:
    return storesOf(getattr(runtime, "pipelines", None))


# /status and /metrics ---------------------------------------------------------


def statusOf(runtime: Any) -> dict[str, Any] | None:
    """The C{cache} of C{/status}, or L{None} when no route caches."""
    stores = cacheStores(runtime)
    return None if stores is None else stores.status()


def combineStatus(own: dict[str, Any] | None, workers: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """
    The C{cache} of a supervisor's C{/status}: the memory tiers of the
    workers summed, the disk tier as the index counts it (the
    supervisor's own view) with the workers' lookups summed.
    """
    answered = [status for status in workers if status]
    if own is None and not answered:
        return None
    document: dict[str, Any] = dict(own or answered[0])
    memories = [status["memory"] for status in answered if status.get("memory")]
    if memories:
        memory = {
            "bytes": sum(m["bytes"] for m in memories),
            "capacity": sum(m["capacity"] for m in memories),
            "objects": sum(m["objects"] for m in memories),
            "lookups": sum(m["lookups"] for m in memories),
            "hits": sum(m["hits"] for m in memories),
        }
        memory["hit_ratio"] = _ratio(memory["hits"], memory["lookups"])
        document["memory"] = memory
    disks = [status["disk"] for status in answered if status.get("disk")]
    if disks and document.get("disk"):
        disk = dict(document["disk"])
        disk["lookups"] = sum(d["lookups"] for d in disks)
        disk["hits"] = sum(d["hits"] for d in disks)
        disk["hit_ratio"] = _ratio(disk["hits"], disk["lookups"])
        document["disk"] = disk
    document["collapsing"] = sum(int(status.get("collapsing", 0)) for status in answered)
    return document


def _ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def samples(runtime: Any) -> Iterator[tuple[str, str, dict[str, str], float]]:
    """The cache's gauges (L{edgeproxy.metrics.StateSample}s)."""
    stores = cacheStores(runtime)
    if stores is None:
        return
    memory = stores.memory
    if memory is not None:
        yield ("cache_memory_bytes", "Bytes held by the cache's memory tier.", {}, float(memory.bytes))
        yield ("cache_memory_objects", "Objects in the cache's memory tier.", {}, float(len(memory)))
    disk = stores.disk
    if disk is not None:
        size, objects = disk.totals()
        yield ("cache_disk_bytes", "Bytes held by the cache's disk tier (shared by the workers).", {}, float(size))
        yield ("cache_disk_objects", "Objects in the cache's disk tier (shared by the workers).", {}, float(objects))


# Purging ------------------------------------------------------------------------


class PurgeRequest:
    """One purge: C{kind} (C{url}, C{prefix}, C{tag}), its value as the
    stores compare it, and whether it only marks stale (C{soft})."""

    __slots__ = ("kind", "soft", "value")

    def __init__(self, kind: str, value: bytes, soft: bool) -> None:
        self.kind = kind
        self.value = value
        self.soft = soft

    def message(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value.decode("latin-1"), "soft": self.soft}


def parsePurge(arguments: Mapping[str, list[str]]) -> PurgeRequest:
    """
    The purge the admin API's query asks for: exactly one of C{url=},
    C{prefix=}, C{tag=}, and C{soft=1} to mark stale instead.

    @raise ValueError: anything else (the message says what).
    """
    given = [kind for kind in PURGE_KINDS if arguments.get(kind)]
    unknown = sorted(set(arguments) - set(PURGE_KINDS) - {"soft"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (url, prefix, tag, soft)")
    if len(given) != 1 or len(arguments[given[0]]) != 1:
        raise ValueError("give exactly one of url=URL, prefix=URL or tag=TAG")
    kind = given[0]
    text = arguments[kind][0]
    softText = (arguments.get("soft") or ["0"])[-1].lower()
    if softText not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"soft: expected 1 or 0, got {softText!r}")
    soft = softText in ("1", "true", "yes")
    if kind == "tag":
        value = text.strip().encode("utf-8")
        if not value or b" " in value or b"," in value:
            raise ValueError(f"expected one tag, got {text!r}")
    else:
        value = purgeURL(text, prefix=kind == "prefix")
    return PurgeRequest(kind, value, soft)


def purgeHere(runtime: Any, message: Mapping[str, Any]) -> dict[str, int]:
    """
    Make a purge described by a control message (C{kind}, C{value},
    C{soft}, C{tiers}) in this process's stores.

    @return: tier -> entries affected (C{{}} without a cache).
    """
    stores = cacheStores(runtime)
    kind = message.get("kind")
    if stores is None or kind not in PURGE_KINDS:
        return {}
    tiers = tuple(message.get("tiers") or ("memory", "disk"))
    return stores.purge(str(kind), str(message.get("value", "")).encode("latin-1"), bool(message.get("soft")), tiers)


def adminPurge(service: Any, purge: PurgeRequest) -> Deferred[dict[str, Any]]:
    """
    C{POST /cache/purge}: the purge in every process of the instance.

    @return: fires with the answer's document: C{purged} (stored copies
        affected: a response in a worker's memory and on disk counts once
        in each), and the count of each tier.
    """
    runtime = service.currentRuntime()
    stores = cacheStores(runtime)
    if stores is not None:
        stores.counters.purges[purge.kind] += 1
    workers = getattr(service, "workers", None)
    if workers is None or not hasattr(service, "count"):
        counts = {} if stores is None else stores.purge(purge.kind, purge.value, purge.soft)
        return succeed(_document(purge, counts.get("memory", 0), counts.get("disk", 0), []))
    # A supervisor: the shared disk tier here, once; the memory tiers in
    # each worker.
    own = {} if stores is None else stores.purge(purge.kind, purge.value, purge.soft, ("disk",))
    numbers = list(range(1, service.count + 1))
    questions = []
    for number in numbers:
        worker = workers.get(number)
        if worker is None or not worker.ready:
            failed: Deferred[Any] = Deferred()
            failed.errback(RuntimeError(f"worker {number} is not running"))
            questions.append(failed)
        else:
            questions.append(
                worker.channel.ask("cache-purge", ASK_TIMEOUT, tiers=["memory"], **purge.message())
            )

    def collect(results: list[tuple[bool, Any]]) -> dict[str, Any]:
        memory = 0
        missing = []
        for number, (ok, result) in zip(numbers, results):
            if ok:
                memory += sum(int(v) for v in (result.get("counts") or {}).values())
            else:
                missing.append(number)
        return _document(purge, memory, own.get("disk", 0), missing)

    return DeferredList(questions, consumeErrors=True).addCallback(collect)


def _document(purge: PurgeRequest, memory: int, disk: int, missing: list[int]) -> dict[str, Any]:
    log.info(
        "cache purge {kind} {value}{soft}: {memory} in memory, {disk} on disk",
        kind=purge.kind,
        value=purge.value.decode("latin-1"),
        soft=" (soft)" if purge.soft else "",
        memory=memory,
        disk=disk,
    )
    document: dict[str, Any] = {
        "purged": memory + disk,
        "memory": memory,
        "disk": disk,
        "soft": purge.soft,
    }
    if missing:
        document["workers_missing"] = missing
    return document


def relayFromWorker(supervisor: Any, sender: Any, message: Mapping[str, Any]) -> None:
    """
    A worker purged something itself (a C{PURGE} request, an
    invalidation): the other workers purge their memory tiers too (the
    disk tier is shared).
    """
    forward = {
        "op": "cache-purge",
        "kind": message.get("kind"),
        "value": message.get("value"),
        "soft": bool(message.get("soft")),
        "tiers": ["memory"],
    }
    for worker in supervisor.workers.values():
        if worker is not sender and worker.ready:
            worker.send(forward)
