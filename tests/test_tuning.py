"""
Tests for L{edgeproxy.tuning} (and L{edgeproxy._compat.twisted.reactor}):
what the garbage collector does after L{tuneGarbageCollector} (start-up
objects out of its scans, later garbage still collected) and the line it
logs; that an epoll reactor tuned by L{tuneEventDispatch} (with the fast
paths; left alone without them) still delivers reads, writes and
hang-ups, and that a failing connection is logged and dropped without
stopping the others.
"""

from __future__ import annotations

import gc
import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, globalLogPublisher

from edgeproxy._compat.twisted import tcp
from edgeproxy._compat.twisted.tcp import HOLD_BYTES, HOLD_SECONDS, sendNow
from edgeproxy.tuning import tuneEventDispatch, tuneGarbageCollector
from tests.fastpaths import SHOW_DEPRECATIONS, fastPaths, fastPathsOn  # noqa: F401 (fixtures)

pytestmark = SHOW_DEPRECATIONS


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfreezing() -> Iterator[None]:
    # The test process is not the proxy: give its objects back to the
    # collector afterwards, with its thresholds.
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_startUpObjectsLeaveTheCollectorsScans(unfreezing: None) -> None:
    startUp = Node()
    assert tracked(startUp)
    # Frozen objects freed by reference counting leave the count, so it
    # is only a lower bound on what froze: > 0 is what can be asserted.
    assert tuneGarbageCollector() > 0
    assert not tracked(startUp)
    gc.unfreeze()
    assert tracked(startUp)


def test_laterCyclicGarbageIsStillCollected(unfreezing: None) -> None:
    tuneGarbageCollector()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_objectsInUseStartNoCollection(unfreezing: None) -> None:
    """
    What a busy HTTP/2 connection does: thousands of objects allocated and
    kept for a while (its streams' requests) start no collection, which
    would only find them in use.
    """
    tuneGarbageCollector()
    collections: list[int] = []

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(collected)
    try:
        inUse = [Node() for _ in range(5_000)]
    finally:
        gc.callbacks.remove(collected)
    assert len(inUse) == 5_000
    assert collections == []


def test_logsHowManyObjectsWereFrozen(unfreezing: None) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        frozen = tuneGarbageCollector()
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "edgeproxy.tuning"]
    assert [e["frozen"] for e in mine] == [frozen]
    assert mine[0]["log_format"] == "garbage collector: {frozen} start-up objects frozen"


