# -*- test-case-name: tests.test_bodies -*-
"""
The client's request body on its way to a backend, without holding it.

L{BodyPipe} is the C{IBodyProducer} the backend connection reads the body
from; it pauses the client (through a L{ClientReader}: the connection's
transport for HTTP/1.1, the stream for HTTP/2) whenever the backend cannot
take more, so memory per request is bounded by a read or two whatever the
body size (plus, for a request the pool may retry, a copy of at most
L{BodyPipe.keepForReplay}'s limit).  It enforces the upstream's idle
timeout (no byte moved for C{idle_timeout} seconds aborts the request) with
an L{IdleTimer}, which the client side also uses for response bodies.

L{PiecedBody} is the other direction's common part: a response body that
delivers itself a piece a reactor turn while its client takes it (a file
of the cache's disk tier, a body held whole that is too large to write at
once).

It lives below both sides: the client side (L{edgeproxy.http}) fills it,
the backend side (L{edgeproxy.upstream}) reads it, and neither imports the
other.

A request body can be sent again on another backend (a retry, see
L{edgeproxy.upstream.pool}) while it is I{replayable}: no byte of it has
been handed to a backend connection yet, or every byte handed over is still
kept.  Each attempt reads the body through its own producer
(L{BodyPipe.newAttempt}), so a late call from an attempt the backend connection has
given up on cannot disturb the next one.

This module decides nothing about routing, fields or status codes.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

BODY_DONE = Failure(ResponseDone("Response body fully received"))
"""The reason a body's protocol gets in C{connectionLost} when the body is
complete: one instance, for request and response bodies alike."""

_PENDING = object()
"""L{BodyPipe} outcome before the body is complete or abandoned."""


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


@implementer(IPushProducer)
class PiecedBody:
    """
    A response body that delivers itself to its protocol (a call) a piece
    at a time, the next pieces a reactor turn later, while not paused: the
    client side registers it as its transport's producer, so a client that
    does not take more pauses it.  A subclass gives L{_pump} (deliver what
    one turn may; L{_again} when more is left), L{_more} and L{_end}.
    """

    __slots__ = ("_clock", "_protocol", "_paused", "_scheduled")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._protocol: Any = None
        self._paused = False
        self._scheduled: Any = None
        """The reactor call that delivers more, or L{None}."""

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        protocol.makeConnection(self)
        self._pump()

    def _pump(self) -> None:
        raise NotImplementedError

    def _more(self) -> bool:
        """Whether anything is left to deliver."""
        raise NotImplementedError

    def _end(self, reason: Failure) -> None:
        """Finish (once): the protocol's C{connectionLost} with C{reason}."""
        raise NotImplementedError

    def _again(self) -> None:
        """Deliver more on the reactor's next turn."""
        self._scheduled = self._clock.callLater(0, self._pump)

    def _cancel(self) -> None:
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is not None and scheduled.active():
            scheduled.cancel()

    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._scheduled is None and self._more():
            self._again()

    def stopProducing(self) -> None:
        self._cancel()
        self._end(Failure(ConnectionAborted("stopped")))


class ClientReader(Protocol):
    """
    What a L{BodyPipe} pauses and resumes: the reading of the client's body.

    HTTP/1.1 pauses the connection's transport (TCP or TLS), which leaves
    the bytes in the client's send buffer and the kernel's, i.e. TCP flow
    control; HTTP/2 pauses the stream, which withholds its WINDOW_UPDATE
    frames (RFC 9113 5.2) and buffers at most one window.  C{resume} only
    undoes this reader's own pause.
    """

    def pause(self) -> None:
        """Stop (or keep stopped) reading the client's body."""

    def resume(self) -> None:
        """Read the client's body again, if this reader paused it."""


@implementer(IBodyProducer)
class BodyPipe:
    """
    The client's request body, as the body producer of a backend request.

    Chunks written before the backend connection starts reading (the backend connection
    is not open yet) or while the backend is paused are kept, and the client
    is paused at the same time, so at most one read's worth is held.

    The pipe can be used directly as the producer of one request; the pool
    gets one producer per attempt from L{newAttempt} instead, so that the
    body can be sent again (see L{replayable}).  Calls made on the pipe
    itself (C{stopProducing} from the request layer when the response came
    first) always apply to the attempt in progress.

    @ivar length: the client's declared length, or C{UNKNOWN_LENGTH} (the
        backend connection then sends the body chunked).
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
        the backend connection abort the request instead of sending a short body.
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
        # A Failure by now (the sentinel and None are handled above), but an
        # object() sentinel cannot narrow the attribute's type for mypy.
        return fail(self._outcome)  # type: ignore[arg-type]

    # Replay ----------------------------------------------------------------

    def keepForReplay(self, limit: int) -> None:
        """
        Keep a copy of what is handed to a backend, as long as the whole
        body so far fits in C{limit} bytes, so that a small body stays
        replayable after it was sent.  Only useful for a request that may
        be retried after it was sent (an idempotent one); must be called
        before the first byte is handed over to have any effect.
        """
        # Twisted types its UNKNOWN_LENGTH sentinel as a plain str, so the
        # identity check cannot narrow length to int for mypy.
        if self.length is not UNKNOWN_LENGTH and self.length > limit:  # type: ignore[operator]
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

    def newAttempt(self) -> _BodyAttempt:
        """
        Start sending the body again, from its first byte, to a new backend
        request.

        @return: the producer to give the backend connection for that request; the
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
        The backend connection gave up on the request (backend connection lost, request
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
        The backend connection gave up on C{attempt}.  A body that can be replayed is
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
    backend connection's calls on to the pipe while this is the attempt in progress, and
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
