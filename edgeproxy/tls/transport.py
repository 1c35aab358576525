# -*- test-case-name: tests.test_tls_transport -*-
"""
The server side TLS transport's write path: application bytes to TLS
records to the TCP transport, with as little Python per record as it takes.

Twisted's C{TLSMemoryBIOProtocol._write} hands OpenSSL 16 KiB at a time
through pyOpenSSL's C{Connection.send} and, after each, reads the memory BIO
through C{Connection.bio_read} (a 32 KiB buffer per call) and writes the
record to the TCP transport: for a 64 KiB write, four rounds of slicing,
buffer allocation, error checks and transport calls.  Under R3 (1 MiB
responses) that write path cost about 630 us of CPU per MiB, of which
OpenSSL's encryption is about 120 (measured in memory, 64 KiB writes).

L{EdgeTLSTransport._write} does the same with one C{SSL_write} per record
straight through the binding (C{SSL_write} of at most 2^14 bytes: RFC 8446
§5.1, RFC 5246 §6.2.1), reads each record into one shared buffer, and
hands all of them to the TCP transport in one C{writeSequence}.  Errors go
the way Twisted's do: pyOpenSSL maps the C{SSL_write} result to its
exception (C{Connection._raise_ssl_error}), a C{WantReadError} buffers the
rest of the write until the peer's bytes arrive, any other error shuts the
TLS connection down with it.  The memory BIO a write drained is replaced as
L{edgeproxy.tls.store._ServerConnection} does for its own reads, but once
per write instead of once per record.

Reads (L{EdgeTLSTransport._flushReceiveBIO}) and handshake flights
(C{_flushSendBIO}) go the same way: C{SSL_read} into the shared buffer
instead of pyOpenSSL's C{recv} (a 32 KiB buffer per call, and a
C{WantReadError} raised and caught at the end of every read event), and
flights straight to the socket unless the connection was aborted.

edgeproxy's listeners build L{EdgeTLSTransport} from their first
connection (C{edgeproxy.serve.listeners} sets their C{TLSMemoryBIOFactory}'s
C{protocol}).  For the store's connection creator used any other way, as
with L{twisted.internet.endpoints.wrapServerTLS}, L{adopt} turns the
C{BufferingTLSTransport} built for each connection into an
L{EdgeTLSTransport} (same class layout, two methods more) and sets that
factory to build L{EdgeTLSTransport} from then on.  It touches Twisted's and pyOpenSSL's private attributes
(listed in docs/architecture.rst); C{tests.test_tls_transport} moves bytes
through it both ways, across handshakes, errors and buffered writes, so a
change in either shows up there.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol, _PullToPush
from twisted.python.failure import Failure
from zope.interface import implementer

_RECORD = 2**14
"""Largest plaintext per TLS record (RFC 8446 §5.1; RFC 5246 §6.2.1)."""

_SCRATCH_SIZE = 2**15
"""Room for one full record and its overhead, with room to spare."""

_scratch = _ffi.new("char[]", _SCRATCH_SIZE)
"""
One buffer the records (and decrypted reads) are read into and copied out
of at once.  Shared by every connection: only the reactor's thread uses it,
and nothing runs between the OpenSSL call that fills it and the copy (the
application gets the copy, so a write it makes meanwhile may reuse it).
"""
_scratchBytes = _ffi.buffer(_scratch)

RELEASE_AFTER = 512
"""Bytes through a memory BIO after which it is replaced once drained."""


MAX_PENDING = 64_000
"""
Bytes of small writes held for the next reactor turn before they are
encrypted at once (Twisted's C{_AggregateSmallWrites.MAX_BUFFER_SIZE}).
"""


class EdgeTLSTransport(BufferingTLSTransport):
    """
    C{BufferingTLSTransport} with the write path described in the module
    docstring, and a connection set-up without Twisted's redundant
    interface copying; nothing else differs.

    Memory of an idle connection (R4).  Twisted's C{BufferingTLSTransport}
    gives every connection an C{_AggregateSmallWrites} (an object, its
    dictionary, a list and a bound method: about 0.3 KiB for as long as the
    connection lives); the same aggregation is done here in three
    attributes whose class defaults stand for "nothing pending", and the
    list exists only while writes wait for the reactor's next turn (the
    same for Twisted's C{_appSendBuffer}, see its class default).  The
    producer registered with the TCP transport is a slotted L{_Membrane}
    instead of Twisted's C{_ProducerMembrane}, and once the handshake is
    done the pyOpenSSL connection drops what only the handshake needs
    (L{_afterHandshake}).
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

    traffic: Any = None
    """
    When set (by L{edgeproxy.http.listener}), an object whose C{sent} is
    increased by the bytes the application writes (before encryption).
    Counted here rather than by wrapping C{write} on every connection: the
    wrappers cost about 300 bytes per idle connection (R4).
    """

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        # TLSMemoryBIOProtocol's, not BufferingTLSTransport's: that one
        # makes the aggregator and puts its write on the instance; the
        # class's write below aggregates (and counts) instead.
        TLSMemoryBIOProtocol.__init__(self, factory, wrappedProtocol, _connectWrapped)

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

    def writeNow(self, data: bytes) -> None:
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
            pending.append(data + b"")
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
            # Back to the class defaults: an idle connection holds no list.
            del self._pending
            del self._pendingLeft
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
        # Twisted leaves a new empty list behind: back to the class default.
        # (A list is always the instance's own attribute; reading
        # __dict__ instead would give the instance a dictionary of its own.)
        buffer = self._appSendBuffer
        if not buffer and type(buffer) is list:
            del self._appSendBuffer

    def _checkHandshakeStatus(self) -> None:
        TLSMemoryBIOProtocol._checkHandshakeStatus(self)
        if self._handshakeDone:
            if getattr(self._tlsConnection, "closeAfterHandshake", False):
                # A TLS-ALPN-01 validation (edgeproxy.tls.store): nothing
                # follows its handshake (RFC 8737 §3).
                self.loseConnection()
            _afterHandshake(self._tlsConnection)
            # The empty list Twisted's makeConnection gave a connection
            # built as BufferingTLSTransport and converted by adopt().
            buffer = self._appSendBuffer
            if not buffer and type(buffer) is list:
                del self._appSendBuffer

    def makeConnection(self, transport: Any) -> None:
        """
        What C{TLSMemoryBIOProtocol.makeConnection} does, without its loop
        of C{directlyProvides(self, interface)} over the TCP transport's
        interfaces: each call replaces the previous one's declaration, and
        C{ProtocolWrapper.makeConnection}, which it calls next for a server
        connection, declares all of them at once anyway.  That loop was
        about 4% of the CPU of a full handshake and its request (R2 profile:
        ten zope declarations per connection).
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
        what OpenSSL wants sent), with C{SSL_read} through the binding into
        the shared buffer: pyOpenSSL's C{recv} allocates 32 KiB per call and
        ends every read with a C{WantReadError} raised and caught (twice per
        request, with the send side's).  Any result other than data or
        "want read" is turned into pyOpenSSL's exception and handled as
        Twisted does.
        """
        connection = self._tlsConnection
        ssl = connection._ssl
        while not self._lostTLSConnection:
            read = _lib.SSL_read(ssl, _scratch, _SCRATCH_SIZE)
            if read > 0:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, _scratchBytes[:read])
                continue
            if _lib.SSL_get_error(ssl, read) == _lib.SSL_ERROR_WANT_READ:
                _releaseDrainedReceive(connection)
                break
            try:
                connection._raise_ssl_error(ssl, read)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The peer's close_notify: as Twisted does.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                break
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """
        Send what OpenSSL put in the send BIO (handshake messages, alerts,
        tickets), without pyOpenSSL's C{bio_read} and its C{WantReadError}
        when there is nothing; straight to the socket when nothing is queued
        (L{_sendNow}), except on an aborted connection, whose queue Twisted
        discards (an alert or close_notify must not reach the peer then).
        """
        connection = self._tlsConnection
        if connection is None:
            return
        records: list[bytes] = []
        _readRecords(connection, records)
        if not records:
            return
        _releaseDrained(connection, records)
        if self._aborted:
            self.transport.writeSequence(records)
        else:
            _sendNow(self.transport, records)

    def _write(self, bytes: bytes) -> None:  # noqa: A002 -- Twisted's name
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        ssl = connection._ssl
        total = len(bytes)
        records: list[bytes] = []
        sent = 0
        failed: BaseException | None = None
        with _ffi.from_buffer(bytes) as data:
            while sent < total:
                size = total - sent
                if size > _RECORD:
                    size = _RECORD
                result = _lib.SSL_write(ssl, data + sent, size)
                if result <= 0:
                    try:
                        connection._raise_ssl_error(ssl, result)
                    except SSL.Error as e:
                        failed = e
                    else:
                        failed = SSL.Error([("edgeproxy", "SSL_write", f"returned {result}")])
                    break
                sent += result
                _readRecords(connection, records)
        if records:
            _releaseDrained(connection, records)
            _sendNow(self.transport, records)
        if failed is None:
            return
        if isinstance(failed, SSL.WantReadError):
            # Twisted's own answer: keep the rest until the peer's bytes
            # arrive (dataReceived calls _unbufferPendingWrites).
            self._bufferedWrite(bytes[sent:])
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


