# -*- test-case-name: tests.test_bodies -*-
"""
Moving bodies through the proxy without holding them.

L{BodyPipe} carries the client's request body to the backend: it is the
C{IBodyProducer} the Agent reads from, and it pauses the client (the TCP or
TLS transport for HTTP/1.1, the stream for HTTP/2) whenever the backend
cannot take more.  L{ResponseRelay} carries the backend's response body to
the client: it registers the backend connection as a streaming producer on
the client request, so a slow client pauses the backend socket.

Memory per request is therefore bounded by a few socket reads in each
direction, whatever the body size (plus, for a request the pool may retry,
a copy of at most L{BodyPipe.keepForReplay}'s limit).  Both directions
enforce the upstream's idle timeout (no byte moved for C{idle_timeout}
seconds aborts both sides).

A request body can be sent again on another backend (a retry, see
L{edgeproxy.upstream.pool}) while it is I{replayable}: no byte of it has
been handed to a backend connection yet, or every byte handed over is still
kept.  Each attempt reads the body through its own producer
(L{BodyPipe.newAttempt}), so a late call from an attempt the Agent has
given up on cannot disturb the next one.

This module decides nothing about routing, headers or status codes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from edgeproxy.http.errorpages import isHTTP2

log = Logger()

_PENDING = object()
"""L{BodyPipe} outcome before the body is complete or abandoned."""


def abortClient(request: Any) -> None:
    """
    Make the client see that its response is incomplete.

    For HTTP/1.1 the connection is aborted without the terminating zero chunk
    (or before C{Content-Length} bytes), so no client can take a truncated
    body for a complete one (RFC 9112 §6.3, §7.1).  For HTTP/2 only the
    stream is reset (RFC 9113 §8.1); the connection's other streams go on.
    """
    channel = getattr(request, "channel", None)
    if channel is None:
        return
    if isHTTP2(request):
        channel.abortConnection()
        # Twisted forgets a reset stream without telling its request; tell it
        # so that notifyFinish fires and the request's bookkeeping ends.
        request.connectionLost(Failure(ConnectionAborted("stream reset by proxy")))
    elif channel.transport is not None:
        channel.transport.abortConnection()


class IdleTimer:
    """
    Fires C{onIdle} once when C{touch} has not been called for C{timeout}
    seconds.  A timeout of 0 (or less) disables it.
    """

    def __init__(
        self, clock: Any, timeout: float, onIdle: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._onIdle = onIdle
        self._call: IDelayedCall | None = None

    def touch(self) -> None:
        """Restart the countdown (starting it if needed)."""
        if self._timeout <= 0:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self._timeout)
        else:
            self._call = self._clock.callLater(self._timeout, self._fire)

    def stop(self) -> None:
        """Stop counting for good (until the next C{touch})."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def close(self) -> None:
        """
        Stop for good: later touches do nothing, and C{onIdle} is let go
        (it is usually a bound method of the timer's owner, which holds the
        timer: a reference cycle left to the cyclic collector otherwise).
        """
        self.stop()
        self._timeout = 0
        self._onIdle = _nothing

    def _fire(self) -> None:
        self._call = None
        self._onIdle()


def _nothing() -> None:
    pass


class ClientReader:
    """
    Pauses and resumes reading the client's request body.

    HTTP/1.1: the channel's transport (TCP or TLS) is paused, which leaves
    the bytes in the client's send buffer and the kernel's, i.e. TCP flow
    control.  HTTP/2: the stream is paused, which withholds WINDOW_UPDATE
    frames for it (RFC 9113 §5.2) and buffers at most one window.

    C{HTTPChannel} itself pauses and resumes the same transport when its own
    writes back up; the two sources are reconciled by re-asserting our pause
    on every chunk that arrives while we want the client paused (see
    L{BodyPipe.write}), so a resume from the channel costs at most one more
    read, never an unbounded buffer.
    """

    def __init__(self, request: Any) -> None:
        self._request = request
        self.paused = False

    def _target(self) -> Any:
        channel = getattr(self._request, "channel", None)
        if channel is None:
            return None
        if isHTTP2(self._request):
            return channel
        return channel.transport

    def pause(self) -> None:
        """Stop (or keep stopped) reading the client's body."""
        target = self._target()
        self.paused = True
        if target is not None:
            target.pauseProducing()

    def resume(self) -> None:
        """Read the client's body again, if we were the one pausing it."""
        if not self.paused:
            return
        self.paused = False
        target = self._target()
        if target is not None:
            target.resumeProducing()


