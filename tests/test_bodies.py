"""
Tests for L{edgeproxy.bodies}: the request body pipe and its idle timer, in
memory (StringTransport, Clock), asserting on what reaches the backend
consumer and whether the client is paused.  (Response bodies are the
client side's: L{tests.test_server}.)
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from edgeproxy.bodies import BodyPipe, ClientReader, IdleTimer


class FakeClient(ClientReader):
    """A client whose pause state is visible (a real transport underneath)."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.paused = False

    def pause(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()


class Consumer(StringTransport):
    """The backend connection as the Agent's consumer."""


def makePipe(length: int | None = 10, idle: float = 0) -> tuple[BodyPipe, FakeClient, Clock, list[str]]:
    client = FakeClient()
    clock = Clock()
    idled: list[str] = []
    pipe = BodyPipe(length, client, clock, idle, lambda: idled.append("idle"))
    return pipe, client, clock, idled


def test_lengthIsClientsOrUnknown() -> None:
    assert makePipe(10)[0].length == 10
    assert makePipe(None)[0].length is UNKNOWN_LENGTH


def test_bytesBeforeStartAreKeptAndClientPaused() -> None:
    pipe, client, _, _ = makePipe()
    pipe.write(b"early")
    assert client.transport.producerState == "paused"
    consumer = Consumer()
    done = pipe.startProducing(consumer)
    assert consumer.value() == b"early"
    assert client.transport.producerState == "producing"
    pipe.write(b"later")
    assert consumer.value() == b"earlylater"
    assert not done.called
    pipe.finish()
    assert done.called


def test_finishBeforeStartCompletesOnStart() -> None:
    pipe, _, _, _ = makePipe(4)
    pipe.write(b"body")
    pipe.finish()
    finished = pipe.whenFinished()
    assert not finished.called
    consumer = Consumer()
    done = pipe.startProducing(consumer)
    assert consumer.value() == b"body"
    assert done.called and finished.called


def test_backendPausePausesClient() -> None:
    pipe, client, _, _ = makePipe()
    consumer = Consumer()
    pipe.startProducing(consumer)
    pipe.pauseProducing()
    assert client.transport.producerState == "paused"
    pipe.write(b"held")
    assert consumer.value() == b""
    pipe.resumeProducing()
    assert consumer.value() == b"held"
    assert client.transport.producerState == "producing"


def test_failAbortsUpload() -> None:
    pipe, _, _, _ = makePipe()
    done = pipe.startProducing(Consumer())
    failures: list[Failure] = []
    done.addErrback(failures.append)
    pipe.fail(Failure(ValueError("too large")))
    assert failures and failures[0].check(ValueError)


def test_failResumesPausedClientSoTheBodyDrains() -> None:
    pipe, client, _, _ = makePipe()
    pipe.write(b"waiting for the backend")
    assert client.transport.producerState == "paused"
    pipe.fail(Failure(ValueError("backend down")))
    assert client.transport.producerState == "producing"
    pipe.write(b"rest")
    pipe.finish()
    assert client.transport.producerState == "producing"


def test_stopProducingDiscardsAndResumesClient() -> None:
    pipe, client, _, _ = makePipe()
    consumer = Consumer()
    done = pipe.startProducing(consumer)
    pipe.pauseProducing()
    pipe.write(b"x")
    pipe.stopProducing()
    assert client.transport.producerState == "producing"
    pipe.write(b"more")
    pipe.finish()
    assert consumer.value() == b""
    assert not done.called  # IBodyProducer: never fires after stopProducing


def test_uploadIdleTimeout() -> None:
    pipe, _, clock, idled = makePipe(idle=5)
    pipe.startProducing(Consumer())
    clock.advance(4)
    pipe.write(b"a")
    clock.advance(4)
    assert idled == []
    clock.advance(1.5)
    assert idled == ["idle"]


def test_idleTimerDisabledAtZero() -> None:
    clock = Clock()
    fired: list[int] = []
    timer = IdleTimer(clock, 0, lambda: fired.append(1))
    timer.touch()
    clock.advance(1000)
    assert fired == [] and not clock.getDelayedCalls()


def test_whenFinishedAfterTheFact() -> None:
    pipe, _, _, _ = makePipe(1)
    pipe.startProducing(Consumer())
    pipe.write(b"x")
    pipe.finish()
    assert pipe.whenFinished().called
    failed, _, _, _ = makePipe(1)
    failed.fail(Failure(ValueError("cut")))
    failures: list[Failure] = []
    failed.whenFinished().addErrback(failures.append)
    assert failures and failures[0].check(ValueError)


# Replay (retries) ----------------------------------------------------------


def test_bodyNotStartedIsReplayedWhole() -> None:
    # The first attempt's connection was refused: the Agent never read the
    # body, and the second attempt sends all of it.
    pipe, client, _, _ = makePipe(9)
    first = pipe.newAttempt()
    pipe.write(b"part one ")
    assert pipe.replayable
    first.stopProducing()  # the Agent gives up on the failed attempt
    assert pipe.replayable
    pipe.write(b"two")  # held, not discarded
    assert client.transport.producerState == "paused"
    second = pipe.newAttempt()
    consumer = Consumer()
    done = second.startProducing(consumer)
    pipe.finish()
    assert consumer.value() == b"part one two"
    assert done.called
    assert client.transport.producerState == "producing"


def test_streamedBodyPartlySentIsNotReplayable() -> None:
    pipe, client, _, _ = makePipe(None)
    first = pipe.newAttempt()
    consumer = Consumer()
    first.startProducing(consumer)
    pipe.write(b"streamed")
    assert consumer.value() == b"streamed"
    assert not pipe.replayable
    first.stopProducing()
    # Abandoned: the rest drains and is discarded, the client is not held.
    pipe.write(b"more")
    assert client.transport.producerState == "producing"
    try:
        pipe.newAttempt()
    except ValueError:
        pass
    else:
        raise AssertionError("a partly sent streamed body was replayed")


def test_smallBodyKeptIsReplayedAfterItWasSent() -> None:
    pipe, _, _, _ = makePipe(10)
    pipe.keepForReplay(16)
    first = pipe.newAttempt()
    sent = Consumer()
    firstDone = first.startProducing(sent)
    pipe.write(b"01234")
    pipe.write(b"56789")
    pipe.finish()
    assert sent.value() == b"0123456789" and firstDone.called
    assert pipe.replayable
    first.stopProducing()
    second = pipe.newAttempt()
    again = Consumer()
    secondDone = second.startProducing(again)
    assert again.value() == b"0123456789"
    assert secondDone.called
    finished: list[object] = []
    second.whenFinished().addCallback(finished.append)  # type: ignore[attr-defined]
    assert finished == [None]


def test_bodyOverTheKeepLimitIsNotReplayableOnceSent() -> None:
    pipe, _, _, _ = makePipe(None)
    pipe.keepForReplay(8)
    first = pipe.newAttempt()
    first.startProducing(Consumer())
    pipe.write(b"1234")
    assert pipe.replayable
    pipe.write(b"56789")  # 9 bytes: no longer all kept
    assert not pipe.replayable


def test_staleAttemptCannotDisturbTheNextOne() -> None:
    # Twisted's client errbacks the request before it calls stopProducing:
    # the retry may already be under way when the old attempt is stopped.
    pipe, client, _, _ = makePipe(4)
    first = pipe.newAttempt()
    pipe.write(b"ab")
    second = pipe.newAttempt()
    consumer = Consumer()
    done = second.startProducing(consumer)
    first.stopProducing()
    first.pauseProducing()
    assert not first.startProducing(Consumer()).called
    assert client.transport.producerState == "producing"
    pipe.write(b"cd")
    pipe.finish()
    assert consumer.value() == b"abcd"
    assert done.called


def test_failedBodyIsNotReplayable() -> None:
    pipe, _, _, _ = makePipe(4)
    pipe.newAttempt()
    pipe.fail(Failure(ValueError("client gone")))
    assert not pipe.replayable


def test_requestLayerStopAppliesToTheCurrentAttempt() -> None:
    # The response came before the body: the request layer stops the pipe
    # itself, whichever attempt is in progress.
    pipe, client, _, _ = makePipe(10)
    pipe.newAttempt()
    second = pipe.newAttempt()
    consumer = Consumer()
    second.startProducing(consumer)
    second.pauseProducing()
    pipe.write(b"x")
    pipe.stopProducing()
    assert client.transport.producerState == "producing"
    pipe.write(b"y")
    second.resumeProducing()
    assert consumer.value() == b""
    assert not pipe.replayable


def test_bodyDeclaredOverTheKeepLimitIsNeverCopied() -> None:
    pipe, _, _, _ = makePipe(100)
    pipe.keepForReplay(64)
    attempt = pipe.newAttempt()
    attempt.startProducing(Consumer())
    assert pipe.replayable  # nothing sent yet
    pipe.write(b"x")
    assert not pipe.replayable


def test_closedIdleTimerLetsGoOfItsOwner() -> None:
    """
    A timer's C{onIdle} is usually a bound method of its owner, which holds
    the timer: once closed, the timer neither fires nor keeps the owner
    alive (reference counting frees both, no cyclic collector needed).
    """
    import gc
    import weakref

    clock = Clock()

    class Owner:
        def __init__(self) -> None:
            self.fired = 0
            self.timer = IdleTimer(clock, 3, self.onIdle)

        def onIdle(self) -> None:
            self.fired += 1

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        owner = Owner()
        owner.timer.touch()
        owner.timer.close()
        owner.timer.touch()
        assert clock.getDelayedCalls() == []
        gone = weakref.ref(owner)
        del owner
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
