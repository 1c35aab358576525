"""
Tests for L{edgeproxy._compat}: the fast-path decision (which releases,
which setting, what the log line says), the private names of the installed
Twisted and pyOpenSSL that the fast paths rely on, and the necessities'
fallbacks when a name is gone.  What moves bytes through the fast paths is
tested in C{tests/test_tls_transport.py}, C{tests/test_server.py},
C{tests/test_client.py} and the socket tests, both ways.
"""

from __future__ import annotations

import OpenSSL
import pytest
import twisted
from OpenSSL import SSL

from edgeproxy import _compat
from edgeproxy._compat import (
    TESTED_PYOPENSSL,
    TESTED_TWISTED,
    FastPaths,
    decideFastPaths,
    fastPaths,
    useFastPaths,
)

from .fastpaths import SHOW_DEPRECATIONS, using

pytestmark = SHOW_DEPRECATIONS


def test_autoWithTestedReleasesIsEverything() -> None:
    decision = decideFastPaths("auto", TESTED_TWISTED[0], TESTED_PYOPENSSL[0])
    assert (decision.tcp, decision.tls) == (True, True)
    assert decision.summary == "on for TCP and TLS"
    assert decision.why == (
        f"Twisted {TESTED_TWISTED[0]} and pyOpenSSL {TESTED_PYOPENSSL[0]} are tested releases"
    )


def test_untestedPyOpenSSLKeepsTheTCPPaths() -> None:
    decision = decideFastPaths("auto", TESTED_TWISTED[0], "99.0.0")
    assert (decision.tcp, decision.tls) == (True, False)
    assert decision.summary == "on for TCP only, TLS takes Twisted's public path"
    assert decision.why == f"pyOpenSSL 99.0.0 is not a tested release ({', '.join(TESTED_PYOPENSSL)})"


@pytest.mark.parametrize("pyOpenSSLVersion", [TESTED_PYOPENSSL[0], "99.0.0"])
def test_untestedTwistedIsNothing(pyOpenSSLVersion: str) -> None:
    decision = decideFastPaths("auto", "99.1.0", pyOpenSSLVersion)
    assert (decision.tcp, decision.tls) == (False, False)
    assert decision.summary == "off, Twisted's public paths throughout"
    assert decision.why.startswith(f"Twisted 99.1.0 is not a tested release ({', '.join(TESTED_TWISTED)})")


def test_offIsNothingWhateverTheReleases() -> None:
    decision = decideFastPaths("off", TESTED_TWISTED[0], TESTED_PYOPENSSL[0])
    assert decision == FastPaths.off()
    assert decision.why == "[edgeproxy] fast_paths = off"


def test_unknownSettingRefused() -> None:
    with pytest.raises(ValueError, match="auto, off"):
        decideFastPaths("on")


def test_installedReleasesAreTested() -> None:
    """
    The releases the suite runs with are the tested ones, so the suite tests
    the fast paths (bump L{TESTED_TWISTED} / L{TESTED_PYOPENSSL} only once
    the whole suite passes with a new release).
    """
    assert twisted.__version__ in TESTED_TWISTED
    assert OpenSSL.__version__ in TESTED_PYOPENSSL
    assert decideFastPaths() == FastPaths(True, True, decideFastPaths().why)


def test_theProcessDecisionIsSetAndPutBack() -> None:
    before = fastPaths()
    previous = useFastPaths(FastPaths.off())
    try:
        assert previous == before
        assert fastPaths() == FastPaths.off()
    finally:
        useFastPaths(previous)
    assert fastPaths() == before


# The private names the fast paths rely on.  These fail first, and by name,
# when a new release of Twisted or pyOpenSSL moves one.

TWISTED_TLS = (
    "_write",
    "_flushReceiveBIO",
    "_flushSendBIO",
    "_checkHandshakeStatus",
    "_bufferedWrite",
    "_unbufferPendingWrites",
    "_tlsShutdownFinished",
    "_shutdownTLS",
)