@implementer(IBodyProducer)
class BodyPipe:
    """
    The client's request body, as the Agent's body producer.

    Chunks written before the Agent starts producing (the backend connection
    is not open yet) or while the backend is paused are kept, and the client
    is paused at the same time, so at most one read's worth is held.

    The pipe can be used directly as the producer of one request; the pool
    gets one producer per attempt from L{newAttempt} instead, so that the
    body can be sent again (see L{replayable}).  Calls made on the pipe
    itself (C{stopProducing} from the request layer when the response came
    first) always apply to the attempt in progress.

    @ivar length: the client's declared length, or C{UNKNOWN_LENGTH} (the
        Agent then sends the body chunked).
    @ivar received: bytes received from the client so far.
    """

    def __init__(
        self,
        length: int | None,
        client: ClientReader,
        clock: Any,
        idleTimeout: float,
        onIdle: Callable[[], None],
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self._client = client
        self._buffer: list[bytes] = []
        self._consumer: IConsumer | None = None
        self._consumerPaused = False
        self._clientDone = False
        self._stopped = False
        self._failed = False
        self._done: Deferred[None] | None = None
        self._failure: Failure | None = None
        self._finishedWaiters: list[Deferred[None]] = []
        self._completed = False
        self._outcome: object = _PENDING
        self._idle = IdleTimer(clock, idleTimeout, onIdle)
        # Replay: the producer of the attempt in progress (the pipe itself
        # until newAttempt is used), whether any byte went to it, and the
        # copies of what went to it while they fit in _keepLimit.
        self._current: object = self
        self._handed = False
        self._keepLimit = 0
        self._kept: list[bytes] | None = None
        self._keptBytes = 0

    # Client side ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        A chunk of the client's body arrived.
        """
        self.received += len(data)
        if self._stopped or self._completed:
            # The backend no longer wants the body (it answered already or
            # went away): drain and discard, so the client can finish.
            return
        self._idle.touch()
        if self._consumer is None or self._consumerPaused or self._buffer:
            self._buffer.append(data)
            self._client.pause()
            return
        self._hand(data)

    def finish(self) -> None:
        """The client's body is complete."""
        self._clientDone = True
        self._maybeComplete()

    def fail(self, reason: Failure) -> None:
        """
        The client's body will not complete (size limit, client gone): make
        the Agent abort the upstream request instead of sending a short body.
        """
        if self._failed or self._stopped or self._completed:
            return
        self._failed = True
        self._completed = True
        self._idle.stop()
        self._buffer = []
        self._kept = None
        # Let the rest of the body drain (it is discarded): an HTTP/2 stream
        # left paused would never deliver its END_STREAM, and the request
        # could never end.
        self._client.resume()
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(reason)
        else:
            self._failure = reason
        self._fireFinished(reason)

    def whenFinished(self) -> Deferred[None]:
        """
        @return: fires when the whole body has been handed to the backend
            connection of the attempt in progress (the start of the response
            timeout); fails if the body is abandoned.
        """
        if self._outcome is _PENDING:
            d: Deferred[None] = Deferred()
            self._finishedWaiters.append(d)
            return d
        if self._outcome is None:
            return succeed(None)
        return fail(self._outcome)

    # Replay ----------------------------------------------------------------

    def keepForReplay(self, limit: int) -> None:
        """
        Keep a copy of what is handed to a backend, as long as the whole
        body so far fits in C{limit} bytes, so that a small body stays
        replayable after it was sent.  Only useful for a request that may
        be retried after it was sent (an idempotent one); must be called
        before the first byte is handed over to have any effect.
        """
        if self.length is not UNKNOWN_LENGTH and self.length > limit:
            return  # declared too long to keep: no copy at all
        self._keepLimit = limit
        if not self._handed and self._kept is None:
            self._kept = []

    @property
    def replayable(self) -> bool:
        """
        Whether the body can still be sent again from its first byte: the
        client has not failed it, it was not abandoned, and no byte of it
        was handed to a backend or every byte handed over is kept.
        """
        return (
            not self._stopped
            and not self._failed
            and (not self._handed or self._kept is not None)
        )

    def newAttempt(self) -> IBodyProducer:
        """
        Start sending the body again, from its first byte, to a new backend
        request.

        @return: the producer to give the Agent for that request; the
            producer of any earlier attempt is ignored from now on.
        @raise ValueError: if the body is not L{replayable}.
        """
        if not self.replayable:
            raise ValueError("request body is not replayable")
        if self._kept:
            self._buffer[:0] = self._kept
        if self._keepLimit:
            self._kept = []
        self._keptBytes = 0
        self._handed = False
        self._consumer = None
        self._consumerPaused = False
        self._done = None
        self._completed = False
        self._outcome = _PENDING
        # The waiters of the abandoned attempt never fire: their attempt
        # is over.
        self._finishedWaiters = []
        if self._buffer and not self._clientDone:
            self._client.pause()
        attempt = _BodyAttempt(self)
        self._current = attempt
        return attempt

    # IBodyProducer -------------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return self._start(self._current, consumer)

    def pauseProducing(self) -> None:
        self._pause(self._current)

    def resumeProducing(self) -> None:
        self._resume(self._current)

    def stopProducing(self) -> None:
        """
        The Agent gave up on the request (backend connection lost, request
        cancelled), or the request layer no longer wants the body sent (the
        response came first).  Per C{IBodyProducer}, the Deferred never
        fires now, and the rest of the body is discarded.
        """
        self._abandon()

    # The attempt in progress ---------------------------------------------

    def _start(self, attempt: object, consumer: IConsumer) -> Deferred[None]:
        if attempt is not self._current:
            return Deferred()  # a stale attempt: never fires
        self._consumer = consumer
        if self._failure is not None:
            failure, self._failure = self._failure, None
            done: Deferred[None] = Deferred()
            done.errback(failure)
            return done
        self._done = Deferred()
        result = self._done
        self._idle.touch()
        self._flush()
        if not self._consumerPaused and not self._buffer:
            self._client.resume()
        self._maybeComplete()
        return result

    def _pause(self, attempt: object) -> None:
        if attempt is not self._current:
            return
        self._consumerPaused = True
        self._client.pause()

    def _resume(self, attempt: object) -> None:
        if attempt is not self._current:
            return
        self._consumerPaused = False
        self._idle.touch()
        self._flush()
        if not self._consumerPaused and not self._buffer:
            self._client.resume()
        self._maybeComplete()

    def _stopAttempt(self, attempt: object) -> None:
        """
        The Agent gave up on C{attempt}.  A body that can be replayed is
        kept (the next attempt sends it); any other is abandoned.
        """
        if attempt is not self._current:
            return
        if not self.replayable:
            self._abandon()
            return
        # Detached: chunks that arrive are held (and the client paused)
        # until the next attempt starts or the pool gives up.
        self._consumer = None
        self._consumerPaused = False
        self._done = None

    def _abandon(self) -> None:
        self._stopped = True
        self._done = None
        self._buffer = []
        self._kept = None
        self._idle.stop()
        self._client.resume()

    # Internals -----------------------------------------------------------

    def _hand(self, data: bytes) -> None:
        """Write C{data} to the backend connection, keeping a copy if asked."""
        self._handed = True
        kept = self._kept
        if kept is not None:
            if self._keptBytes + len(data) <= self._keepLimit:
                kept.append(data)
                self._keptBytes += len(data)
            else:
                self._kept = None
        assert self._consumer is not None
        self._consumer.write(data)

    def _flush(self) -> None:
        while self._buffer and not self._consumerPaused and self._consumer:
            self._hand(self._buffer.pop(0))

    def _maybeComplete(self) -> None:
        if (
            self._clientDone
            and not self._buffer
            and self._done is not None
            and not self._completed
        ):
            self._completed = True
            self._idle.stop()
            done, self._done = self._done, None
            done.callback(None)
            self._fireFinished(None)

    def _fireFinished(self, result: Failure | None) -> None:
        self._outcome = result
        waiters, self._finishedWaiters = self._finishedWaiters, []
        for waiter in waiters:
            if result is None:
                waiter.callback(None)
            else:
                waiter.errback(result)


@implementer(IBodyProducer)
class _BodyAttempt:
    """
    The producer of one attempt to send a L{BodyPipe}'s body: passes the
    Agent's calls on to the pipe while this is the attempt in progress, and
    ignores them afterwards.
    """

    def __init__(self, pipe: BodyPipe) -> None:
        self._pipe = pipe
        self.length = pipe.length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return self._pipe._start(self, consumer)

    def pauseProducing(self) -> None:
        self._pipe._pause(self)

    def resumeProducing(self) -> None:
        self._pipe._resume(self)

    def stopProducing(self) -> None:
        self._pipe._stopAttempt(self)

    def whenFinished(self) -> Deferred[None]:
        """See L{BodyPipe.whenFinished}; never fires once stale."""
        if self._pipe._current is not self:
            return Deferred()
        return self._pipe.whenFinished()


@implementer(IPushProducer)
class _WatchedProducer:
    """
    The backend connection as registered on the client request: passes
    pause/resume through and counts a resume (the client took bytes) as
    activity for the idle timeout.
    """

    def __init__(self, producer: IPushProducer, idle: IdleTimer) -> None:
        self._producer = producer
        self._idle = idle

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._idle.touch()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class ResponseRelay(Protocol):
    """
    Receives the backend's response body (via C{IResponse.deliverBody}) and
    writes it to the client request, which must already have its status and
    headers set.

    @ivar done: fires (with L{None}) once the relay is over, whatever the
        outcome.
    @ivar reason: L{None} when the client's response was finished
        completely, else the L{Failure} that cut it short.
    """

    def __init__(self, request: Any, clock: Any, idleTimeout: float) -> None:
        self._request = request
        self._idle = IdleTimer(clock, idleTimeout, self._timedOut)
        self._producer: _WatchedProducer | None = None
        self._clientGone = False
        self._over = False
        # True while deliverFrom hands over what the response already has:
        # no time passes meanwhile, so the idle countdown starts after it.
        self._holdIdle = False
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        request.notifyFinish().addErrback(self._clientLost)

    def deliverFrom(self, response: Any) -> None:
        """
        C{response.deliverBody(self)}, with the idle countdown started once
        the body the response already holds has been delivered: a body that
        arrived with its head (most small responses) is relayed and over
        before a timer would be armed, so none is scheduled and cancelled
        for it (a C{callLater} per response was 1.5% of the R1 profile).
        """
        self._holdIdle = True
        try:
            response.deliverBody(self)
        finally:
            self._holdIdle = False
        if not self._over and not self._clientGone:
            self._idle.touch()

    def connectionMade(self) -> None:
        if not self._holdIdle:
            self._idle.touch()
        if self._clientGone:
            self.transport.stopProducing()
            return
        self._producer = _WatchedProducer(self.transport, self._idle)
        self._request.registerProducer(self._producer, True)

    def dataReceived(self, data: bytes) -> None:
        if self._clientGone or self._over:
            return
        if not self._holdIdle:
            self._idle.touch()
        self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        # Nothing is relayed after this: no idle timeout either.
        self._idle.close()
        if self._over:
            return
        self._over = True
        if self._clientGone:
            self._settle(reason)
            return
        self._unregister()
        # isinstance, not Failure.check: check builds the qualified name of
        # each class per call (1.8% of the R1 profile, once per response).
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # PotentialDataLoss is a body delimited by the backend closing
            # its connection (no Content-Length, not chunked): that close IS
            # the end of the body (RFC 9112 §6.3 item 8), so the response is
            # as complete as the backend made it.
            self._request.finish()
            self._settle(None)
            return
        log.warn(
            "response body from backend cut short: {why}",
            why=reason.getErrorMessage(),
        )
        abortClient(self._request)
        self._settle(reason)

    # Internals -----------------------------------------------------------

    def _unregister(self) -> None:
        if self._producer is not None:
            self._producer = None
            if getattr(self._request, "channel", None) is not None:
                self._request.unregisterProducer()

    def _clientLost(self, reason: Failure) -> None:
        # The client went away: the backend connection is mid-body and can
        # not go back to the pool, so close it.
        self._clientGone = True
        self._idle.stop()
        self._producer = None
        if self.transport is not None and not self._over:
            self.transport.stopProducing()

    def _timedOut(self) -> None:
        if self._over:
            return
        log.warn("response body idle timeout: aborting backend and client")
        self._over = True
        self._unregister()
        if self.transport is not None:
            self.transport.stopProducing()
        abortClient(self._request)
        self._settle(Failure(ConnectionAborted("idle timeout")))

    def _settle(self, result: Failure | None) -> None:
        if not self.done.called:
            self.reason = result
            self.done.callback(None)
