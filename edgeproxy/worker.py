# -*- test-case-name: tests.test_workers -*-
"""
One worker process of C{workers > 1}: C{python -m edgeproxy.worker}, started
by L{edgeproxy.serve.supervisor.Supervisor} and nobody else.

A worker is the single-process proxy (L{edgeproxy.serve.service.EdgeService})
with three differences:
  - its listeners adopt the sockets the supervisor opened, inherited at
    fds 3, 4, ... and named by C{LISTEN_FDNAMES}: every listener's endpoint
    is rewritten to C{systemd:domain=...:name=LISTENER}
    (L{edgeproxy.workers.workerConfig}), on start and on every reload;
  - it runs no active health check: the supervisor's verdicts arrive on
    the control channel and are applied to its pools;
  - what it would tell systemd goes to the supervisor (the control
    channel), and its log events go to its standard error as JSON, which
    the supervisor logs tagged with the worker's number.

Nothing imported before L{main} has set C{LISTEN_PID} imports
C{twisted.internet.endpoints} (C{tests/test_workers.py} checks it): Twisted
reads C{LISTEN_*} once, when that module is first imported, and adopts the
sockets only when C{LISTEN_PID} is the reading process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from edgeproxy import logs
from edgeproxy.systemd import Notifier
from edgeproxy.workers import ControlChannel, answer

# Named: run as "python -m edgeproxy.worker", __name__ is "__main__".
log = Logger(namespace="edgeproxy.worker")

INHERITED_START = 3
"""First inherited listening socket (as with systemd)."""


def inheritedFamilies(environ: dict[str, str] | Any = os.environ) -> dict[str, int]:
    """
    Listener name -> address family of each socket inherited at fds 3, 4,
    ... as C{LISTEN_FDS}/C{LISTEN_FDNAMES} describe them.
    """
    names = [name for name in environ.get("LISTEN_FDNAMES", "").split(":") if name]
    count = int(environ.get("LISTEN_FDS", "0") or 0)
    families: dict[str, int] = {}
    for index, name in enumerate(names[:count]):
        fd = INHERITED_START + index
        # A duplicate, so that closing the probe leaves the socket open.
        with socket.socket(fileno=os.dup(fd)) as probe:
            families[name] = probe.family
    return families


class ControlNotifier(Notifier):
    """
    The notifier of a worker's L{EdgeService}: what it would send to
    systemd goes to the supervisor, which decides what systemd hears.
    """

    def __init__(self, channel: ControlChannel) -> None:
        super().__init__(environ={})
        self._channel = channel

    @property
    def enabled(self) -> bool:
        return True

    def notify(self, **fields: object) -> bool:
        self._channel.send({"op": "notify", "fields": {k: str(v) for k, v in fields.items()}})
        return True


class WorkerAgent:
    """
    The worker's side of the control channel: applies backend verdicts
    to the pools of the runtime being served and answers the supervisor's
    questions about this process.

    @ivar verdicts: (upstream, address) -> (state, reason), the latest
        verdict for each backend, applied again to a runtime built later.
    """

    def __init__(self, service: Any, number: int) -> None:
        """
        @param service: the worker's L{edgeproxy.serve.service.EdgeService}.
        """
        self.service = service
        self.number = number
        self.verdicts: dict[tuple[str, str], tuple[str, str]] = {}
        self.channel: ControlChannel | None = None

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "verdict":
            self.verdict(message)
        elif op == "status":
            self._reply(answer(message, status=self.status()))
        elif op == "metrics":
            self._reply(answer(message, text=self.metricsText()))
        elif op == "acme-challenges":
            challenges = getattr(self.service, "challenges", None)
            if challenges is not None:
                challenges.restore(message)
        elif op == "acme-sync":
            self._reply(answer(message))
        elif op == "cache-purge":
            from edgeproxy.cache.operate import purgeHere

            counts = purgeHere(self.service.currentRuntime(), message)
            if "id" in message:
                self._reply(answer(message, counts=counts))
        elif op == "acme-certificates":
            from edgeproxy.acme.worker import applyCertificates

            applyCertificates(self.service, [str(name) for name in message.get("names") or ()])
        else:
            log.warn("unknown control message {op}, ignored", op=op)

    def _reply(self, message: dict[str, Any]) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def verdict(self, message: dict[str, Any]) -> None:
        """Apply a backend state decided by the supervisor."""
        upstream = str(message.get("upstream"))
        address = str(message.get("address"))
        state = str(message.get("state"))
        reason = str(message.get("reason") or "")
        self.verdicts[(upstream, address)] = (state, reason)
        self._apply(self.service.currentRuntime(), upstream, address, state, reason)

    def applyAll(self, runtime: Any) -> None:
        """Apply every verdict known so far to C{runtime} (new pools)."""
        for (upstream, address), (state, reason) in self.verdicts.items():
            self._apply(runtime, upstream, address, state, reason)

    def _apply(self, runtime: Any, upstream: str, address: str, state: str, reason: str) -> None:
        pool = runtime.pools.get(upstream)
        if pool is None:
            # The supervisor and this worker may briefly serve different
            # configurations during a reload.
            log.debug("verdict for unknown upstream {upstream} ignored", upstream=upstream)
            return
        pool.applyVerdict(address, state, reason)

    def status(self) -> dict[str, Any]:
        """
        What this process adds to the supervisor's C{/status}: its pid,
        open connections per listener, requests in flight, and requests in
        flight per backend.
        """
        service = self.service
        connections = {
            site.listener.name: len(getattr(site, "channels", ()))
            for site in getattr(service, "sites", ())
        }
        listenersInFlight = {
            site.listener.name: len(getattr(site, "inflight", ()))
            for site in getattr(service, "sites", ())
        }
        backends: dict[str, dict[str, int]] = {}
        for name, pool in service.currentRuntime().pools.items():
            backends[name] = {
                backend.address: _inFlight(pool, backend) for backend in pool.backends
            }
        from edgeproxy.cache.operate import statusOf

        return {
            "worker": self.number,
            "pid": os.getpid(),
            "connections": connections,
            "in_flight": sum(listenersInFlight.values()),
            "listeners_in_flight": listenersInFlight,
            "backends": backends,
            "cache": statusOf(service.currentRuntime()),
        }

    def metricsText(self) -> str:
        metrics = getattr(self.service, "metrics", None)
        if metrics is None:
            return ""
        return metrics.exposition().decode("utf-8")


def _inFlight(pool: Any, backend: Any) -> int:
    counter = getattr(pool, "inFlight", None) or pool.balancer.inFlight
    try:
        return int(counter(backend))
    except KeyError:
        # Removed by a re-resolution between listing and counting.
        return 0


def runWorker(
    reactor: Any,
    path: str,
    number: int,
    controlFd: int,
    families: dict[str, int],
) -> int:
    """
    Build and run the worker's service on C{reactor} until it stops.

    @param path: the configuration file (the supervisor validated it).
    @param controlFd: where the control messages to the supervisor go;
        they come from the supervisor on standard input.
    @param families: see L{inheritedFamilies}.
    @return: the exit status.
    """
    from twisted.internet.stdio import StandardIO

    from edgeproxy.config import load
    from edgeproxy.config.model import Config
    from edgeproxy.errors import EdgeProxyError
    from edgeproxy.serve.service import EdgeService
    from edgeproxy.workers import workerConfig

    agent: WorkerAgent | None = None
    channel = ControlChannel(lambda message: agent.handle(message) if agent else None,
                             reactor, "supervisor")

    def supervisorGone(_: object) -> None:
        # The supervisor died (or closed the channel): a worker never
        # outlives it, so stop (draining) as if told to.
        if reactor.running:
            log.warn("control channel to the supervisor closed: stopping")
            reactor.stop()

    def prepare(config: Config) -> Config:
        return workerConfig(config, families)

    try:
        config = load(path)
        logs.policy.configure(config.proxy.log_level, config.proxy.log_format)
        service = EdgeService(
            prepare(config),
            reactor,
            notifier=ControlNotifier(channel),
            activeChecks=False,
            prepareConfig=prepare,
            orderCertificates=False,
        )
    except EdgeProxyError as e:
        log.critical("worker {number} cannot start: {error}", number=number, error=str(e))
        return 1
    except OSError as e:
        log.critical(
            "worker {number} cannot start: {path}: {error}",
            number=number,
            path=e.filename or path,
            error=e.strerror or str(e),
        )
        return 1
    agent = WorkerAgent(service, number)
    agent.channel = channel
    from edgeproxy.cache.stores import setRelay

    # A PURGE request served here reaches the other workers through the
    # supervisor (edgeproxy.cache.operate).
    setRelay(lambda purge: channel.send({"op": "cache-purged", **purge}))
    from edgeproxy.acme.worker import askForCertificates, followerOf

    askForCertificates(service, channel)
    # The state of every backend before the first connection is accepted,
    # so that no request goes to a backend the supervisor knows is down;
    # the ACME certificates too, read at once (later ones in a thread).
    first, rest = readInitialState(0, INITIAL_STATE_TIMEOUT)
    for message in first:
        if message.get("op") == "acme-certificates":
            followerOf(service).followNow([str(name) for name in message.get("names") or ()])
        else:
            agent.handle(message)
    # mypy reads twisted.internet.stdio's Windows branch, whose StandardIO
    # takes no stdin/stdout; the POSIX one does.
    StandardIO(channel, stdin=0, stdout=controlFd, reactor=reactor)  # type: ignore[call-arg]
    if rest:
        channel.dataReceived(rest)
    channel.lost.addCallback(supervisorGone)
    try:
        # Before the reactor runs, as twistd does: a socket that cannot be
        # adopted stops the worker here, with the reason logged.
        service.startService()
    except SystemExit as e:
        return int(e.code or 1)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return int(getattr(service, "exitCode", 0) or 0)


INITIAL_STATE_TIMEOUT = 10.0
"""Seconds a starting worker waits for the supervisor's backend states."""