class Reader:
    """A selectable around one end of a socket pair."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.data: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> object:
        if self.fail:
            raise RuntimeError("handler bug")
        data = self.sock.recv(100)
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        self.data.append(data)
        return None

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


@pytest.fixture
def epoll() -> Iterator[object]:
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    try:
        yield reactor
    finally:
        reactor.removeAll()
        reactor._poller.close()
        for end in (reactor.waker.i, reactor.waker.o):
            try:
                os_close(end)
            except OSError:
                pass


def os_close(fd: int) -> None:
    import os

    os.close(fd)


def test_tunedEpollReactorDeliversReadsAndHangups(epoll: object, fastPaths: bool) -> None:
    """
    With the fast paths the reactor's loop is replaced (and still delivers
    reads and hang-ups); without them it is left as it is, and does.
    """
    assert tuneEventDispatch(epoll) is fastPaths
    assert ("doIteration" in vars(epoll)) is fastPaths
    a, b = socket.socketpair()
    reader = Reader(a)
    epoll.addReader(reader)  # type: ignore[attr-defined]
    b.sendall(b"hello")
    epoll.doIteration(0.5)  # type: ignore[attr-defined]
    assert reader.data == [b"hello"]
    b.close()
    epoll.doIteration(0.5)  # type: ignore[attr-defined]
    assert len(reader.lost) == 1
    a.close()


def test_failingHandlerIsLoggedAndOthersStillServed(epoll: object, fastPaths: bool) -> None:
    tuneEventDispatch(epoll)
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    bad, good = Reader(a1, fail=True), Reader(a2)
    epoll.addReader(bad)  # type: ignore[attr-defined]
    epoll.addReader(good)  # type: ignore[attr-defined]
    b1.sendall(b"x")
    b2.sendall(b"y")
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        epoll.doIteration(0.5)  # type: ignore[attr-defined]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert good.data == [b"y"]
    # Twisted's handler logs the exception and disconnects the selectable.
    assert len(bad.lost) == 1
    assert any("handler bug" in repr(e.get("log_failure", e.get("failure"))) for e in events)
    epoll.removeAll()  # type: ignore[attr-defined]
    for s in (a1, b1, a2, b2):
        s.close()


def test_otherReactorsAreLeftAlone() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    assert tuneEventDispatch(reactor) is False
    assert "doIteration" not in vars(reactor)


# Sends held for a batch of events (edgeproxy._compat.twisted.tcp.holdSends) ---


class Replying(Protocol):
    """On each read, C{reply(self)}; what the other connections' clients
    had received by then is noted in C{seen}."""

    def __init__(self, served: list[Replying], reply: Any) -> None:
        self.served = served
        self.reply = reply
        self.seen: list[bytes] = []

    def connectionMade(self) -> None:
        self.served.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.reply(self)
        for other in self.served:
            if other is not self:
                self.seen.append(received(other.client))


def received(client: socket.socket) -> bytes:
    """What C{client} can read now, without waiting."""
    out = b""
    while True:
        try:
            chunk = client.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        if not chunk:
            return out + b"<EOF>"
        out += chunk


def receivedAll(client: socket.socket, reactor: Any, until: bytes) -> bytes:
    out = b""
    for _ in range(50):
        reactor.doIteration(0.05)
        out += received(client)
        if out.endswith(until):
            break
    return out


def servedPair(reactor: Any, reply: Any, count: int = 2) -> list[Replying]:
    """C{count} connections accepted by C{reactor} (each with its client
    socket as C{.client}), and a read ready on each."""
    served: list[Replying] = []
    factory = Factory.forProtocol(lambda: Replying(served, reply))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        clients.append(client)
        for _ in range(50):
            if len(served) == len(clients):
                break
            reactor.doIteration(0.05)
        served[-1].client = client  # type: ignore[attr-defined]
    port.stopListening()
    for client in clients:
        client.sendall(b"ping")
    # Both reads in the kernel before the next poll.
    time.sleep(0.05)
    return served


def closeAll(served: list[Replying]) -> None:
    for protocol in served:
        protocol.transport.abortConnection()  # type: ignore[union-attr]
        protocol.client.close()  # type: ignore[attr-defined]


def test_smallSendsOfABatchGoAfterIt(epoll: Any, fastPathsOn: None) -> None:
    """
    With the tuned dispatch, what a connection sends while a batch of
    events is dispatched reaches its peer after the batch: no client had
    anything while the others were served, and each had all of its reply,
    in the order written (held sends and Twisted's own write mixed).
    """
    tuneEventDispatch(epoll)

    def reply(protocol: Replying) -> None:
        sendNow(protocol.transport, b"1")
        protocol.transport.write(b"2")  # type: ignore[union-attr]
        sendNow(protocol.transport, b"3")

    served = servedPair(epoll, reply)
    epoll.doIteration(0.5)
    assert [protocol.seen for protocol in served] == [[b""], [b""]]
    assert [receivedAll(p.client, epoll, b"123") for p in served] == [b"123", b"123"]  # type: ignore[attr-defined]
    closeAll(served)


def test_aLargeSendGoesAtOnceAfterWhatWasHeld(epoll: Any, fastPathsOn: None) -> None:
    """
    A send larger than HOLD_BYTES is not held: what was held for its
    connection goes first, then it, while the batch is dispatched.
    """
    tuneEventDispatch(epoll)
    large = b"x" * (HOLD_BYTES + 1)
    went: list[bool] = []

    def reply(protocol: Replying) -> None:
        sendNow(protocol.transport, b"head;")
        went.append(sendNow(protocol.transport, large))

    served = servedPair(epoll, reply)
    epoll.doIteration(0.5)
    assert went == [True, True]
    assert sorted(len(protocol.seen[0]) for protocol in served) == [0, len(large) + 5]
    # The one served second read all of the first's reply meanwhile; its
    # own comes after.
    second = next(p for p in served if p.seen[0])
    assert second.seen[0] == b"head;" + large
    assert receivedAll(second.client, epoll, large) == b"head;" + large  # type: ignore[attr-defined]
    closeAll(served)


def test_heldSendsGoBeforeTheConnectionCloses(epoll: Any, fastPathsOn: None) -> None:
    tuneEventDispatch(epoll)

    def reply(protocol: Replying) -> None:
        sendNow(protocol.transport, b"bye")
        protocol.transport.loseConnection()  # type: ignore[union-attr]

    served = servedPair(epoll, reply)
    epoll.doIteration(0.5)
    assert [receivedAll(p.client, epoll, b"<EOF>") for p in served] == [b"bye<EOF>"] * 2  # type: ignore[attr-defined]
    for protocol in served:
        protocol.client.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", ["untuned", "past the bound"])
def test_sendsThatGoAtOnce(epoll: Any, fastPathsOn: None, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """
    A send goes at once without the tuned dispatch (a test's reactor), and
    past HOLD_TRANSPORTS connections holding sends (then what they hold
    goes too), so that a large batch delays no send by more than that many
    connections' work: the connection served second sees the first's reply.
    """
    if case == "past the bound":
        monkeypatch.setattr(tcp, "HOLD_TRANSPORTS", 1)
        tuneEventDispatch(epoll)

    def reply(protocol: Replying) -> None:
        sendNow(protocol.transport, b"r")

    served = servedPair(epoll, reply)
    epoll.doIteration(0.5)
    assert sorted(protocol.seen for protocol in served) == [[b""], [b"r"]]
    closeAll(served)


def test_heldNoLongerThanHoldSeconds(epoll: Any, fastPathsOn: None) -> None:
    """
    An event that takes long does not hold back what the events before it
    sent: past HOLD_SECONDS it goes after the event, and the connection
    served next sees it.
    """
    tuneEventDispatch(epoll)

    def reply(protocol: Replying) -> None:
        sendNow(protocol.transport, b"r")
        time.sleep(HOLD_SECONDS * 3)

    served = servedPair(epoll, reply)
    epoll.doIteration(0.5)
    assert sorted(protocol.seen for protocol in served) == [[b""], [b"r"]]
    closeAll(served)


def test_heldSendsGoBeforeTheirConnectionsEnd(epoll: Any, fastPathsOn: None) -> None:
    """
    A reply held for a connection whose client has closed its side, the
    close read later in the same batch, still reaches the client before
    the connection ends (a client may close its side once its request is
    sent).
    """
    tuneEventDispatch(epoll)
    served: list[Protocol] = []
    ended: list[int] = []

    class AnswersOnTheSecond(Protocol):
        def connectionMade(self) -> None:
            served.append(self)

        def dataReceived(self, data: bytes) -> None:
            sendNow(served[1].transport, b"answer")

        def connectionLost(self, reason: object) -> None:
            ended.append(served.index(self))

    port = epoll.listenTCP(0, Factory.forProtocol(AnswersOnTheSecond), interface="127.0.0.1")
    clients = []
    for _ in range(2):
        clients.append(socket.create_connection(("127.0.0.1", port.getHost().port)))
        for _ in range(50):
            if len(served) == len(clients):
                break
            epoll.doIteration(0.05)
    port.stopListening()
    # Ready in this order: the first's read, then the second's end.
    clients[0].sendall(b"go")
    clients[1].shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    epoll.doIteration(0.5)
    assert ended == [1]
    assert receivedAll(clients[1], epoll, b"<EOF>") == b"answer<EOF>"
    served[0].transport.abortConnection()  # type: ignore[union-attr]
    for client in clients:
        client.close()
