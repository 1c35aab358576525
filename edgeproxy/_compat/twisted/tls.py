# -*- test-case-name: tests.test_tls_transport -*-
"""
The server TLS transport of the fast paths, L{EdgeTLSTransport}: Twisted's
C{BufferingTLSTransport} with the record path of
L{edgeproxy._compat.pyopenssl} and less memory per idle connection.  It
overrides and reads C{TLSMemoryBIOProtocol}'s private methods and
attributes (listed in docs/architecture.rst).

Writes.  Twisted's C{TLSMemoryBIOProtocol._write} hands OpenSSL 16 KiB at a
time through pyOpenSSL's C{Connection.send} and, after each, reads the
memory BIO through C{Connection.bio_read} (a 32 KiB buffer per call) and
writes the record to the TCP transport: for a 64 KiB write, four rounds of
slicing, buffer allocation, error checks and transport calls.
L{EdgeTLSTransport._write} encrypts a write of up to L{WRITE_CHUNK} bytes
at once (L{edgeproxy._compat.pyopenssl.encrypt}) and hands its records to
the TCP transport in one write, straight to the socket when nothing is
queued (L{edgeproxy._compat.twisted.tcp.sendNow}).  A larger write (a
1 MiB cache hit) goes a chunk at a time, each encrypted into one buffer
kept for all connections and sent before the next is encrypted, for as
long as the kernel takes each chunk whole: the records are still in the
CPU's cache when the kernel copies them, the first bytes leave before the
last are encrypted, and TCP gets the response as fast as it is encrypted,
not in one burst that its pacing (BBR's, fq's) then spreads out with
timers.  Once the kernel leaves part of a chunk, the rest of the
write is encrypted at once and queued behind it, as a write that size
always was (a slow peer then pauses the producer).  Errors go the way
Twisted's do: a C{WantReadError} buffers the rest of the write until the
peer's bytes arrive, any other error shuts the TLS connection down with it.

Reads (L{EdgeTLSTransport._flushReceiveBIO}) and handshake flights
(C{_flushSendBIO}) go the same way (L{edgeproxy._compat.pyopenssl.decrypt},
L{takeRecords <edgeproxy._compat.pyopenssl.takeRecords>}), flights straight
to the socket unless the connection was aborted.

edgeproxy's TLS listeners build L{EdgeTLSTransport} from their first
connection (C{edgeproxy.serve.listeners.tlsServerFactory} sets their
C{TLSMemoryBIOFactory}'s C{protocol}).  For the store's connection creator
used any other way, as with L{twisted.internet.endpoints.wrapServerTLS},
L{adopt} turns the C{BufferingTLSTransport} built for each connection into
an L{EdgeTLSTransport} (same class layout, two methods more) and sets that
factory to build L{EdgeTLSTransport} from then on.  Both only with the
TLS fast paths on (L{edgeproxy._compat.FastPaths.tls}).
C{tests.test_tls_transport} moves bytes through it both ways, across
handshakes, errors and buffered writes, against Twisted's own transport.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol, _PullToPush
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer

from edgeproxy._compat.pyopenssl import (
    RecordBuffer,
    decrypt,
    encrypt,
    forgetHandshakeState,
    plaintextFitting,
    takeRecords,
)
from edgeproxy._compat.twisted.tcp import sendNow

__all__ = ["MAX_PENDING", "WRITE_CHUNK", "EdgeTLSTransport", "adopt"]

MAX_PENDING = 64_000
"""
Bytes of small writes held for the next reactor turn before they are
encrypted at once (Twisted's C{_AggregateSmallWrites.MAX_BUFFER_SIZE}).
"""


WRITE_CHUNK = plaintextFitting(FileDescriptor.SEND_LIMIT)
"""
The plaintext a large write is encrypted and sent in at a time: the most,
in whole records, whose records the TCP transport sends in one call (its
C{SEND_LIMIT}, 128 KiB: seven records of 16 KiB).
"""

_chunkBuffer = RecordBuffer(WRITE_CHUNK)
"""
The records of one chunk, shared by every connection: only the reactor's
thread writes, and each chunk's records are sent, or copied into the
queue by C{sendNow}, before the next is encrypted.
"""


class EdgeTLSTransport(BufferingTLSTransport):
    """
    C{BufferingTLSTransport} with the record path described in the module
    docstring, a connection set-up without Twisted's redundant interface
    copying, and L{writeNow}; nothing else differs.

    Memory of an idle connection.  Twisted's C{BufferingTLSTransport}
    gives every connection an C{_AggregateSmallWrites} (an object, its
    dictionary, a list and a bound method: about 0.3 KiB for as long as the
    connection lives); the same aggregation is done here in three
    attributes whose defaults stand for "nothing pending", and the list
    exists only while writes wait for the reactor's next turn (the same for
    Twisted's C{_appSendBuffer}, see its class default).  Every attribute
    set later in an open connection's life is set in L{__init__} (see there
    why).  The producer registered with the TCP transport is a slotted
    L{_Membrane} instead of Twisted's C{_ProducerMembrane}, and once the
    handshake is done the pyOpenSSL connection drops what only the
    handshake needs (L{edgeproxy._compat.pyopenssl.forgetHandshakeState}).
    """

    _pending: list[bytes] | None = None
    """Small writes waiting for the next reactor turn, or L{None}."""

    _pendingLeft = MAX_PENDING
    """How many more bytes L{_pending} takes before it is written at once."""

    _pendingCall: Any = None
    """The reactor call that writes L{_pending}, or L{None}."""

    _writesClosed = False
    """Set when the connection is lost: writes are dropped from then on."""

    _appSendBuffer: Any = ()
    """
    Twisted's list of writes waiting for the handshake or for the peer;
    an empty tuple, not a list, while nothing waits (every connection but
    a few), which Twisted only ever tests for truth.
    """

    # Twisted's, declared: the TCP transport (an optional ITransport to
    # Twisted), and the producer registered with it (a None class default
    # in Twisted's untyped code).
    transport: Any
    _producer: Any

    traffic: Any = None
    """
    When set (by L{edgeproxy.http.listener}), an object whose C{sent} is
    increased by the bytes the application writes (before encryption).
    Counted here rather than by wrapping C{write} on every connection: the
    wrappers cost about 300 bytes per idle connection.
    """

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        # TLSMemoryBIOProtocol's, not BufferingTLSTransport's: that one
        # makes the aggregator and puts its write on the instance; the
        # class's write below aggregates (and counts) instead.
        TLSMemoryBIOProtocol.__init__(self, factory, wrappedProtocol, _connectWrapped)
        # Every name set later in an open connection's life, set now to its
        # class default (and set back to it, never deleted): a name first
        # set after a burst of connections (the end of the handshake, small
        # writes held, a producer registered: every HTTP/2 connection) no
        # longer fits the class's shared keys, and every connection from
        # then on gets a dictionary of its own
        # (edgeproxy._compat.twisted.tcp._placeLateNames says more).
        # Names set only as a connection closes are left out: that
        # dictionary lives as long as the closing does.  Those of
        # makeConnection are set too: behind a PROXY-protocol listener it
        # runs only once the header has been read.
        self._tlsConnection = None
        self.transport = None
        self.connected = 0
        self.traffic = None
        # The declaration makeConnection replaces (the class's interfaces
        # only until then; zope shares the object among instances).
        directlyProvides(self)
        self._handshakeDone = False
        # (Twisted's unregisterProducer sets this one on the transport
        # itself, for every large body that paused its producer.)
        self._producerPaused = False
        self._pending = None
        self._pendingLeft = MAX_PENDING
        self._pendingCall = None
        self._producer = None
        self._appSendBuffer = ()

    def write(self, bytes: bytes) -> None:  # noqa: A002 -- Twisted's name
        if self._writesClosed:
            # Dropped, and not counted, as Twisted drops them.
            return
        traffic = self.traffic
        if traffic is not None:
            traffic.sent += len(bytes)
        self._aggregate(bytes)

    def writeSequence(self, sequence: Any) -> None:
        # Joined first, as Twisted does: a TypeError surfaces here, not in
        # the reactor's next turn.
        data = b"".join(sequence)
        if self._writesClosed:
            return
        traffic = self.traffic
        if traffic is not None:
            traffic.sent += len(data)
        self._aggregate(data)

    def writeNow(self, data: bytes | memoryview) -> None:
        """
        Write C{data} and encrypt and send it, with anything held, now: for
        a writer that knows nothing follows soon (a complete response).  The
        next reactor turn (and the timer that waits for it) is not worth it
        then.
        """
        if self._writesClosed:
            return
        traffic = self.traffic
        if traffic is not None:
            traffic.sent += len(data)
        pending = self._pending
        if pending:
            # (data may be a view: of a body held whole, see
            # edgeproxy.http.answering._Pieces.)
            pending.append(data + b"" if type(data) is bytes else bytes(data))
            call = self._pendingCall
            if call is not None:
                self._pendingCall = None
                call.cancel()
            self._flushPending()
            return
        TLSMemoryBIOProtocol.write(self, data)

    def _aggregate(self, data: bytes) -> None:
        """
        What C{_AggregateSmallWrites.write} does: hold small writes until
        the reactor's next turn and encrypt them together, or at once when
        more than L{MAX_PENDING} bytes are held.
        """
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        # A copy of a bytearray or memoryview the caller may change later.
        pending.append(data + b"")
        left = self._pendingLeft - len(data)
        self._pendingLeft = left
        if left < 0:
            self._flushPending()
            return
        if self._pendingCall is None:
            self._pendingCall = self.factory._clock.callLater(0, self._pendingDue)

    def _pendingDue(self) -> None:
        self._pendingCall = None
        self._flushPending()

    def _flushPending(self) -> None:
        """Encrypt and send the held writes (C{_AggregateSmallWrites.flush})."""
        pending = self._pending
        if pending:
            # Back to the defaults: an idle connection holds no list.
            self._pending = None
            self._pendingLeft = MAX_PENDING
            TLSMemoryBIOProtocol.write(self, b"".join(pending))

    def loseConnection(self) -> None:
        self._flushPending()
        TLSMemoryBIOProtocol.loseConnection(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # C{_AggregateSmallWrites.close}, then writes are dropped.
        call = self._pendingCall
        if call is not None:
            self._pendingCall = None
            call.cancel()
        self._flushPending()
        self._writesClosed = True
        TLSMemoryBIOProtocol.connectionLost(self, reason)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        C{TLSMemoryBIOProtocol.registerProducer} with a slotted
        L{_Membrane} (the HTTP channel registers itself on every
        connection, for as long as it lives).
        """
        if self._lostTLSConnection:
            producer.stopProducing()
            return
        if not streaming:
            producer = streamingProducer = _PullToPush(producer, self)
        membrane = _Membrane(producer)
        # Raises if a producer is already registered, as Twisted's does.
        self.transport.registerProducer(membrane, True)
        self._producer = membrane
        if not streaming:
            streamingProducer.startStreaming()

    def _bufferedWrite(self, octets: bytes) -> None:
        if type(self._appSendBuffer) is tuple:
            self._appSendBuffer = []
        TLSMemoryBIOProtocol._bufferedWrite(self, octets)

    def _unbufferPendingWrites(self) -> None:
        TLSMemoryBIOProtocol._unbufferPendingWrites(self)
        # Twisted leaves a new empty list behind: back to the default.
        # (Reading __dict__ instead would give the instance a dictionary
        # of its own.)
        buffer = self._appSendBuffer
        if not buffer and type(buffer) is list:
            self._appSendBuffer = ()

    def _checkHandshakeStatus(self) -> None:
        TLSMemoryBIOProtocol._checkHandshakeStatus(self)
        if self._handshakeDone:
            if getattr(self._tlsConnection, "closeAfterHandshake", False):
                # A TLS-ALPN-01 validation (edgeproxy.tls.store): nothing
                # follows its handshake (RFC 8737 §3).
                self.loseConnection()
            forgetHandshakeState(self._tlsConnection)
            # The empty list Twisted's makeConnection gave a connection
            # built as BufferingTLSTransport and converted by adopt().
            buffer = self._appSendBuffer
            if not buffer and type(buffer) is list:
                self._appSendBuffer = ()

    def makeConnection(self, transport: Any) -> None:
        """
        What C{TLSMemoryBIOProtocol.makeConnection} does, without its loop
        of C{directlyProvides(self, interface)} over the TCP transport's
        interfaces: each call replaces the previous one's declaration, and
        C{ProtocolWrapper.makeConnection}, which it calls next for a server
        connection, declares all of them at once anyway (ten zope
        declarations per connection, for nothing).
        """
        if not self._connectWrapped:
            super().makeConnection(transport)
            return
        self._tlsConnection = self.factory._creatorCallable(self)
        # No list for _appSendBuffer: the class default stands for an empty
        # one until a write has to wait (_bufferedWrite).
        # Twisted's order otherwise: declare the transport's interfaces,
        # set the transport, register with the factory, connect the
        # application protocol (all in ProtocolWrapper.makeConnection), then
        # start the handshake.
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def _flushReceiveBIO(self) -> None:
        """
        Twisted's loop (deliver every record OpenSSL can decrypt, then send
        what OpenSSL wants sent), through
        L{edgeproxy._compat.pyopenssl.decrypt}; the error that ends the
        reading is handled as Twisted handles it.
        """
        if not self._lostTLSConnection:
            chunks, error = decrypt(self._tlsConnection)
            for chunk in chunks:
                if self._lostTLSConnection:
                    break
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, chunk)
            if error is not None and not self._lostTLSConnection:
                if isinstance(error, SSL.ZeroReturnError):
                    # The peer's close_notify: as Twisted does.
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                else:
                    self._tlsShutdownFinished(Failure(error))
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """
        Send what OpenSSL put in the send BIO (handshake messages, alerts,
        tickets), straight to the socket when nothing is queued, except on
        an aborted connection, whose queue Twisted discards (an alert or
        close_notify must not reach the peer then).
        """
        connection = self._tlsConnection
        if connection is None:
            return
        records = takeRecords(connection)
        if not records:
            return
        if self._aborted:
            self.transport.writeSequence(records)
        else:
            self._sendRecords(records)

    def _sendRecords(self, records: list[Any]) -> bool:
        """Send C{records} as one write (L{sendNow}); whether all of them
        went to the socket."""
        return sendNow(self.transport, records[0] if len(records) == 1 else b"".join(records))

    def _write(self, bytes: bytes) -> None:  # noqa: A002 -- Twisted's name
        if self._lostTLSConnection:
            return
        if len(bytes) > WRITE_CHUNK:
            self._writeChunks(memoryview(bytes))
            return
        records, sent, failed = encrypt(self._tlsConnection, bytes, _chunkBuffer)
        if records:
            self._sendRecords(records)
        if failed is not None:
            self._writeFailed(failed, bytes[sent:])

    def _writeChunks(self, data: memoryview) -> None:
        """
        Encrypt and send a large write a chunk at a time while the kernel
        takes each whole, then the rest at once (see the module docstring).
        """
        connection = self._tlsConnection
        total = len(data)
        done = 0
        straight = True
        while done < total:
            if not straight:
                # The peer is slower than the write: the rest is encrypted
                # at once and queued behind what the kernel left.
                records, sent, failed = encrypt(connection, data[done:])
            elif total - done > WRITE_CHUNK:
                records, sent, failed = encrypt(
                    connection, data[done : done + WRITE_CHUNK], _chunkBuffer, more=True
                )
            else:
                records, sent, failed = encrypt(connection, data[done:], _chunkBuffer)
            done += sent
            if records:
                straight = self._sendRecords(records)
            if failed is not None:
                self._writeFailed(failed, data[done:].tobytes())
                return

    def _writeFailed(self, failed: SSL.Error, rest: bytes) -> None:
        """
        Answer the error that stopped a write as Twisted does; C{rest}:
        what it left unencrypted.
        """
        if isinstance(failed, SSL.WantReadError):
            # Twisted's own answer: keep the rest until the peer's bytes
            # arrive (dataReceived calls _unbufferPendingWrites).
            self._bufferedWrite(rest)
            return
        self._tlsShutdownFinished(Failure(failed))


