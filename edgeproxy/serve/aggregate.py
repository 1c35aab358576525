# -*- test-case-name: tests.test_workers -*-
"""
What the admin listener of a supervisor shows: the instance, made of the
supervisor's own state and what every worker answers over its control
channel (L{edgeproxy.workers}) within L{ASK_TIMEOUT}.

  - L{aggregateMetrics}: C{GET /metrics}, every worker's series summed with
    the supervisor's own (L{NOT_SUMMED} are taken from one process);
  - L{aggregateStatus}: C{GET /status}, the supervisor's document
    (L{edgeproxy.admin.status.statusDocument}) completed by L{combineStatus}.

A worker that does not answer in time is left out, and the answer says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList

from edgeproxy.config.model import Config
from edgeproxy.metrics import Metrics
from edgeproxy.logs import formatAddress
from edgeproxy.workers import NoAnswer, labelled, mergeExpositions

__all__ = ["ASK_TIMEOUT", "NOT_SUMMED", "aggregateMetrics", "aggregateStatus", "askAll", "combineStatus"]


class Supervised(Protocol):
    """What this module reads of an L{edgeproxy.serve.supervisor.Supervisor}."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ports(self) -> Mapping[str, Any]:
        """Listener name -> the supervisor's own listening port."""

    @property
    def workers(self) -> Mapping[int, Any]:
        """Slot number -> the running L{edgeproxy.serve.workerprocess.WorkerProcess}."""

    @property
    def count(self) -> int: ...

    def currentRuntime(self) -> Any: ...


ASK_TIMEOUT = 1.0
"""Seconds a worker has to answer a C{status} or C{metrics} question of the
admin listener; a worker that does not is left out, and the answer says so."""

NOT_SUMMED = frozenset({
    # The supervisor decides backend states (and counts their changes);
    # the workers only mirror them.
    "edgeproxy_backend_state",
    "edgeproxy_backend_transitions",
    # One per process, or the same in every process.
    "edgeproxy_info",
    "edgeproxy_start_time_seconds",
    "edgeproxy_certificate_expiry_timestamp_seconds",
    "edgeproxy_reloads",
    "edgeproxy_config_last_reload_success",
    "edgeproxy_config_last_reload_success_timestamp_seconds",
    # The disk tier of the cache is one, shared by every process.
    "edgeproxy_cache_disk_bytes",
    "edgeproxy_cache_disk_objects",
})
"""Families of C{/metrics} taken from one process (the supervisor, else the
first worker that has them) instead of summed; see
L{edgeproxy.workers.mergeExpositions}."""


def askAll(supervisor: Supervised, op: str) -> Deferred[tuple[dict[int, dict[str, Any]], list[int]]]:
    """
    Ask every worker; fires with (worker number -> answer, numbers of
    the workers that did not answer within L{ASK_TIMEOUT}).
    """
    numbers = list(range(1, supervisor.count + 1))
    questions = []
    for number in numbers:
        worker = supervisor.workers.get(number)
        if worker is None or not worker.ready:
            questions.append(_failed(NoAnswer(f"worker {number} is not running")))
        else:
            questions.append(worker.channel.ask(op, ASK_TIMEOUT))

    def collect(results: list[tuple[bool, Any]]) -> tuple[dict[int, dict[str, Any]], list[int]]:
        answers: dict[int, dict[str, Any]] = {}
        missing: list[int] = []
        for number, (ok, result) in zip(numbers, results):
            if ok:
                answers[number] = result
            else:
                missing.append(number)
        return answers, missing

    return DeferredList(questions, consumeErrors=True).addCallback(collect)


def aggregateMetrics(supervisor: Supervised) -> Deferred[bytes]:
    """
    C{GET /metrics} of the instance: every worker's series summed with
    the supervisor's own (see L{NOT_SUMMED}), and a comment line naming
    the workers that did not answer in time.
    """

    def merge(result: tuple[dict[int, dict[str, Any]], list[int]]) -> bytes:
        answers, missing = result
        # process_* is per process: labelled with who it is, never summed.
        texts = [
            labelled(str(a.get("text", "")), "process_", "worker", str(number))
            for number, a in sorted(answers.items())
        ]
        own = labelled(supervisor.metrics.exposition(), "process_", "worker", "supervisor")
        merged = mergeExpositions(own, texts, NOT_SUMMED)
        header = f"# edgeproxy: {len(answers)} of {supervisor.count} workers answered".encode()
        if missing:
            header += b"; missing: " + ", ".join(f"worker {n}" for n in missing).encode()
        return header + b"\n" + merged

    return askAll(supervisor, "metrics").addCallback(merge)


def aggregateStatus(supervisor: Supervised, now: float | None = None) -> Deferred[dict[str, Any]]:
    """
    C{GET /status} of the instance: the supervisor's backend states
    with the workers' requests in flight summed in, the listeners with
    the workers' connections, and one entry per worker process
    (C{worker_processes}; C{workers_missing} lists those that did not
    answer in time).
    """
    from edgeproxy.admin.status import statusDocument

    def build(result: tuple[dict[int, dict[str, Any]], list[int]]) -> dict[str, Any]:
        answers, missing = result
        document = statusDocument(supervisor, now)
        return combineStatus(document, supervisor, answers, missing)

    return askAll(supervisor, "status").addCallback(build)


def _failed(error: Exception) -> Deferred[Any]:
    failed: Deferred[Any] = Deferred()
    failed.errback(error)
    return failed


def combineStatus(
    document: dict[str, Any],
    supervisor: Supervised,
    answers: dict[int, dict[str, Any]],
    missing: list[int],
) -> dict[str, Any]:
    """
    Complete the supervisor's C{/status} C{document} with what the
    workers answered (see L{aggregateStatus}).
    """
    statuses = {number: answer.get("status") or {} for number, answer in answers.items()}
    listeners = []
    for listener in supervisor.config.listeners:
        port = supervisor.ports.get(listener.name)
        listeners.append({
            "name": listener.name,
            "endpoint": listener.endpoint,
            "tls": listener.tls,
            "address": None if port is None else formatAddress(port.getHost()),
            "connections": sum(int(s.get("connections", {}).get(listener.name, 0)) for s in statuses.values()),
            "in_flight": sum(int(s.get("listeners_in_flight", {}).get(listener.name, 0)) for s in statuses.values()),
        })
    document["listeners"] = listeners
    for name, upstream in document.get("upstreams", {}).items():
        for entry in upstream.get("backends", []):
            entry["in_flight"] = sum(
                int(s.get("backends", {}).get(name, {}).get(entry["address"], 0))
                for s in statuses.values()
            )
    processes = []
    for number in range(1, supervisor.count + 1):
        worker = supervisor.workers.get(number)
        status = statuses.get(number)
        processes.append({
            "worker": number,
            "pid": None if worker is None else worker.pid,
            "ready": bool(worker is not None and worker.ready),
            "answered": status is not None,
            "connections": None if status is None else sum(status.get("connections", {}).values()),
            "in_flight": None if status is None else status.get("in_flight"),
        })
    document["worker_processes"] = processes
    document["workers_missing"] = sorted(missing)
    from edgeproxy.cache.operate import combineStatus as combineCache

    document["cache"] = combineCache(document.get("cache"), [s.get("cache") for s in statuses.values()])
    return document
