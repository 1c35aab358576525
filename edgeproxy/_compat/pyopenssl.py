# -*- test-case-name: tests.test_tls_transport,tests.test_tls_store,tests.test_compat -*-
"""
Every use of pyOpenSSL's private surface and of the OpenSSL bindings it
wraps (C{OpenSSL._util.lib} and C{ffi}), behind functions with
public-looking signatures (see L{edgeproxy._compat} for the rules).

Fast paths (only with L{edgeproxy._compat.FastPaths.tls}):

  - L{encrypt}, L{decrypt} and L{takeRecords}: the record path of
    L{edgeproxy._compat.twisted.tls.EdgeTLSTransport}.  pyOpenSSL's
    C{send}/C{recv}/C{bio_read} allocate a 32 KiB buffer per call, and
    C{recv} and C{bio_read} end every read with a C{WantReadError} raised
    and caught; these call C{SSL_write} (one record, at most 2^14 bytes:
    RFC 8446 §5.1, RFC 5246 §6.2.1), C{SSL_read} and C{BIO_read} through
    the binding into one shared buffer, and turn any other result into
    pyOpenSSL's own exception (C{Connection._raise_ssl_error}), returned
    rather than raised.
  - L{BufferReleasingConnection}: OpenSSL's memory BIOs never shrink, so a
    drained one is replaced once L{RELEASE_AFTER} bytes went through it
    (C{SSL_set_bio}, and the connection's C{_into_ssl}/C{_from_ssl}
    rebound: pyOpenSSL reads them on every call).
  - L{forgetHandshakeState}: what a server connection keeps only for its
    handshake's callbacks (C{_alpn_select_callback_args},
    C{Connection._reverse_mapping}).

Necessity (with any release): L{setGroupsList}, which pyOpenSSL has no
public API for (C{SSL_CTX_set1_curves_list} on C{Context._context}); with
a release that lacks either, OpenSSL's default groups stay.

C{tests/test_tls_transport.py} and C{tests/test_tls_store.py} move bytes
through all of this both ways, and C{tests/test_compat.py} checks the
names it relies on are there.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = [
    "RELEASE_AFTER",
    "BufferReleasingConnection",
    "RecordBuffer",
    "decrypt",
    "encrypt",
    "forgetHandshakeState",
    "plaintextFitting",
    "setGroupsList",
    "takeRecords",
]

_RECORD = 2**14
"""Largest plaintext per TLS record (RFC 8446 §5.1; RFC 5246 §6.2.1)."""

_RECORD_OVERHEAD = 256
"""More than a record adds to its plaintext (header, nonce, tag, padding)."""

_SCRATCH_SIZE = 2**15
"""Room for one full record and its overhead, with room to spare."""

_scratch = _ffi.new("char[]", _SCRATCH_SIZE)
"""
One buffer the records (and decrypted reads) are read into and copied out
of at once.  Shared by every connection: only the reactor's thread uses it,
and nothing runs between the OpenSSL call that fills it and the copy.
"""
_scratchBytes = _ffi.buffer(_scratch)

_uncleared = _ffi.new_allocator(should_clear_after_alloc=False)
"""cffi's C{new} without zeroing what OpenSSL writes over at once."""

RELEASE_AFTER = 512
"""Bytes through a memory BIO after which it is replaced once drained."""


def encrypt(
    connection: SSL.Connection,
    data: Any,
    into: RecordBuffer | None = None,
    more: bool = False,
) -> tuple[list[Any], int, SSL.Error | None]:
    """
    Encrypt C{data} (any bytes-like object) on C{connection}, one
    C{SSL_write} per record, and take the records out of its send BIO
    (replaced once drained, for a L{BufferReleasingConnection}).

    @param into: a L{RecordBuffer} to read the records of a write of
        several into (C{data} at most its L{RecordBuffer.capacity}),
        instead of one made for this write; what it gives is valid until
        its next use.
    @param more: whether this is a part of a write and more follows at
        once: the send BIO is left for the next part (the last one
        releases it).

    @return: the records (C{bytes}, or for a write of several one cffi
        buffer holding them all), how many bytes of C{data} were encrypted, and
        the error that stopped the rest (a C{WantReadError} when OpenSSL
        waits for the peer), or L{None}.
    """
    ssl = connection._ssl
    total = len(data)
    # A write of several records (a large response) has them read into one
    # buffer; a small one, into the bytes of its record.
    sink = None
    if total > _RECORD:
        sink = RecordBuffer(total) if into is None else into.reset()
    records: list[Any] = []
    sent = 0
    failed: SSL.Error | None = None
    with _ffi.from_buffer(data) as buffer:
        while sent < total:
            size = total - sent
            if size > _RECORD:
                size = _RECORD
            result = _lib.SSL_write(ssl, buffer + sent, size)
            if result <= 0:
                failed = _writeFailure(connection, ssl, result)
                break
            sent += result
            if sink is None:
                _moveRecords(connection, records)
            else:
                sink.take(connection)
    if sink is not None:
        records = sink.records()
    if records and not more:
        _releaseDrainedSend(connection, records)
    return records, sent, failed


