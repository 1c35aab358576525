"""
L{edgeproxy.acme.manager.ACMEManager} on a memory clock with a fake CA
client (what it does with orders' outcomes; the protocol itself is tested
against Pebble in C{tests/integration/test_acme.py}).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from edgeproxy.acme.challenges import ChallengeStore
from edgeproxy.acme.client import ACMEFailure
from edgeproxy.acme.manager import ACMEManager
from edgeproxy.acme.storage import Storage
from edgeproxy.admin.status import acmeStatus, certificateStatus
from edgeproxy.config import load
from edgeproxy.config.model import Config
from edgeproxy.metrics import Metrics
from edgeproxy.tls.store import CertificateStore
from tests.certutil import CertificateAuthority
from tests.threadutil import HeldCalls

DAY = 86400.0


class FakeCA:
    """Issues from a test CA, or fails as told; records what it was asked."""

    def __init__(self) -> None:
        self.authority = CertificateAuthority("fake ACME CA").intermediate("fake ACME issuer")
        self.failures: list[ACMEFailure] = []
        self.orders: list[str] = []
        self.presented: list[tuple[str, str]] = []
        self.issueFor: str | None = None
        self.renewalInformationAsked = 0

    def order(self, name: str, keyPEM: bytes, present: Any) -> bytes:
        self.orders.append(name)
        present("http-01", name, "t" * 43, "t" * 43 + ".thumb")
        self.presented.append(("http-01", name))
        if self.failures:
            raise self.failures.pop(0)
        key = load_pem_private_key(keyPEM, password=None)
        issued = self.authority.issue([self.issueFor or name], key=key)  # type: ignore[arg-type]
        return issued.certificatePEM + issued.chainPEM

    def renewalWindow(self, certificate: Any) -> tuple[None, None]:
        self.renewalInformationAsked += 1
        return None, None


def writeConfig(tmp_path: Path, acme: str = "") -> Config:
    """An edge.ini with a route for C{app.example} and C{acme} lines more
    in C{[acme]}, loaded (written again: as for a reload)."""
    (tmp_path / "edge.ini").write_text(f"""