def readInitialState(fd: int, timeout: float) -> tuple[list[dict[str, Any]], bytes]:
    """
    Read, blocking, the messages the supervisor sends a worker it just
    started: every backend's state, then C{{"op": "state-end"}} (see
    L{edgeproxy.serve.supervisor.Supervisor}).  Runs before the reactor, which
    then reads the rest of the channel.

    @return: the messages before the end marker, and the bytes read after
        it (for the channel).  After C{timeout} seconds, or when the
        channel closes first, what was read so far (logged).
    """
    import json
    import select
    import time

    deadline = time.monotonic() + timeout
    buffer = b""
    messages: list[dict[str, Any]] = []
    while True:
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            try:
                message = json.loads(line)
            except ValueError:
                log.warn("not a control message, ignored: {line!r}", line=line[:200])
                continue
            if not isinstance(message, dict):
                continue
            if message.get("op") == "state-end":
                return messages, buffer
            messages.append(message)
        left = deadline - time.monotonic()
        readable = select.select([fd], [], [], left)[0] if left > 0 else []
        if not readable:
            log.warn(
                "no backend states from the supervisor within {timeout}s: starting without",
                timeout=timeout,
            )
            return messages, buffer
        chunk = os.read(fd, 65536)
        if not chunk:
            return messages, buffer
        buffer += chunk