def plaintextFitting(limit: int) -> int:
    """
    The most plaintext, in whole records, whose records take at most
    C{limit} bytes (C{limit} at least one record and its overhead).
    """
    return limit // (_RECORD + _RECORD_OVERHEAD) * _RECORD


class RecordBuffer:
    """
    The records of a write of several, read out of the send BIO straight
    into one buffer made for them all: a 1 MiB cache hit is not copied into
    a bytes per record and then joined.  One made for a write is used once;
    one kept for many (L{encrypt}'s C{into}) gives records valid until it is
    used again.
    """

    __slots__ = ("capacity", "out", "room", "used", "extra")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        """The most plaintext whose records it is sure to hold."""
        self.room = capacity + -(-capacity // _RECORD) * _RECORD_OVERHEAD
        self.out = _uncleared("char[]", self.room)
        self.used = 0
        self.extra: list[bytes] = []

    def reset(self) -> RecordBuffer:
        """Make it empty again (what it gave before is overwritten from now)."""
        self.used = 0
        if self.extra:
            self.extra = []
        return self

    def take(self, connection: Any) -> None:
        """Move what the send BIO holds into the buffer."""
        left = self.room - self.used
        if left > 0:
            # A memory BIO gives all it holds, up to the room asked for: a
            # short read leaves it empty.
            read = _lib.BIO_read(connection._from_ssl, self.out + self.used, left)
            if read < left:
                if read > 0:
                    self.used += read
                return
            self.used += read
        # More than the overhead allowed for (never with TLS 1.2 or 1.3
        # records): the rest as records of their own.
        _moveRecords(connection, self.extra)

    def records(self) -> list[Any]:
        """The buffer's bytes (a cffi buffer, no copy), then any others."""
        if not self.used:
            return self.extra
        return [_ffi.buffer(self.out, self.used), *self.extra]


def _writeFailure(connection: Any, ssl: Any, result: int) -> SSL.Error:
    """The error an C{SSL_write} that returned C{result} (0 or less) stands for."""
    try:
        connection._raise_ssl_error(ssl, result)
    except SSL.Error as e:
        return e
    return SSL.Error([("edgeproxy", "SSL_write", f"returned {result}")])


def decrypt(connection: SSL.Connection) -> tuple[list[bytes], SSL.Error | None]:
    """
    Everything C{connection} can decrypt from what its receive BIO holds
    (which is replaced once drained, for a L{BufferReleasingConnection}).

    @return: the application bytes, in order, and what stopped the reading
        other than "want read": pyOpenSSL's C{ZeroReturnError} for the
        peer's close_notify, any other C{SSL.Error}; or L{None}.
    """
    ssl = connection._ssl
    chunks: list[bytes] = []
    while True:
        read = _lib.SSL_read(ssl, _scratch, _SCRATCH_SIZE)
        if read > 0:
            chunks.append(_scratchBytes[:read])
            continue
        if _lib.SSL_get_error(ssl, read) == _lib.SSL_ERROR_WANT_READ:
            _releaseDrainedReceive(connection)
            return chunks, None
        try:
            connection._raise_ssl_error(ssl, read)
        except SSL.WantReadError:
            return chunks, None
        except SSL.Error as e:
            return chunks, e
        return chunks, None


def takeRecords(connection: SSL.Connection) -> list[bytes]:
    """
    What OpenSSL put in C{connection}'s send BIO (handshake messages,
    alerts, tickets), without pyOpenSSL's C{bio_read} and its
    C{WantReadError} when there is nothing.
    """
    records: list[bytes] = []
    _moveRecords(connection, records)
    if records:
        _releaseDrainedSend(connection, records)
    return records


def _moveRecords(connection: Any, records: list[bytes]) -> None:
    """Move everything OpenSSL put in C{connection}'s send BIO to C{records}."""
    bio = connection._from_ssl
    while True:
        read = _lib.BIO_read(bio, _scratch, _SCRATCH_SIZE)
        if read <= 0:
            return
        records.append(_scratchBytes[:read])
        if read < _SCRATCH_SIZE:
            return


def forgetHandshakeState(connection: SSL.Connection | None) -> None:
    """
    Drop what a server connection keeps only for its handshake (about
    0.2 KiB per idle connection).

    pyOpenSSL keeps the ALPN callback's answer (two cffi buffers) on the
    connection for the connection's life, although OpenSSL copies the
    selected protocol as soon as the callback returns
    (C{tls_handle_alpn}: C{s3.alpn_selected = OPENSSL_memdup(...)}); and it
    keeps the connection in C{Connection._reverse_mapping} (a weak
    reference and a dictionary entry), which only its callbacks read, to
    find the connection from the C{SSL *} they are called with.  A server's
    callbacks (servername, ALPN) run for a ClientHello only, and after the
    handshake there is none: TLS 1.3 has no renegotiation (RFC 8446 §4),
    and edgeproxy's contexts refuse TLS 1.2's (C{SSL_OP_NO_RENEGOTIATION}:
    OpenSSL answers a new ClientHello with a no_renegotiation alert without
    processing it).
    """
    if connection is None:
        return
    connection._alpn_select_callback_args = None
    SSL.Connection._reverse_mapping.pop(connection._ssl, None)


class BufferReleasingConnection(SSL.Connection):
    """
    A connection that does not keep its memory BIOs' buffers while it has
    nothing to buffer.

    OpenSSL's memory BIO never shrinks: once a 16 KiB record has passed
    through the send BIO it keeps about 22 KiB allocated for the rest of the
    connection's life, and the receive BIO keeps the size of the largest
    burst read (the ClientHello at least).  C{SSL_MODE_RELEASE_BUFFERS}
    frees OpenSSL's own record buffers when idle, not these.  So once
    L{RELEASE_AFTER} bytes went through a BIO and it is empty again, it is
    swapped for a fresh one (C{SSL_set_bio} frees the old one): about 2 KiB
    less per idle connection after one small response, 22 KiB less after a
    large one, for one C{BIO_new} per 512 bytes at most.  Nothing is swapped
    once the receive side has been shut down (C{bio_shutdown} marks that
    BIO at EOF).

    Reads and writes through pyOpenSSL's own methods release as
    L{encrypt}, L{decrypt} and L{takeRecords} do.

    The counts are slots.  As attributes set after pyOpenSSL's eleven,
    once twenty or so connections had been made before the first count was
    set (a proxy started into traffic), every connection from then on got
    a dictionary of its own, 832 bytes for as long as it lives
    (L{edgeproxy._compat.twisted.tcp._placeLateNames} says why).
    """

    __slots__ = ("_sentThrough", "_receivedThrough", "_receiveShutDown")

    def __init__(self, context: SSL.Context, socket: Any = None) -> None:
        super().__init__(context, socket)
        self._sentThrough = 0
        self._receivedThrough = 0
        self._receiveShutDown = False

    def bio_read(self, bufsiz: int) -> bytes:
        data = super().bio_read(bufsiz)
        _releaseDrainedSend(self, (data,))
        return data

    def bio_write(self, buf: bytes | bytearray | memoryview) -> int:
        written = super().bio_write(buf)
        self._receivedThrough += written
        return written

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        try:
            return super().recv(bufsiz, flags)
        except SSL.WantReadError:
            # Everything written into the receive BIO has been consumed.
            _releaseDrainedReceive(self)
            raise

    def bio_shutdown(self) -> None:
        self._receiveShutDown = True
        super().bio_shutdown()


def _releaseDrainedSend(connection: Any, records: Any) -> None:
    """
    Replace C{connection}'s drained send BIO once L{RELEASE_AFTER} bytes
    went through it (C{records}: what was just read out of it); only a
    L{BufferReleasingConnection} counts them.
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
    Replace C{connection}'s receive BIO once it is drained; never after
    C{bio_shutdown} (that BIO carries the end of the stream).
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


def setGroupsList(context: SSL.Context, groups: bytes) -> bool | None:
    """
    Restrict C{context}'s key exchange groups to C{groups}
    (C{SSL_CTX_set1_groups_list} syntax, C{b"X25519:prime256v1"}).

    @return: whether OpenSSL accepted the list; L{None} when this release
        of pyOpenSSL or its bindings does not let it be set (OpenSSL's
        default groups then stay).
    """
    setter = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    handle = getattr(context, "_context", None)
    if setter is None or handle is None:
        return None
    return bool(setter(handle, groups) == 1)
