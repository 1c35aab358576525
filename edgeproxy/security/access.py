# -*- test-case-name: tests.test_security_units,tests.test_security_bypass -*-
"""
The C{access} stage: who may use a route at all.

A request is refused with a bare C{403} (the access log names the rule,
the client learns nothing about it) when, in this order:

  1. its client address is in a C{deny} network (C{deny <network>}): deny
     wins over allow;
  2. the route has C{allow} networks and the address is in none of them
     (C{allow});
  3. the route has C{methods} and the method is not one of them
     (C{methods}; RFC 9110 9.1: methods are case-sensitive, so C{get} is
     not C{GET});
  4. the route has C{require_client_certificate} and the connection
     presented no verified certificate (C{client_certificate}).

The client address is the request's C{client}: the peer's, or with
trusted proxies in front the one they vouch for
(L{edgeproxy.pipeline.forwarded.clientAddress}), where the peer is the
address a PROXY protocol header gave on listeners that accept one.  An
address that cannot be parsed (a UNIX socket peer) is in no network: with
C{allow} it is refused.

A request let through has the client certificate's facts set in the
route's C{client_certificate_headers} (any copy the client sent removed
first, certificate or not), and its TLS responses get
C{Strict-Transport-Security} when the route sets C{hsts} (RFC 6797 7.2:
never over plain HTTP, where an attacker could strip or forge it).

L{decide} is the pure decision; L{AccessStage} applies it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, NamedTuple

from edgeproxy.config.model import Config, IPNetwork, Route
from edgeproxy.errors import Forbidden, ProxyError
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import ClientCertificate, Response

__all__ = ["AccessRules", "AccessStage", "decide", "hstsValue"]

_MAX_CACHED = 4096


class AccessRules(NamedTuple):
    """A route's access keys, ready for L{decide}."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    methods: frozenset[bytes] = frozenset()
    requireCertificate: bool = False

    @classmethod
    def fromRoute(cls, route: Route) -> AccessRules:
        return cls(
            route.allow,
            route.deny,
            frozenset(method.encode("ascii") for method in route.methods),
            route.require_client_certificate,
        )


def addressRule(rules: AccessRules, client: str) -> str | None:
    """
    The rule that refuses C{client} (C{"deny NETWORK"} or C{"allow"}), or
    L{None}.
    """
    if not rules.allow and not rules.deny:
        return None
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return "allow" if rules.allow else None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:192.0.2.1 is 192.0.2.1 (a dual-stack socket's view of an
        # IPv4 client): an IPv4 rule must apply to it.
        address = address.ipv4_mapped
    for network in rules.deny:
        if address in network:
            return f"deny {network}"
    if rules.allow and not any(address in network for network in rules.allow):
        return "allow"
    return None


def decide(
    rules: AccessRules, client: str, method: bytes, certificate: ClientCertificate | None
) -> str | None:
    """
    Whether a request may pass: L{None}, or the name of the rule that
    refuses it (see the module docstring for the order).
    """
    refused = addressRule(rules, client)
    if refused is not None:
        return refused
    if rules.methods and method not in rules.methods:
        return "methods"
    if rules.requireCertificate and certificate is None:
        return "client_certificate"
    return None


def hstsValue(route: Route) -> bytes | None:
    """The C{Strict-Transport-Security} value of C{route} (RFC 6797 6.1)."""
    if route.hsts is None:
        return None
    value = b"max-age=%d" % (int(route.hsts),)
    if route.hsts_include_subdomains:
        value += b"; includeSubDomains"
    if route.hsts_preload:
        value += b"; preload"
    return value


def certificateValues(certificate: ClientCertificate) -> dict[str, bytes]:
    """A certificate's facts as field values (ASCII; anything else escaped)."""
    return {
        "subject": certificate.subject.encode("ascii", "backslashreplace"),
        "san": ", ".join(certificate.san).encode("ascii", "backslashreplace"),
        "fingerprint": certificate.fingerprint.encode("ascii"),
    }


class _HSTS:
    """Adds C{Strict-Transport-Security} to a TLS response."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def onResponse(self, call: Call, response: Response) -> None:
        call.respond(response._replace(fields=response.fields.withField(b"strict-transport-security", self.value)))

    def onError(self, call: Call, error: ProxyError) -> None:
        call.fail(error)


_FORBIDDEN = "refused by an access rule"


class AccessStage:
    """
    The C{access} stage of one route (see the module docstring).
    """

    __slots__ = ("rules", "_addresses", "_hsts", "_certificateFields", "_certificateNames")

    def __init__(self, route: Route) -> None:
        self.rules = AccessRules.fromRoute(route)
        self._addresses: dict[str, str | None] = {}
        """Client address -> L{addressRule}'s answer: the same few clients
        come again and again, and parsing an address costs more than the
        lookup.  Bounded."""
        hsts = hstsValue(route)
        self._hsts = None if hsts is None else _HSTS(hsts)
        self._certificateFields = tuple(
            (fact, name.encode("ascii")) for fact, name in route.client_certificate_headers
        )
        self._certificateNames = tuple(name for _, name in self._certificateFields)

    def handle(self, call: Call) -> None:
        request = call.request
        rules = self.rules
        if rules.allow or rules.deny:
            addresses = self._addresses
            client = request.client
            try:
                refused = addresses[client]
            except KeyError:
                refused = addressRule(rules, client)
                if len(addresses) >= _MAX_CACHED:
                    addresses.clear()
                addresses[client] = refused
            if refused is not None:
                self._refuse(call, refused)
                return
        if rules.methods and request.method not in rules.methods:
            self._refuse(call, "methods")
            return
        certificate = request.connection.clientCertificate
        if rules.requireCertificate and certificate is None:
            self._refuse(call, "client_certificate")
            return
        if self._certificateFields:
            fields = request.fields.without(*self._certificateNames)
            if certificate is not None:
                values = certificateValues(certificate)
                for fact, name in self._certificateFields:
                    fields = fields.withField(name, values[fact])
            call.request = request._replace(fields=fields)
        if self._hsts is not None and request.connection.scheme == b"https":
            call.onResponse(self._hsts)
        call.next()

    def _refuse(self, call: Call, rule: str) -> None:
        call.refusedBy = rule
        call.fail(Forbidden(_FORBIDDEN))


class AccessKind:
    """Builds the C{access} stage of routes that set any of its keys."""

    name = "access"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if not route.securityConfigured:
            return None
        return AccessStage(route)


registerKind(AccessKind())
