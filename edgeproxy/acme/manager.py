# -*- test-case-name: tests.test_acme_manager -*-
"""
L{ACMEManager}: the service that keeps a certificate for every name ACME
is responsible for.

At start it serves what C{storage} already holds (validated as a file is,
no network), then looks at each name: a name without a certificate, or
whose certificate is due for renewal (L{edgeproxy.acme.policy.decide}), is
ordered.  Orders run one at a time, in a thread (the C{acme} library
blocks), under the name's lock in C{storage}.  A certificate obtained is
stored, loaded and checked exactly as a file (L{edgeproxy.tls.certs.loadEntry}:
key matches, chain, names, validity), and must name what was ordered;
only then it joins the served certificates through
L{edgeproxy.tls.store.CertificateStore.setManaged}, one swap, no
connection dropped.  On any doubt the certificate served stays.

Nothing here blocks start-up or a handshake: a name without a certificate
gets the default certificate until its own arrives.  Once anything is
served, C{storage} is read in a thread too (an on-demand name found there,
L{ACMEManager.adoptStored}; the look before an order): a slow or
network-mounted directory holds up only the handshakes waiting for that
name.  A failure is logged once per attempt with the CA's problem
document, counted, shown in C{/status}, and retried after
L{edgeproxy.acme.policy.retryDelay} (C{Retry-After} honoured).  A CA
that cannot be reached changes nothing for names whose certificates are
still valid.

With C{workers = N} the supervisor runs the manager; challenges and
certificates reach the workers through the hooks L{onChallenges} and the
store's listeners (see L{edgeproxy.serve.supervisor}).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from edgeproxy.acme import policy
from edgeproxy.acme.challenges import ChallengeStore, tlsALPN01Certificate
from edgeproxy.acme.client import ACMEClient, ACMEFailure, newKey
from edgeproxy.acme.storage import Storage
from edgeproxy.config.acmemodel import ACMESettings
from edgeproxy.config.model import Config
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, loadEntry

__all__ = ["ACMEManager", "NameState"]

log = Logger()

LOCK_RETRY = 60.0
"""Seconds before looking again at a name whose lock another process holds."""

STORAGE_RECHECK = 3600.0
"""At most this long between two looks at every name (a certificate another
machine renewed into shared storage is picked up by then)."""


@dataclass
class NameState:
    """What the manager knows about one name (shown by C{/status})."""

    name: str
    entry: CertificateEntry | None = None
    nextCheck: float | None = None
    nextRenewal: float | None = None
    lastError: str | None = None
    failures: int = 0
    retryAt: float | None = None
    window: policy.RenewalWindow | None = None
    ariNext: float = 0.0
    busy: bool = False
    onDemand: bool = False

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "next_renewal": self.nextRenewal,
            "last_error": self.lastError,
            "failures": self.failures,
            "retry_at": self.retryAt,
            "ordering": self.busy,
            "ari_window": None if self.window is None else {"start": self.window.start, "end": self.window.end},
            "on_demand": self.onDemand,
        }


def _deferToThread(reactor: Any) -> Callable[..., Deferred[Any]]:
    from twisted.internet.threads import deferToThreadPool

    return lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)


def _blockingCall(reactor: Any) -> Callable[..., Any]:
    from twisted.internet.threads import blockingCallFromThread

    return lambda f, *a: blockingCallFromThread(reactor, f, *a)


class ACMEManager(Service):
    """
    @ivar states: name -> L{NameState}, for every name managed.
    @ivar onChallenges: called on the reactor after the pending challenges
        changed; may return a Deferred that fires once every process can
        answer them (a supervisor waits for its workers).
    @ivar settingsListeners: called with the new C{[acme]} settings at
        every reload (the on-demand gate follows them,
        L{edgeproxy.acme.setup.onDemandGate}).
    """

    def __init__(
        self,
        config: Config,
        store: Any,
        challenges: ChallengeStore,
        reactor: Any,
        metrics: Any = None,
        client: Any = None,
        runInThread: Callable[..., Deferred[Any]] | None = None,
        callFromThread: Callable[..., Any] | None = None,
    ) -> None:
        """
        @param store: the L{edgeproxy.tls.store.CertificateStore} served.
        @param client: an L{ACMEClient} (default: one for C{config.acme}).
        @param runInThread: runs a blocking call off the reactor thread
            (default: the reactor's thread pool).
        @param callFromThread: runs a call on the reactor from that thread
            and waits for it (default: C{blockingCallFromThread}).
        """
        assert config.acme is not None
        self.config = config
        self.settings = config.acme
        self.store = store
        self.challenges = challenges
        self._reactor = reactor
        self.metrics = metrics
        self.storage = Storage(self.settings.storage, self.settings.directory)
        self.client = client if client is not None else ACMEClient(self.settings, self.storage)
        self._inThread = runInThread or _deferToThread(reactor)
        self._fromThread = callFromThread or _blockingCall(reactor)
        self.states: dict[str, NameState] = {}
        self.onChallenges: Callable[[], Deferred[None] | None] | None = None
        self.settingsListeners: list[Callable[[ACMESettings], None]] = []
        self._queue: list[tuple[str, str]] = []
        self._working: Deferred[None] | None = None
        self._timer: Any = None
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._setNames(config)

    # Names ----------------------------------------------------------------

    def _fileNames(self) -> list[str]:
        try:
            files = self.store.current.entries
        except RuntimeError:
            return []
        return [name for entry in files if entry.source == "file" for name in entry.names]

    def _setNames(self, config: Config) -> None:
        names = policy.wantedNames(config, self._fileNames())
        kept = {n: s for n, s in self.states.items() if n in names or s.onDemand}
        for name in names:
            kept.setdefault(name, NameState(name))
        self.states = kept

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.states)

    def serves(self, name: str) -> bool:
        """Whether C{name} has a managed certificate now."""
        state = self.states.get(name)
        return state is not None and state.entry is not None

    def reconfigure(self, config: Config) -> None:
        """A reload: follow the new names (and settings, when only the names
        or timing changed; a new directory or storage takes a restart).
        The L{settingsListeners} get the new settings in any case."""
        if config.acme is None:
            return
        if (config.acme.directory, config.acme.storage) != (self.settings.directory, self.settings.storage):
            log.warn("[acme] directory and storage changes take effect at the next restart")
        else:
            self.settings = config.acme
            self.client.settings = config.acme
        self.config = config
        self._setNames(config)
        for state in self.states.values():
            # renew_before may have changed.
            state.nextRenewal = None
        self._swap()
        self._schedule(0)
        for listener in list(self.settingsListeners):
            try:
                listener(config.acme)
            except Exception:
                log.failure("ACME: following the new [acme] settings failed")

    # Start and stop ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            self.storage.prepare()
        except OSError as e:
            log.error("ACME: cannot create {path}: {why}", path=self.storage.root, why=e.strerror or str(e))
        for name, state in self.states.items():
            state.entry = self._loadStored(name)
            state.nextRenewal = None
        self._swap()
        log.info(
            "ACME: {count} name(s) from {directory}: {names}",
            count=len(self.states), directory=self.settings.directory,
            names=", ".join(self.states) or "(none yet)",
        )
        self._schedule(0)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue = []
        return None

    def _readStored(self, name: str, now: float) -> CertificateEntry | Exception | None:
        """
        Read the certificate C{storage} holds for C{name} and check it as a
        file is (L{loadEntry}, valid at C{now}).  It blocks on the files and
        logs nothing: it may run in a thread (L{_loadStoredInThread}).

        @return: the entry; L{None} when C{storage} holds none for C{name};
            or what went wrong, for L{_servable} to log: an C{OSError}
            (C{storage} cannot be read), a C{ValueError} (C{name} cannot be
            stored, L{Storage.folder}) or a L{CertificateError} (the stored
            certificate is not valid).
        """
        try:
            stored = self.storage.load(name)
            if stored is None:
                return None
            return loadEntry(stored.certificatePath, stored.keyPath, now, section="acme", key="storage")
        except (OSError, ValueError, CertificateError) as e:
            return e

    def _loadStored(self, name: str) -> CertificateEntry | None:
        """
        The certificate C{storage} holds for C{name}, if it may be served
        (L{_servable}).  The files are read on the reactor thread: at
        start only, before anything is served; L{_loadStoredInThread}
        otherwise.
        """
        return self._servable(name, self._readStored(name, self._reactor.seconds()))

    async def _loadStoredInThread(self, name: str) -> CertificateEntry | None:
        """L{_loadStored}, the files read in a thread (L{_inThread}): a slow
        C{storage} holds up nothing but what waits for this name."""
        return self._servable(name, await self._inThread(self._readStored, name, self._reactor.seconds()))

    def _servable(self, name: str, read: CertificateEntry | Exception | None) -> CertificateEntry | None:
        """
        On the reactor: the entry L{_readStored} read for C{name}, marked as
        ACME's, if it may be served (it names C{name}); otherwise L{None},
        and why logged.

        @param read: that entry, L{None} when C{storage} held none, or the
            exception L{_readStored} gave back.
        """
        if isinstance(read, CertificateError):
            log.warn("ACME: the stored certificate of {name} is not served: {why}", name=name, why=str(read))
            return None
        if isinstance(read, Exception):
            log.warn("ACME: cannot read the stored certificate of {name}: {why}", name=name, why=str(read))
            return None
        if read is None:
            return None
        if name not in read.names:
            log.warn("ACME: the stored certificate of {name} does not name it; not served", name=name)
            return None
        from dataclasses import replace

        return replace(read, source="acme")

    def _swap(self) -> None:
        """Serve the managed entries of every name, as one snapshot swap."""
        entries = [s.entry for s in self.states.values() if s.entry is not None]
        current = {id(e) for e in self.store.managed}
        if {id(e) for e in entries} == current and len(entries) == len(current):
            return
        try:
            self.store.setManaged(entries)
        except Exception:
            log.failure("ACME: the new certificates were refused; still serving the previous ones")

    # Scheduling -------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        earliest = now + STORAGE_RECHECK
        lookups: list[tuple[str, str]] = []
        for name, state in list(self.states.items()):
            if state.busy or any(queued == name for queued, _ in self._queue):
                continue
            entry = state.entry
            if entry is not None and state.nextRenewal is None:
                state.nextRenewal = self._renewalTime(entry, state.window)
            decision = policy.decide(
                now,
                None if entry is None else entry.notAfter.timestamp(),
                state.nextRenewal,
                state.retryAt,
            )
            if decision.order:
                self._queue.append((name, decision.why))
            else:
                if entry is not None and state.ariNext <= now and state.retryAt is None:
                    lookups.append((name, "ari"))
                state.nextCheck = decision.at
                earliest = min(earliest, decision.at)
        # Renewal information after the orders: a slow CA delays no order.
        self._queue.extend(lookups)
        if self._queue:
            self._startWork()
        self._schedule(earliest - now)

    async def _work(self) -> None:
        try:
            while self._queue and self.running:
                name, why = self._queue.pop(0)
                state = self.states.get(name)
                if state is None:
                    continue
                state.busy = True
                try:
                    if why == "ari":
                        await self._checkRenewalInfo(state)
                    else:
                        await self._obtain(state, why)
                except Exception:
                    log.failure("ACME: handling {name} failed", name=name)
                finally:
                    state.busy = False
                    self._wake(name)
        finally:
            self._working = None
        if self.running:
            self._schedule(0)

    def _startWork(self) -> None:
        if self._working is None or self._working.called:
            self._working = Deferred.fromCoroutine(self._work())

    def _wake(self, name: str) -> None:
        for waiter in self._waiters.pop(name, []):
            waiter.callback(None)

    # On demand --------------------------------------------------------------

    def adoptStored(self, name: str) -> Deferred[bool]:
        """
        Serve the certificate C{storage} holds for C{name}, if it is valid
        (an on-demand name seen again after a restart); from then on the
        name is renewed as the others.  Asks nothing of the CA.  The files
        are read in a thread (L{_loadStoredInThread}); a name another call
        adopted, or began to manage, meanwhile is left as that call left
        it, and nothing is served if the manager stopped meanwhile.

        @return: fires with whether C{name} is served now.
        """
        return Deferred.fromCoroutine(self._adoptStored(name))

    async def _adoptStored(self, name: str) -> bool:
        state = self.states.get(name)
        if state is None:
            running = self.running
            entry = await self._loadStoredInThread(name)
            # Another call may have adopted the name, or begun to manage
            # it, while the files were read: as that call left it.
            state = self.states.get(name)
            if state is None:
                if entry is None or (running and not self.running):
                    # Nothing stored, or stopped while the files were read.
                    return False
                log.info("ACME: serving the certificate for {name} found in storage", name=name)
                state = self.states[name] = NameState(name, onDemand=True)
                self._serve(state, entry)
                self._schedule(0)
                return True
        return state.entry is not None

    def backingOff(self, name: str) -> float | None:
        """The seconds left before C{name} may be ordered again after a
        failure (C{Retry-After} honoured); L{None} when it may be now."""
        state = self.states.get(name)
        if state is None or state.retryAt is None:
            return None
        left = state.retryAt - self._reactor.seconds()
        return left if left > 0 else None

    def obtain(self, name: str) -> Deferred[None]:
        """
        Manage C{name} from now on (an on-demand name) and order its
        certificate now, unless storage holds a valid one
        (L{adoptStored}) or the name is backing off after a failure
        (L{backingOff}); fires when that attempt is over (with or without
        a certificate).  Nothing is ordered if the manager stopped while
        storage was read.
        """
        return Deferred.fromCoroutine(self._obtainOnDemand(name))

    async def _obtainOnDemand(self, name: str) -> None:
        running = self.running
        if await self.adoptStored(name) or self.backingOff(name) is not None:
            return
        if running and not self.running:
            # Stopped while the files were read: no order.
            return
        state = self.states.setdefault(name, NameState(name, onDemand=True))
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(name, []).append(waiter)
        if not state.busy and not any(queued == name for queued, _ in self._queue):
            self._queue.append((name, "on demand"))
            self._startWork()
        await waiter

    # One order ----------------------------------------------------------------

    async def _obtain(self, state: NameState, why: str) -> None:
        name = state.name
        lock = self.storage.lock(name)
        if not await self._inThread(lock.acquire):
            log.info("ACME: another process is ordering {name} (its lock is held); looking again later", name=name)
            state.retryAt = self._reactor.seconds() + LOCK_RETRY
            return
        try:
            # Another machine sharing the storage may have been faster.
            stored = await self._loadStoredInThread(name)
            if not self.running:
                # Stopped while the files were read: no order now.
                return
            if stored is not None and (state.entry is None or stored.notAfter > state.entry.notAfter):
                decision = policy.decide(
                    self._reactor.seconds(), stored.notAfter.timestamp(), self._renewalTime(stored, None)
                )
                if not decision.order:
                    log.info("ACME: serving the certificate for {name} found in storage", name=name)
                    self._serve(state, stored)
                    return
            renewal = state.entry is not None
            log.info(
                "ACME: ordering a certificate for {name} from {directory} ({why})",
                name=name, directory=self.settings.directory, why=why,
            )
            if self.metrics is not None:
                self.metrics.acmeOrdered(renewal)
            try:
                keyPEM = await self._inThread(newKey, self.settings.key_type)
                try:
                    chain = await self._inThread(self.client.order, name, keyPEM, self._presentFromThread)
                finally:
                    # Whatever the outcome, nothing of this order stays answerable.
                    self._present("", name, "", "")
                entry = await self._inThread(self._store, name, chain, keyPEM)
            except ACMEFailure as failure:
                self._failed(state, str(failure), failure.retryAfter, failure.problem)
                return
            except CertificateError as e:
                self._failed(state, f"the certificate the CA issued is refused: {e}", None, "certificate")
                return
            self._serve(state, entry)
            if self.metrics is not None:
                self.metrics.acmeObtained(renewal)
            log.info(
                "ACME: {what} certificate for {name} swapped in, issued by {issuer}, valid until {notAfter}",
                what="renewed" if renewal else "new", name=name, issuer=entry.issuer,
                notAfter=entry.notAfter.isoformat(),
            )
        finally:
            await self._inThread(lock.release)

    def _serve(self, state: NameState, entry: CertificateEntry) -> None:
        """Serve C{entry} for C{state}'s name, a new certificate (obtained
        here or found in storage): what was known of the previous one
        (failures, back-off, the CA's renewal window) no longer holds."""
        state.entry = entry
        state.failures = 0
        state.lastError = None
        state.retryAt = None
        state.window = None
        state.ariNext = 0.0
        state.nextRenewal = self._renewalTime(entry, None)
        self._swap()

    def _store(self, name: str, chain: bytes, keyPEM: bytes) -> CertificateEntry:
        """In the thread: check as a file is (and that it names C{name}),
        then store, then load what was stored."""
        from dataclasses import replace

        import tempfile
        import os

        # Checked before it replaces what storage holds: a bad issuance
        # must not overwrite a good certificate.
        with tempfile.TemporaryDirectory(dir=self.storage.root) as scratch:
            certPath = os.path.join(scratch, "certificate.pem")
            keyPath = os.path.join(scratch, "key.pem")
            with open(certPath, "wb") as f:
                f.write(chain)
            with open(os.open(keyPath, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(keyPEM)
            issued = loadEntry(certPath, keyPath, time.time(), section="acme", key="storage")
        if name not in issued.names:
            raise CertificateError(f"the certificate does not name {name} (it names {', '.join(issued.names)})",
                                   file=self.storage.folder(name), section="acme", key="storage")
        stored = self.storage.save(name, chain, keyPEM, {
            "directory": self.settings.directory,
            "obtained": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        })
        entry = loadEntry(stored.certificatePath, stored.keyPath, time.time(), section="acme", key="storage")
        return replace(entry, source="acme")

    def _failed(self, state: NameState, why: str, retryAfter: float | None, problem: str | None) -> None:
        state.failures += 1
        delay = policy.retryDelay(state.failures, retryAfter)
        state.retryAt = self._reactor.seconds() + delay
        state.lastError = why
        if self.metrics is not None:
            self.metrics.acmeFailed(_problemLabel(problem))
        log.error(
            "ACME: {name}: {why}; attempt {attempt}, next in {delay:.0f}s{serving}",
            name=state.name, why=why, attempt=state.failures, delay=delay,
            serving="" if state.entry is None else " (the current certificate stays)",
            problem=problem,
        )

    async def _checkRenewalInfo(self, state: NameState) -> None:
        entry = state.entry
        if entry is None:
            return
        now = self._reactor.seconds()
        try:
            window, retryAfter = await self._inThread(self.client.renewalWindow, entry.certificate)
        except ACMEFailure as e:
            log.debug("ACME: no renewal information for {name}: {why}", name=state.name, why=str(e))
            state.ariNext = now + policy.ARI_RECHECK
            return
        state.ariNext = now + (retryAfter if retryAfter else policy.ARI_RECHECK)
        if window != state.window:
            state.window = window
            state.nextRenewal = self._renewalTime(entry, window)

    def _renewalTime(self, entry: CertificateEntry, window: policy.RenewalWindow | None) -> float:
        return policy.renewalTime(
            entry.notBefore.timestamp(), entry.notAfter.timestamp(), self.settings.renew_before, window
        )

    # Challenges (the presenter runs in the order's thread) -------------------

    def _presentFromThread(self, kind: str, name: str, token: str, keyAuthorization: str) -> None:
        self._fromThread(self._present, kind, name, token, keyAuthorization)

    def _present(self, kind: str, name: str, token: str, keyAuthorization: str) -> Deferred[None] | None:
        if kind == "http-01":
            self.challenges.addHTTP01(name, token, keyAuthorization)
        elif kind == "tls-alpn-01":
            self.challenges.addTLSALPN01(tlsALPN01Certificate(name, keyAuthorization))
        else:
            self.challenges.removeTLSALPN01(name)
            self.challenges.removeHTTP01ForName(name)
        if self.onChallenges is not None:
            return self.onChallenges()
        return None

    # Status -----------------------------------------------------------------

    def statusFor(self, entry: CertificateEntry) -> dict[str, Any] | None:
        for state in self.states.values():
            if state.entry is entry:
                return state.status()
        return None

    def pendingStatus(self) -> list[dict[str, Any]]:
        """Names without a certificate yet (shown by C{/status})."""
        return [
            {**state.status(), "names": [state.name], "source": "acme", "served": False}
            for state in self.states.values()
            if state.entry is None
        ]


def _problemLabel(problem: str | None) -> str:
    """A bounded metric label from an RFC 8555 problem type."""
    if not problem:
        return "other"
    short = problem.rsplit(":", 1)[-1]
    known = {
        "rateLimited", "unauthorized", "connection", "dns", "tls", "incorrectResponse",
        "badNonce", "malformed", "serverInternal", "rejectedIdentifier", "caa",
        "externalAccountRequired", "certificate", "orderNotReady", "accountDoesNotExist",
    }
    return short if short in known else "other"
