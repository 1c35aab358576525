# -*- test-case-name: tests.test_security_forward,tests.test_security_jwt -*-
"""
The HTTP client of the auth types: treq, over an agent with its own
connection pool and, when the section names a C{ca}, that CA as the only
trust anchor (a private provider or auth service).  Key sets, discovery
documents, tokens and forward-auth verdicts are all small: bodies are
read whole up to L{MAX_BODY} bytes.

The client keeps no cookie (L{clientOver}): treq gives every client a
cookie jar shared by all its requests, and the subrequests of one section
are made for many clients.  A cookie an auth service set in its answer to
one user would go with the next user's subrequest, and let an anonymous
client in as that user.
"""

from __future__ import annotations

import json
from http.cookiejar import DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent

__all__ = ["MAX_BODY", "BodyTooLarge", "clientOver", "makeClient", "readBody", "getJSON"]

MAX_BODY = 1024 * 1024
"""Bytes of a key set, discovery document, token response or auth
service answer read at most."""


class BodyTooLarge(Exception):
    pass


def makeClient(reactor: Any, ca: str | None = None) -> HTTPClient:
    """A treq client trusting C{ca} (a PEM file) or the system's CAs."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    pool.retryAutomatically = False
    if ca is not None:
        from twisted.internet.ssl import Certificate

        with open(ca, "rb") as f:
            policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))
    else:
        policy = BrowserLikePolicyForHTTPS()
    return clientOver(Agent(reactor, contextFactory=policy, pool=pool))


def clientOver(agent: IAgent) -> HTTPClient:
    """
    A treq client over C{agent} whose cookie jar never stores a cookie
    (no domain is allowed to set one): every subrequest carries only the
    fields its caller gives it.
    """
    return HTTPClient(agent, cookiejar=IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[])))


def readBody(response: Any, limit: int = MAX_BODY) -> Deferred[bytes]:
    """The body of a treq response, refused past C{limit} bytes."""
    length = getattr(response, "length", None)
    if isinstance(length, int) and length > limit:
        response.original.deliverBody(_Drop())
        raise BodyTooLarge(f"{length} bytes")
    return response.content()


class _Drop:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


async def getJSON(client: HTTPClient, url: str, timeout: float) -> Any:
    """GET C{url} and parse its JSON body; a non-2xx answer raises."""
    headers: dict[bytes | str, bytes | str] = {b"accept": b"application/json"}
    response = await client.get(url, timeout=timeout, headers=headers)
    body = await readBody(response)
    if not 200 <= response.code < 300:
        raise ValueError(f"{url} answered {response.code}")
    return json.loads(body)
