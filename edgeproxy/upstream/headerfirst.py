# -*- test-case-name: tests.integration.test_security_tls -*-
"""
Backend connections that start with a PROXY protocol header
(C{[upstream:NAME] proxy_protocol = v1 | v2}): L{HeaderFirstEndpoint}
wraps the pool's endpoint so that the header (L{edgeproxy.proxyheader}) is
the connection's first bytes, before TLS and HTTP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

__all__ = ["HeaderFirstEndpoint"]


class _HeaderFirst(ProtocolWrapper):
    """Writes the PROXY header as the connection's first bytes."""

    def makeConnection(self, transport: Any) -> None:
        transport.write(self.factory.proxyHeader)
        super().makeConnection(transport)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst
    noisy = False

    def __init__(self, wrappedFactory: Any, proxyHeader: bytes) -> None:
        super().__init__(wrappedFactory)
        self.proxyHeader = proxyHeader


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """A client endpoint whose connection starts with a PROXY header, then
    is the wrapped endpoint's (TLS goes on top of it)."""

    def __init__(self, endpoint: Any, proxyHeader: bytes) -> None:
        self._endpoint = endpoint
        self._header = proxyHeader

    def connect(self, protocolFactory: Any) -> Any:
        return self._endpoint.connect(_HeaderFirstFactory(protocolFactory, self._header)).addCallback(
            lambda wrapper: wrapper.wrappedProtocol
        )