def _afterHandshake(connection: Any) -> None:
    """
    Drop what a server connection keeps only for its handshake (R4: about
    0.2 KiB per idle connection).

    pyOpenSSL keeps the ALPN callback's answer (two cffi buffers) on the
    connection for the connection's life, although OpenSSL copies the
    selected protocol as soon as the callback returns
    (C{tls_handle_alpn}: C{s3.alpn_selected = OPENSSL_memdup(...)}); and it
    keeps the connection in C{Connection._reverse_mapping} (a weak
    reference and a dictionary entry), which only its callbacks read, to
    find the connection from the C{SSL *} they are called with.  The
    server's callbacks (servername, ALPN) run for a ClientHello only, and
    after the handshake there is none: TLS 1.3 has no renegotiation
    (RFC 8446 §4), and the store's contexts refuse TLS 1.2's
    (C{SSL_OP_NO_RENEGOTIATION}: OpenSSL answers a new ClientHello with a
    no_renegotiation alert without processing it).
    """
    if connection is None:
        return
    connection._alpn_select_callback_args = None
    SSL.Connection._reverse_mapping.pop(connection._ssl, None)


def _readRecords(connection: SSL.Connection, records: list[bytes]) -> None:
    """
    Move everything OpenSSL put in C{connection}'s send BIO to C{records}.
    """
    bio = connection._from_ssl
    while True:
        read = _lib.BIO_read(bio, _scratch, _SCRATCH_SIZE)
        if read <= 0:
            return
        records.append(_scratchBytes[:read])
        if read < _SCRATCH_SIZE:
            return