@implementer(IPushProducer)
class _Membrane:
    """
    Twisted's C{_ProducerMembrane} with slots: the producer the TLS
    transport registers with the TCP transport, so that pauses and resumes
    from the socket and from the TLS layer reach the application's producer
    once each.
    """

    __slots__ = ("_producer", "_producerPaused")

    def __init__(self, producer: Any) -> None:
        # C{_producer}: TLSMemoryBIOProtocol.unregisterProducer reads it.
        self._producer = producer
        self._producerPaused = False

    def pauseProducing(self) -> None:
        if self._producerPaused:
            return
        self._producerPaused = True
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._producerPaused:
            return
        self._producerPaused = False
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


def adopt(tlsProtocol: object) -> None:
    """
    Give C{tlsProtocol} the write path of L{EdgeTLSTransport} if it is
    exactly Twisted's C{BufferingTLSTransport} (what C{wrapServerTLS}
    builds); leave anything else alone.

    Changing the class of the instance rather than wrapping it keeps every
    attribute, every C{isinstance} check and the factory's bookkeeping as
    they are, and costs no memory per connection.
    """
    if type(tlsProtocol) is BufferingTLSTransport:
        tlsProtocol.__class__ = EdgeTLSTransport
        # Called from makeConnection, before anything could be written: the
        # aggregator Twisted made is empty, and EdgeTLSTransport aggregates
        # by itself (as its __init__ arranges).
        attributes = vars(tlsProtocol)
        attributes.pop("write", None)
        aggregator = attributes.pop("_aggregator", None)
        if aggregator is not None and aggregator._buffer:
            tlsProtocol._aggregate(b"".join(aggregator._buffer))
        # And the factory builds the next ones as EdgeTLSTransport from the
        # start, so that they also get its makeConnection.
        factory: Any = getattr(tlsProtocol, "factory", None)
        if getattr(factory, "protocol", None) is BufferingTLSTransport:
            factory.protocol = EdgeTLSTransport
