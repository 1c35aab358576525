# -*- test-case-name: tests.test_workers -*-
"""
What the supervisor (L{edgeproxy.serve.supervisor}) and its worker processes
(L{edgeproxy.worker}) share: the control channel between them, the
configuration a worker serves, and the merging of the workers' metrics.

The control channel is one pipe in each direction carrying JSON objects,
one per line (UTF-8, C{\\n}-terminated; JSON escapes every control
character, so a line is always one message).  Every message has an C{"op"}:

  supervisor to worker:
    - C{{"op": "verdict", "upstream", "address", "state", "reason"}}: a
      backend state decided by the supervisor's health checks or an admin
      action; the worker applies it to its own pool;
    - C{{"op": "status", "id"}} and C{{"op": "metrics", "id"}}: questions,
      answered with the same C{op} and C{id};
    - C{{"op": "acme-challenges", "http01": [...], "tlsalpn01": [...]}}: the
      pending ACME challenges, all of them (the worker's challenge store
      takes exactly these; L{edgeproxy.acme.challenges.ChallengeStore.snapshot}),
      followed by the question C{{"op": "acme-sync", "id"}}, answered once
      they are applied;
    - C{{"op": "acme-certificates", "names": [...]}}: the names whose ACME
      certificates are served now; the worker reads from C{[acme] storage}
      (in a thread) those whose files changed, validates them as files
      are, and swaps them in (L{edgeproxy.acme.worker.CertificateFollower});
    - C{{"op": "cache-purge", "kind", "value", "soft", "tiers", "id"?}}: purge
      the cache (L{edgeproxy.cache.operate}); answered with C{"counts"} when
      it has an C{id} (an admin purge), not when it relays a worker's.
  worker to supervisor:
    - C{{"op": "notify", "fields": {...}}}: what a single process would
      send to systemd (C{READY=1}, C{RELOADING=1}, C{STOPPING=1},
      C{STATUS=...}); only the supervisor talks to systemd;
    - the answers: C{{"op": "status", "id", "status": {...}}} and
      C{{"op": "metrics", "id", "text": "..."}};
    - C{{"op": "acme-demand", "id", "name"}}: a handshake for C{name} waits
      for an on-demand certificate; answered when the attempt is over;
    - C{{"op": "cache-purged", "kind", "value", "soft"}}: a C{PURGE} request
      or an invalidation (RFC 9111 4.4) purged this in the worker; the
      supervisor has the others purge their memory tiers.

A line that is not a JSON object with a known C{op} is logged and
ignored: neither side ever dies of what the other one wrote.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.internet.protocol import Protocol

from edgeproxy.config.model import Config

__all__ = [
    "ControlChannel",
    "NoAnswer",
    "answer",
    "FAMILY_DOMAINS",
    "labelled",
    "mergeExpositions",
    "systemdEndpoint",
    "workerConfig",
]

log = Logger()

FAMILY_DOMAINS: Mapping[int, str] = {
    socket.AF_INET: "INET",
    socket.AF_INET6: "INET6",
    socket.AF_UNIX: "UNIX",
}
"""Address family of a listening socket -> C{domain=} of a C{systemd:}
endpoint description."""


def systemdEndpoint(family: int, name: str) -> str:
    """
    The description that adopts the inherited socket C{name} of address
    family C{family} (what a worker listens on instead of the configured
    endpoint).  Listener names are letters, digits, C{_}, C{.} and C{-}, so
    nothing needs escaping.
    """
    return f"systemd:domain={FAMILY_DOMAINS[family]}:name={name}"


def workerConfig(config: Config, families: Mapping[str, int]) -> Config:
    """
    The configuration a worker serves: C{config} with the endpoint of
    every listener the supervisor holds a socket for replaced by the
    C{systemd:} endpoint adopting that socket, without the admin listener
    (which runs in the supervisor only), and without the listeners the
    supervisor holds no socket for (added by a reload: the supervisor
    starts a new generation of workers for them).

    @param families: listener name -> address family of the socket the
        supervisor hands over under that name.
    """
    listeners = tuple(
        dataclasses.replace(
            listener, endpoint=systemdEndpoint(families[listener.name], listener.name)
        )
        for listener in config.listeners
        if listener.name in families
    )
    proxy = dataclasses.replace(config.proxy, admin=None)
    return dataclasses.replace(config, listeners=listeners, proxy=proxy)


class NoAnswer(Exception):
    """A question on the control channel got no answer in time."""


class ControlChannel(Protocol):
    """
    One end of the control channel: sends messages, dispatches the ones
    received to C{handler}, and matches answers to questions.

    @ivar handler: called with every message that is not an answer to a
        question of L{ask}.
    @ivar lost: fires (with L{None}) when the channel is closed.
    """

    # A metrics answer carries the whole exposition of a worker: with many
    # upstreams and backends that is a few hundred KiB, escaped.
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(
        self, handler: Callable[[dict[str, Any]], None], clock: Any, name: str = "control"
    ) -> None:
        """
        @param clock: the L{IReactorTime} bounding L{ask}.
        @param name: how log lines name the other end (C{worker 2}).
        """
        self.handler = handler
        self._clock = clock
        self._name = name
        self._nextId = 1
        self._waiting: dict[int, Deferred[dict[str, Any]]] = {}
        self.lost: Deferred[None] = Deferred()
        self.connected = False
        self._buffer = bytearray()
        self._discarding = False

    def connectionMade(self) -> None:
        self.connected = True

    def send(self, message: Mapping[str, Any]) -> None:
        """Send one message; does nothing once the channel is closed."""
        if self.transport is None or not self.connected:
            return
        self.transport.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")

    def ask(self, op: str, timeout: float, **fields: Any) -> Deferred[dict[str, Any]]:
        """
        Ask the other end a question (C{status}, C{metrics}), with
        C{fields} in the message.

        @return: fires with the answer, or fails with L{NoAnswer} after
            C{timeout} seconds or when the channel closes first.
        """
        identifier = self._nextId
        self._nextId += 1
        answer: Deferred[dict[str, Any]] = Deferred()
        if not self.connected:
            answer.errback(NoAnswer(f"{self._name}: control channel closed"))
            return answer
        self._waiting[identifier] = answer

        def expire() -> None:
            waiting = self._waiting.pop(identifier, None)
            if waiting is not None:
                waiting.errback(NoAnswer(f"{self._name}: no answer to {op} within {timeout}s"))

        timer = self._clock.callLater(timeout, expire)

        def stopTimer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        answer.addBoth(stopTimer)
        self.send({**fields, "op": op, "id": identifier})
        return answer

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            if self._discarding:
                # The end of a line already dropped as too long.
                self._discarding = False
                continue
            self.lineReceived(line)
        del buffer[:start]
        if len(buffer) > self.MAX_LENGTH:
            self.lineLengthExceeded(bytes(buffer[:200]))
            buffer.clear()
            self._discarding = True

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warn(
                "{peer}: not a control message, ignored: {line!r}",
                peer=self._name,
                line=line[:200],
            )
            return
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            log.warn("{peer}: control message without op, ignored: {line!r}", peer=self._name, line=line[:200])
            return
        identifier = message.get("id")
        if isinstance(identifier, int) and identifier in self._waiting and "answer" in message:
            self._waiting.pop(identifier).callback(message)
            return
        try:
            self.handler(message)
        except Exception:
            log.failure("{peer}: handling control message {op} failed", peer=self._name, op=message["op"])

    def lineLengthExceeded(self, start: bytes) -> None:
        # The line is dropped and the next one read: an oversized answer is
        # a missing answer (its question times out), not a dead channel.
        log.warn(
            "{peer}: control message of more than {size} bytes dropped: {start!r}...",
            peer=self._name,
            size=self.MAX_LENGTH,
            start=start,
        )

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        waiting, self._waiting = self._waiting, {}
        for pending in waiting.values():
            pending.errback(NoAnswer(f"{self._name}: control channel closed"))
        if not self.lost.called:
            self.lost.callback(None)


def answer(question: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """The message answering C{question} (same C{op} and C{id})."""
    return {"op": question["op"], "id": question.get("id"), "answer": True, **fields}


# Metrics ----------------------------------------------------------------


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def mergeExpositions(
    own: bytes | str, workers: Iterable[bytes | str], notSummed: Iterable[str] = ()
) -> bytes:
    """
    One exposition for the whole instance: the supervisor's own series
    plus every worker's, a series (same name and labels) present in several
    of them counted once with the sum of their values.

    Summing is right for counters and histograms (requests, bytes,
    buckets) and for the gauges that count things per process (open
    connections, requests in flight).  A series of a family named in
    C{notSummed} is taken from the first exposition that has it (the
    supervisor's, then the workers' in order): the state the supervisor
    decides for everyone (backend states), which the workers only mirror,
    and what is the same in every process (certificate expiry).

    @param own: the supervisor's exposition (Prometheus text format).
    @param workers: each answering worker's exposition.
    @param notSummed: family names (as the parser names them: counters
        without C{_total}).
    """
    notSummed = frozenset(notSummed)
    order: list[str] = []
    kinds: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(text: bytes | str) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        for family in text_string_to_metric_families(text):
            if family.name not in kinds:
                order.append(family.name)
                kinds[family.name] = (family.type, family.documentation)
                values[family.name] = {}
            series = values[family.name]
            summed = family.name not in notSummed
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if summed:
                    series[key] = series.get(key, 0.0) + sample.value
                elif key not in series:
                    series[key] = sample.value

    add(own)
    for text in workers:
        add(text)
    families = []
    for name in order:
        kind, documentation = kinds[name]
        metric = Metric(name, documentation, kind)
        for (sampleName, labels), value in values[name].items():
            metric.add_sample(sampleName, dict(labels), value)
        families.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def labelled(text: bytes | str, prefix: str, label: str, value: str) -> bytes:
    """
    C{text} with every sample of the families whose name starts with
    C{prefix} given C{label=value}: the C{process_*} series of each
    process, which summing would make meaningless (a start time) or
    anonymous (whose memory?), become one series per process before
    L{mergeExpositions}.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    families = []
    for family in text_string_to_metric_families(text):
        metric = Metric(family.name, family.documentation, family.type)
        for sample in family.samples:
            labels = dict(sample.labels)
            if family.name.startswith(prefix):
                labels[label] = value
            metric.add_sample(sample.name, labels, sample.value)
        families.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