def _sendNow(transport: Any, records: list[bytes]) -> None:
    """
    Write C{records} to the TCP transport, straight to the socket when
    nothing is queued before them.

    Twisted's TCP transport never sends in C{write}: it queues, registers
    the socket for writability, sends on the next reactor turn and
    unregisters it, and a queue of more than C{bufferSize} (64 KiB) pauses
    the producer until then: under R3 every 64 KiB of a body paused and
    resumed the backend's socket, four C{epoll_ctl} calls and a reactor
    turn for bytes the kernel could take at once.  With the transport's
    buffers empty, the records go out through its own C{writeSomeData}
    (what C{doWrite} would call); whatever the kernel does not take, or an
    error (which C{doWrite} then reports as usual), is queued as before, so
    a slow client still pauses the backend.
    """
    if (
        # tcp.Server or a subclass (edgeproxy.serve.listeners.LeanServer, what TCP
        # listeners accept connections as): the same buffers and writeSomeData.
        isinstance(transport, tcp.Server)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
    ):
        data = records[0] if len(records) == 1 else b"".join(records)
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            transport.write(data[sent:])
            return
        # An error instance: queue the bytes, doWrite reports it.
        transport.write(data)
        return
    transport.writeSequence(records)


def _releaseDrained(connection: Any, records: Any) -> None:
    """
    Replace C{connection}'s drained send BIO once C{RELEASE_AFTER} bytes
    went through it (C{records}: what was just read out of it), for this
    write path and for L{edgeproxy.tls.store._ServerConnection.bio_read}:
    OpenSSL's memory BIO never shrinks, and an idle connection should not
    keep a record's worth.
    """
    through = getattr(connection, "_sentThrough", None)
    if through is None:
        return
    through += sum(map(len, records))
    if through >= RELEASE_AFTER and not _lib.BIO_get_mem_data(connection._from_ssl, _ffi.NULL):
        fresh = _lib.BIO_new(_lib.BIO_s_mem())
        if fresh != _ffi.NULL:
            # Same rbio, new wbio: SSL_set_bio frees the old wbio only.
            _lib.SSL_set_bio(connection._ssl, connection._into_ssl, fresh)
            connection._from_ssl = fresh
            through = 0
    connection._sentThrough = through


def _releaseDrainedReceive(connection: Any) -> None:
    """
    Replace C{connection}'s receive BIO once it is drained, as its own
    C{recv} does (see L{edgeproxy.tls.store._ServerConnection}); never
    after C{bio_shutdown} (that BIO carries the end of the stream).
    """
    if (
        getattr(connection, "_receivedThrough", 0) >= RELEASE_AFTER
        and not connection._receiveShutDown
        and not _lib.BIO_get_mem_data(connection._into_ssl, _ffi.NULL)
    ):
        fresh = _lib.BIO_new(_lib.BIO_s_mem())
        if fresh != _ffi.NULL:
            # New rbio, same wbio: SSL_set_bio frees the old rbio only.
            _lib.SSL_set_bio(connection._ssl, fresh, connection._from_ssl)
            connection._into_ssl = fresh
            connection._receivedThrough = 0


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
        factory = getattr(tlsProtocol, "factory", None)
        if getattr(factory, "protocol", None) is BufferingTLSTransport:
            factory.protocol = EdgeTLSTransport
