# -*- test-case-name: tests.test_acme_http01 -*-
"""
The ACME HTTP-01 hook of the plain-HTTP listeners (RFC 8555 §8.3).

The one decision is L{edgeproxy.acme.challenges.ChallengeStore.http01Answer}
(pure: Host and path in, the key authorization or L{None} out).  The
listener factory (L{edgeproxy.http.listener.ListenerFactory.select}) asks
L{http01Stage} first, before the redirect of a C{redirect_https} listener
and before routing; when it answers, the request is served by the
returned one-stage pipeline instead: C{200} and the key authorization.
"""

from __future__ import annotations

from typing import Any

from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import BytesBody, Response
from edgeproxy.pipeline.stages import RoutePipeline

__all__ = ["HTTP01Stage", "http01Stage"]


class HTTP01Stage:
    """
    Answers one HTTP-01 validation request with its key authorization.
    Selected in place of a route (C{route} L{None}, C{prefix} empty, its
    own one-stage pipeline), like L{edgeproxy.http.redirect.RedirectStage}.
    """

    route = None
    prefix = b""

    def __init__(self, keyAuthorization: bytes) -> None:
        self._body = keyAuthorization
        self.pipeline = RoutePipeline((("acme", self),), 0.0)

    def handle(self, call: Any) -> None:
        body = self._body
        call.respond(
            Response(
                200,
                b"OK",
                Fields.trusted({b"content-type": [b"application/octet-stream"], b"cache-control": [b"no-store"]}),
                len(body),
                BytesBody(body),
            )
        )


def http01Stage(challenges: Any, tls: bool, host: bytes, path: bytes) -> HTTP01Stage | None:
    """
    What answers this request when it is an HTTP-01 validation of a pending
    challenge (else L{None}).  Never on a TLS listener: the CA validates
    HTTP-01 over plain HTTP only.

    @param challenges: the listener's L{ChallengeStore}, or L{None}
        without ACME.
    """
    if challenges is None or tls:
        return None
    answer = challenges.http01Answer(host, path)
    return None if answer is None else HTTP01Stage(answer)