def test_twistedTLSNames() -> None:
    from twisted.protocols import tls

    for name in TWISTED_TLS:
        assert callable(getattr(tls.TLSMemoryBIOProtocol, name)), name
    assert hasattr(tls, "_PullToPush")
    assert tls.TLSMemoryBIOFactory.protocol is tls.BufferingTLSTransport
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import CertificateOptions

    factory = tls.TLSMemoryBIOFactory(CertificateOptions(), False, Factory())
    assert hasattr(factory, "_clock") and callable(factory._creatorCallable)


def test_twistedTCPNames() -> None:
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock

    class Listening:
        _realPortNumber = 1

    mine, theirs = socket.socketpair()
    try:
        server = tcp.Server(mine, Protocol(), ("127.0.0.1", 1), Listening(), 1, MemoryReactorClock())
        assert server.dataBuffer == b"" and server._tempDataBuffer == []
        assert callable(server.writeSomeData) and callable(server._getLogPrefix)
        assert server.TLS is False
    finally:
        mine.close()
        theirs.close()
    assert tcp.Port.transport is tcp.Server
    # LeanClient: the connector's factory method, the client's connecting
    # methods (assigned and deleted while connecting).
    assert callable(tcp.Connector._makeTransport)
    assert callable(tcp.Client.doConnect) and callable(tcp.Client._getLogPrefix)


def test_twistedReactorNames() -> None:
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    try:
        assert callable(reactor._poller.poll)
        assert isinstance(reactor._selectables, dict)
        assert callable(reactor._doReadOrWrite)
        assert hasattr(reactor, "_exitSignal")
    finally:
        reactor._poller.close()


def test_pyOpenSSLNames() -> None:
    from OpenSSL._util import ffi, lib

    context = SSL.Context(SSL.TLS_METHOD)
    connection = SSL.Connection(context, None)
    for name in ("_ssl", "_into_ssl", "_from_ssl", "_alpn_select_callback_args"):
        assert hasattr(connection, name), name
    assert callable(connection._raise_ssl_error)
    assert connection._ssl in SSL.Connection._reverse_mapping
    for name in ("SSL_read", "SSL_write", "SSL_get_error", "BIO_read", "BIO_new", "BIO_s_mem",
                 "BIO_get_mem_data", "SSL_set_bio", "SSL_CTX_set1_curves_list"):
        assert hasattr(lib, name), name
    assert ffi.NULL is not None
    assert hasattr(context, "_context")


def test_groupsLeftToOpenSSLWithoutTheBinding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyOpenSSL whose context hides its handle: OpenSSL's defaults stay."""
    from edgeproxy._compat.pyopenssl import setGroupsList

    context = SSL.Context(SSL.TLS_METHOD)
    assert setGroupsList(context, b"X25519:prime256v1") is True
    assert setGroupsList(context, b"no-such-group") is False

    class Hidden:
        pass

    assert setGroupsList(Hidden(), b"X25519") is None  # type: ignore[arg-type]


def test_systemdSocketsUnknownWithoutTheParser(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Twisted whose parser no longer says what systemd passed: the
    message names the endpoint and what to check, without the list."""
    from twisted.internet import endpoints

    from edgeproxy import systemd
    from edgeproxy._compat.twisted import systemdPassedSockets

    assert systemdPassedSockets() is endpoints._SystemdParser._sddaemon
    monkeypatch.delattr(endpoints._SystemdParser, "_sddaemon")
    assert systemdPassedSockets() is None
    message = systemd.notPassedMessage("systemd:domain=INET:name=https")
    assert "systemd passed no socket for 'systemd:domain=INET:name=https'" in message
    assert "FileDescriptorName=" in message


def test_exitSignalForgottenOnlyWhenThere() -> None:
    from edgeproxy._compat.twisted.reactor import forgetExitSignal

    class Reactor:
        _exitSignal = 15

    reactor = Reactor()
    forgetExitSignal(reactor)
    assert reactor._exitSignal is None
    forgetExitSignal(object())  # a reactor without it: nothing


def test_usingHelperRestores() -> None:
    """The test helper the other modules run both ways with."""
    before = _compat.fastPaths()
    with using(False) as decision:
        assert _compat.fastPaths() is decision and not decision.tcp
    assert _compat.fastPaths() is before