[tls]
certificates = default.pem
[acme]
storage = state
{acme}
[listen:https]
endpoint = tcp:0
tls = yes
[upstream:app]
servers = 127.0.0.1:9
[route:app]
hosts = app.example
upstream = app
""")
    return load(str(tmp_path / "edge.ini"))


def managerFor(
    tmp_path: Path, acme: str = "", runInThread: Callable[..., Deferred[Any]] | None = None
) -> tuple[ACMEManager, FakeCA, Clock, CertificateStore, Metrics]:
    """A manager of L{writeConfig}'s configuration on a memory clock, with
    a L{FakeCA}; not started.

    @param runInThread: the manager's; by default it runs each call at once.
    """
    CertificateAuthority("default").issue(["fallback.invalid"]).writePEM(tmp_path / "default.pem")
    config = writeConfig(tmp_path, acme)
    clock = Clock()
    clock.advance(time.time())
    store = CertificateStore(config.tls, clock)  # type: ignore[arg-type]
    store.load()
    fake = FakeCA()
    metrics = Metrics()
    manager = ACMEManager(
        config, store, ChallengeStore(), clock, metrics, client=fake,
        runInThread=runInThread or (lambda f, *a: maybeDeferred(f, *a)), callFromThread=lambda f, *a: f(*a),
    )
    return manager, fake, clock, store, metrics


def restarted(manager: ACMEManager, store: CertificateStore, fake: FakeCA, clock: Clock) -> ACMEManager:
    """A new manager with the same configuration and storage, as after a
    restart (the store serves no managed certificate yet); not started."""
    manager.stopService()
    store.setManaged([])
    return ACMEManager(
        manager.config, store, ChallengeStore(), clock, Metrics(), client=fake,
        runInThread=lambda f, *a: maybeDeferred(f, *a), callFromThread=lambda f, *a: f(*a),
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ACMEManager, FakeCA, Clock, CertificateStore, Metrics]:
    return managerFor(tmp_path)


def served(store: CertificateStore, name: str) -> Any:
    return next((e for e in store.current.entries if name in e.names), None)


def test_obtainedAndSwappedIn(setup: Any) -> None:
    manager, fake, clock, store, metrics = setup
    manager.startService()
    clock.advance(0)
    assert fake.orders == ["app.example"]
    entry = served(store, "app.example")
    assert entry is not None and entry.source == "acme"
    state = manager.states["app.example"]
    assert state.lastError is None and state.nextRenewal == pytest.approx(entry.notAfter.timestamp() - 30 * DAY)
    # The challenge was withdrawn once the order was over.
    assert manager.challenges.pending == 0
    assert b'edgeproxy_acme_certificates_total{kind="new"} 1.0' in metrics.exposition()


def test_failureBacksOffHonouringRetryAfter(setup: Any) -> None:
    manager, fake, clock, store, metrics = setup
    fake.failures.append(ACMEFailure("the CA refused: rateLimited", "urn:ietf:params:acme:error:rateLimited", 3600.0))
    with capturedLogs() as events:
        manager.startService()
        clock.advance(0)
    assert served(store, "app.example") is None
    state = manager.states["app.example"]
    assert state.failures == 1 and "rateLimited" in state.lastError
    assert state.retryAt == pytest.approx(clock.seconds() + 3600)
    [logged] = [e for e in events if e.get("log_level").name == "error"]
    assert logged["why"] == "the CA refused: rateLimited" and logged["delay"] == 3600
    assert b'edgeproxy_acme_failures_total{problem="rateLimited"} 1.0' in metrics.exposition()
    clock.advance(3599)
    assert fake.orders == ["app.example"]
    clock.advance(1)
    assert fake.orders == ["app.example", "app.example"]
    assert served(store, "app.example") is not None


def storedCertificate(manager: ACMEManager, name: str) -> bytes | None:
    stored = manager.storage.load(name)
    return None if stored is None else Path(stored.certificatePath).read_bytes()


def test_wrongCertificateRefused(setup: Any) -> None:
    """
    A certificate for another name is never served nor stored: neither the
    first one, nor a renewal over a good one (storage keeps the good one).
    """
    manager, fake, clock, store, metrics = setup
    fake.issueFor = "evil.example"
    manager.startService()
    clock.advance(0)
    assert served(store, "app.example") is None and served(store, "evil.example") is None
    assert "does not name app.example" in manager.states["app.example"].lastError
    assert storedCertificate(manager, "app.example") is None

    fake.issueFor = None
    clock.advance(60)
    good = served(store, "app.example")
    assert good is not None
    goodPEM = storedCertificate(manager, "app.example")
    fake.issueFor = "evil.example"
    clock.advance(61 * DAY)  # the renewal is due 30 days before the 90 days end
    assert fake.orders == ["app.example"] * 3
    assert "does not name app.example" in manager.states["app.example"].lastError
    assert served(store, "app.example") is good and served(store, "evil.example") is None
    assert storedCertificate(manager, "app.example") == goodPEM


def test_certificateFromSharedStorageClearsTheFailure(setup: Any) -> None:
    """
    After a failed order, the certificate another machine stored meanwhile
    is served at the retry without an order, and /status shows no error
    any more; the renewal information is asked for again.
    """
    manager, fake, clock, store, metrics = setup
    fake.failures.append(ACMEFailure("the CA refused: rateLimited", "urn:ietf:params:acme:error:rateLimited", None))
    manager.startService()
    clock.advance(0)
    [name] = acmeStatus(manager)["names"]  # type: ignore[index]
    assert "rateLimited" in name["last_error"] and name["failures"] == 1 and name["retry_at"] is not None
    issued = fake.authority.issue(["app.example"])
    elsewhere = Storage(manager.storage.root, manager.settings.directory)
    elsewhere.save("app.example", issued.certificatePEM + issued.chainPEM, issued.keyPEM, {})
    clock.advance(60)
    assert fake.orders == ["app.example"]
    [document] = [c for c in certificateStatus(store, clock.seconds(), manager) if c["names"] == ["app.example"]]
    assert document["source"] == "acme" and document["last_error"] is None
    assert document["next_renewal"] == pytest.approx(served(store, "app.example").notAfter.timestamp() - 30 * DAY)
    [name] = acmeStatus(manager)["names"]  # type: ignore[index]
    assert name["last_error"] is None and name["failures"] == 0 and name["retry_at"] is None
    assert fake.renewalInformationAsked == 1


def test_onDemandOrderHonoursTheBackOff(setup: Any) -> None:
    """An on-demand name whose order failed is not ordered again before its
    Retry-After, however often it is asked for."""
    manager, fake, clock, store, metrics = setup
    manager.startService()
    clock.advance(0)
    fake.failures.append(ACMEFailure("the CA refused: rateLimited", "urn:ietf:params:acme:error:rateLimited", DAY))
    first = manager.obtain("new.example")
    assert first.called and fake.orders == ["app.example", "new.example"]
    clock.advance(601)
    again = manager.obtain("new.example")
    assert again.called and fake.orders == ["app.example", "new.example"]
    assert served(store, "new.example") is None
    clock.advance(DAY)
    assert fake.orders == ["app.example", "new.example", "new.example"]
    assert served(store, "new.example") is not None


def storedElsewhere(manager: ACMEManager, fake: FakeCA, name: str) -> None:
    """A valid certificate for C{name} in the manager's storage, real files
    as another machine (or an earlier process) stores them."""
    issued = fake.authority.issue([name])
    elsewhere = Storage(manager.storage.root, manager.settings.directory)
    elsewhere.save(name, issued.certificatePEM + issued.chainPEM, issued.keyPEM, {})


def startedHolding(tmp_path: Path) -> tuple[ACMEManager, FakeCA, Clock, CertificateStore, HeldCalls]:
    """A started manager whose calls to a thread wait for the test
    (L{HeldCalls}); the order of C{app.example} at start is over."""
    held = HeldCalls()
    manager, fake, clock, store, _ = managerFor(tmp_path, runInThread=held)
    manager.startService()
    clock.advance(0)
    held.release()
    assert fake.orders == ["app.example"] and served(store, "app.example") is not None
    return manager, fake, clock, store, held


def test_adoptionReadsStorageInAThread(tmp_path: Path) -> None:
    """
    The stored certificate of an on-demand name is read through
    C{runInThread}, not on the reactor thread: until that call has run,
    the name is not served (and adoption has not answered); then it is,
    without an order.
    """
    manager, fake, clock, store, held = startedHolding(tmp_path)
    storedElsewhere(manager, fake, "stored.example")
    adopted = manager.adoptStored("stored.example")
    assert len(held.calls) == 1
    assert not adopted.called and served(store, "stored.example") is None
    held.release()
    assert adopted.result is True
    entry = served(store, "stored.example")
    assert entry is not None and entry.source == "acme"
    clock.advance(0)
    held.release()
    assert fake.orders == ["app.example"]


def test_concurrentAdoptionsServeOnce(tmp_path: Path) -> None:
    """
    Two adoptions of one name whose files are read at the same time: one
    state, one swap, both answer that the name is served, and nothing is
    ordered; an order of that name meanwhile waits for the same reads and
    orders nothing either.
    """
    manager, fake, clock, store, held = startedHolding(tmp_path)
    swaps: list[object] = []
    store.listeners.append(swaps.append)
    storedElsewhere(manager, fake, "stored.example")
    with capturedLogs() as events:
        first = manager.adoptStored("stored.example")
        second = manager.adoptStored("stored.example")
        ordered = manager.obtain("stored.example")
        assert len(held.calls) == 3 and served(store, "stored.example") is None
        held.release()
    assert first.result is True and second.result is True and ordered.called
    assert len(swaps) == 1 and served(store, "stored.example") is not None
    assert manager.states["stored.example"].onDemand
    assert [e["name"] for e in events if e.get("log_format", "").startswith("ACME: serving")] == ["stored.example"]
    clock.advance(0)
    held.release()
    assert fake.orders == ["app.example"]


def test_concurrentOrdersOrderOnce(tmp_path: Path) -> None:
    """
    Two on-demand orders of a name storage holds nothing for, whose reads
    are at the same time: one order; the second, answered once the first
    was served, neither orders nor serves again.
    """
    manager, fake, clock, store, held = startedHolding(tmp_path)
    swaps: list[object] = []
    store.listeners.append(swaps.append)
    first = manager.obtain("new.example")
    second = manager.obtain("new.example")
    # The first order runs to its end while the second's read waits.
    held.release(keep=1)
    assert first.called and not second.called
    assert fake.orders == ["app.example", "new.example"] and len(swaps) == 1
    entry = served(store, "new.example")
    held.release()
    assert second.called
    clock.advance(0)
    held.release()
    assert fake.orders == ["app.example", "new.example"] and len(swaps) == 1
    assert served(store, "new.example") is entry


def test_stopWhileStorageIsRead(tmp_path: Path) -> None:
    """
    The manager stopped while the files of an on-demand name are read:
    nothing is served, scheduled or ordered once the read is over, and the
    callers are answered.
    """
    manager, fake, clock, store, held = startedHolding(tmp_path)
    storedElsewhere(manager, fake, "stored.example")
    adopted = manager.adoptStored("stored.example")
    ordered = manager.obtain("new.example")
    manager.stopService()
    held.release()
    assert adopted.result is False and ordered.called
    assert served(store, "stored.example") is None and served(store, "new.example") is None
    assert "stored.example" not in manager.states and "new.example" not in manager.states
    clock.advance(DAY)
    held.release()
    assert fake.orders == ["app.example"] and clock.getDelayedCalls() == []


def lockedElsewhere(manager: ACMEManager, name: str) -> bool:
    """Whether another process finds the lock of C{name} held."""
    import subprocess
    import sys

    taking = subprocess.run(
        [sys.executable, "-c",
         "from edgeproxy.acme.storage import Storage;"
         f"print(Storage({manager.storage.root!r}, {manager.settings.directory!r}).lock({name!r}).acquire())"],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert taking.stdout.strip() in ("True", "False"), taking.stderr
    return taking.stdout.strip() == "False"


def test_stopWhileAnOrderReadsStorage(tmp_path: Path) -> None:
    """
    The manager stopped while an order (here, the first one at start) looks
    in storage: no order, and the name's lock is released.
    """
    held = HeldCalls()
    manager, fake, clock, store, _ = managerFor(tmp_path, runInThread=held)
    manager.startService()
    clock.advance(0)
    # The lock taken, the read of storage waits.
    [(acquire, _, locked)] = held.calls
    held.calls.clear()
    maybeDeferred(acquire).chainDeferred(locked)
    assert len(held.calls) == 1
    manager.stopService()
    held.release()
    assert fake.orders == [] and served(store, "app.example") is None
    assert lockedElsewhere(manager, "app.example") is False


def test_restartServesStoredWithoutOrdering(setup: Any, tmp_path: Path) -> None:
    manager, fake, clock, store, metrics = setup
    manager.startService()
    clock.advance(0)
    again = restarted(manager, store, fake, clock)
    again.startService()
    clock.advance(0)
    assert fake.orders == ["app.example"]
    assert served(store, "app.example") is not None


def test_lockHeldElsewhere(setup: Any) -> None:
    """Another process ordering the name: no order here, a look again later."""
    manager, fake, clock, store, metrics = setup
    import subprocess
    import sys

    root = manager.storage.root
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from edgeproxy.acme.storage import Storage;"
         f"l = Storage({root!r}, {manager.settings.directory!r}).lock('app.example'); print(l.acquire(), flush=True);"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "True"  # type: ignore[union-attr]
        manager.startService()
        clock.advance(0)
        assert fake.orders == []
        assert manager.states["app.example"].retryAt == pytest.approx(clock.seconds() + 60)
    finally:
        holder.communicate("", timeout=30)
    clock.advance(60)
    assert fake.orders == ["app.example"]
