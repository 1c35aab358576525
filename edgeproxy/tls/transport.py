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

L{adopt} turns the C{BufferingTLSTransport} that
L{twisted.internet.endpoints.wrapServerTLS} builds for each connection into
an L{EdgeTLSTransport} (same class layout, two methods more), from the
store's connection creator, which is the one place that sees every server
TLS transport; it also sets the listener's C{TLSMemoryBIOFactory} to build
L{EdgeTLSTransport} from then on.  It touches Twisted's and pyOpenSSL's private attributes
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
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure

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


class EdgeTLSTransport(BufferingTLSTransport):
    """
    C{BufferingTLSTransport} with the write path described in the module
    docstring, and a connection set-up without Twisted's redundant
    interface copying; nothing else differs.
    """

    traffic: Any = None
    """
    When set (by L{edgeproxy.http.site}), an object whose C{sent} is
    increased by the bytes the application writes (before encryption).
    Counted here rather than by wrapping C{write} on every connection: the
    wrappers cost about 300 bytes per idle connection (R4).
    """

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        # BufferingTLSTransport put its aggregator's write on the instance;
        # the class's write below does the same and counts.
        del self.write

    def write(self, bytes: bytes) -> None:  # noqa: A002 -- Twisted's name
        traffic = self.traffic
        if traffic is not None:
            traffic.sent += len(bytes)
        self._aggregator.write(bytes)

    def writeSequence(self, sequence: Any) -> None:
        data = b"".join(sequence)
        traffic = self.traffic
        if traffic is not None:
            traffic.sent += len(data)
        self._aggregator.write(data)

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
        self._appSendBuffer = []
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
        type(transport) is tcp.Server
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


def _releaseDrained(connection: Any, records: list[bytes]) -> None:
    """
    Replace C{connection}'s drained send BIO, as its own C{bio_read} does
    (see L{edgeproxy.tls.store._ServerConnection}): OpenSSL's memory BIO
    never shrinks, and an idle connection should not keep a record's worth.
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
        if "write" in vars(tlsProtocol):
            del tlsProtocol.write  # as EdgeTLSTransport.__init__ does
        # And the factory builds the next ones as EdgeTLSTransport from the
        # start, so that they also get its makeConnection.
        factory = getattr(tlsProtocol, "factory", None)
        if getattr(factory, "protocol", None) is BufferingTLSTransport:
            factory.protocol = EdgeTLSTransport
