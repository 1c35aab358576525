# -*- test-case-name: tests.test_compat,tests.test_systemd -*-
"""
Every use of Twisted's private surface, by what it touches (see
L{edgeproxy._compat} for the rules and the fast-path switch):

  - L{edgeproxy._compat.twisted.tls}: L{EdgeTLSTransport
    <edgeproxy._compat.twisted.tls.EdgeTLSTransport>}, the server TLS
    transport of the fast paths, a subclass of Twisted's
    C{BufferingTLSTransport} overriding C{TLSMemoryBIOProtocol}'s private
    methods, and L{adopt <edgeproxy._compat.twisted.tls.adopt>};
  - L{edgeproxy._compat.twisted.tcp}: L{LeanServer
    <edgeproxy._compat.twisted.tcp.LeanServer>} and the sends straight to a
    TCP socket;
  - L{edgeproxy._compat.twisted.reactor}: the epoll reactor's dispatch, the
    exit signal twistd re-raises;
  - here, the necessities that need no module of their own:
    L{systemdPassedSockets} and L{IOpenSSLTrustRoot}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["IOpenSSLTrustRoot", "systemdPassedSockets"]


def systemdPassedSockets() -> Any:
    """
    The sockets systemd passed to this process, as Twisted's C{systemd:}
    endpoints see them (a L{twisted.python.systemd.ListenFDs}), or L{None}
    when this release of Twisted does not say.

    Twisted reads C{LISTEN_*} once, when C{twisted.internet.endpoints} is
    imported, and then deletes C{LISTEN_PID} and C{LISTEN_FDS} from the
    environment (C{twisted/python/systemd.py}, C{_parseDescriptors}), so
    only its parser still knows what was passed: C{_SystemdParser._sddaemon}.
    """
    try:
        from twisted.internet.endpoints import _SystemdParser
    except ImportError:
        return None
    return getattr(_SystemdParser, "_sddaemon", None)