def logObserver(stream: Any) -> Callable[[dict[str, Any]], None]:
    """
    The worker's log observer: every event as one JSON line on C{stream}
    (C{jsonFileLogObserver}, record separator C{\\x1e}), which the
    supervisor logs as its own, tagged with the worker's number.

    A failure does not survive JSON (only its text would be wanted
    anyway): its traceback is put in the event as text instead.  Events
    below C{[edgeproxy] log_level} are not sent (L{edgeproxy.logs.shown}).
    """
    from twisted.logger import jsonFileLogObserver

    write = jsonFileLogObserver(stream, recordSeparator="\x1e")

    def observe(event: dict[str, Any]) -> None:
        # The level and byte strings as the supervisor's process log has
        # them: what it would not show is not sent.
        visible = logs.shown(event)
        if visible is None:
            return
        event = visible
        failure = event.get("log_failure")
        if failure is not None:
            event = dict(event)
            del event["log_failure"]
            try:
                traceback = failure.getTraceback()
            except Exception:
                traceback = repr(failure)
            event["log_traceback"] = traceback
            event["log_format"] = (event.get("log_format") or "") + "\n{log_traceback}"
        write(event)

    return observe


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m edgeproxy.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--control", type=int, required=True,
                        help="fd the worker writes its control messages to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """
    Run one worker until it is stopped (C{SIGTERM}, or its supervisor
    gone).  Returns the exit status.
    """
    args = _arguments(sys.argv[1:] if argv is None else argv)
    # Before anything imports twisted.internet.endpoints (see the module
    # docstring).  The supervisor removed NOTIFY_SOCKET already; a worker
    # must never talk to systemd, so make sure.
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ.pop("NOTIFY_SOCKET", None)
    # Ctrl-C in a terminal reaches the whole process group: the supervisor
    # alone decides (it sends SIGTERM), or a worker would take the
    # supervisor's SIGTERM that follows as a second signal and abort its
    # drain.  The reactor leaves an ignored SIGINT alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    families = inheritedFamilies()
    # The access log (access_log = -) writes whole lines to standard
    # output; a pipe is block-buffered unless told otherwise.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from twisted.logger import globalLogBeginner

    # Any callable taking an event is an observer; the stubs ask for
    # ILogObserver providers.
    globalLogBeginner.beginLoggingTo([logObserver(sys.stderr)], redirectStandardIO=False)  # type: ignore[list-item]

    from twisted.internet import reactor

    return runWorker(reactor, args.config, args.number, args.control, families)


if __name__ == "__main__":
    sys.exit(main())
