# -*- test-case-name: tests.test_pool -*-
"""
What a failed request to a backend means: for the client (L{classifyFailure},
the L{ProxyError} it gets), for retrying (L{attemptOutcome}, how far the
attempt got) and for passive health (L{failureDetail}, the failure in the
words of the health checks).

The failures are those of L{edgeproxy.upstream.protocol}, in Twisted's
client classes: wrapper exceptions (C{ResponseFailed},
C{RequestTransmissionFailed}...) around what actually happened (connection
refused, reset, TLS errors, a response L{edgeproxy.h1} refuses...).
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from edgeproxy.errors import (
    BackendUnavailable,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.h1 import RemoteProtocolError
from edgeproxy.upstream import health
from edgeproxy.upstream.protocol import RequestNotSent
from edgeproxy.upstream.retry import Attempt

__all__ = ["attemptOutcome", "classifyFailure", "failureDetail", "leafReasons"]


def leafReasons(failure: Failure) -> list[Failure]:
    """
    Unwrap the C{reasons} lists of Twisted's client wrapper exceptions
    (C{ResponseFailed}, C{RequestTransmissionFailed}...) down to the failures
    that actually happened.
    """
    reasons = getattr(failure.value, "reasons", None)
    if not reasons:
        return [failure]
    leaves: list[Failure] = []
    for reason in reasons:
        leaves.extend(leafReasons(reason))
    return leaves


def classifyFailure(failure: Failure, timedOut: bool) -> ProxyError:
    """
    Map a failed request to a backend to the L{ProxyError} the client gets.

    @param failure: what the request failed with.
    @param timedOut: whether the response timeout cancelled the request.
    @return: L{UpstreamTimeout} for connect and response timeouts,
        L{BackendUnavailable} when no usable connection could be made
        (refused, DNS, TLS verification), L{UpstreamProtocolError} when the
        backend answered something that is not HTTP or hung up mid-answer.
    """
    if timedOut:
        return UpstreamTimeout("no response head within the response timeout")
    leaves = leafReasons(failure)
    described = "; ".join(f"{type(f.value).__name__}: {f.value}" for f in leaves)
    for leaf in leaves:
        if leaf.check(netError.TimeoutError, CancelledError):
            return UpstreamTimeout(f"connect timeout: {described}")
    for leaf in leaves:
        if leaf.check(SSL.Error):
            return BackendUnavailable(f"TLS failure: {described}")
        if leaf.check(netError.DNSLookupError, netError.ConnectError):
            return BackendUnavailable(f"connect failed: {described}")
    if failure.check(ResponseFailed):
        for leaf in leaves:
            if leaf.check(RemoteProtocolError):
                return UpstreamProtocolError(f"unparseable response: {described}")
        # The connection was made but closed (or reset) before a complete
        # response head: the backend is there but not answering properly.
        return BackendUnavailable(f"no response: {described}")
    if failure.check(RequestTransmissionFailed, RequestGenerationFailed):
        return BackendUnavailable(f"request not sent: {described}")
    return UpstreamProtocolError(f"unexpected upstream failure: {described}")


def attemptOutcome(failure: Failure, timedOut: bool) -> tuple[Attempt, str]:
    """
    How far a failed attempt got, for the retry decision, and a short label
    of the failure for the C{reason} of C{edgeproxy_retries}.

    @param failure: what the request failed with.
    @param timedOut: whether the response timeout cancelled the request.
    @return: (L{Attempt}, one of C{response_timeout}, C{response_started},
        C{local}, C{tls_failed}, C{connect_timeout}, C{connect_failed},
        C{not_sent}, C{no_response}).
    """
    if timedOut:
        return Attempt.NO_RESPONSE, "response_timeout"
    if failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived):
        # ResponseNeverReceived only when no byte of a response arrived;
        # any other ResponseFailed saw (part of) one.
        return Attempt.RESPONSE_STARTED, "response_started"
    if failure.check(RequestGenerationFailed):
        # Our own body producer failed (client gone, body over the limit).
        return Attempt.LOCAL, "local"
    leaves = leafReasons(failure)
    for leaf in leaves:
        if leaf.check(SSL.Error):
            # The TLS handshake failed: the backend's application never
            # accepted a request on this connection.
            return Attempt.NOT_SENT, "tls_failed"
    for leaf in leaves:
        if leaf.check(netError.TimeoutError):
            return Attempt.NOT_SENT, "connect_timeout"
        if leaf.check(netError.ConnectError, netError.DNSLookupError):
            return Attempt.NOT_SENT, "connect_failed"
        if leaf.check(RequestNotSent):
            return Attempt.NOT_SENT, "not_sent"
    for leaf in leaves:
        if leaf.check(CancelledError):
            return Attempt.LOCAL, "local"
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
        return Attempt.NO_RESPONSE, "no_response"
    return Attempt.RESPONSE_STARTED, "response_started"


def failureDetail(
    failure: Failure, timedOut: bool, connectTimeout: float, responseTimeout: float
) -> str:
    """
    A failed attempt in the words of the health checks' details
    (C{connection refused}, C{TLS: ...}, C{connect timeout}...), for the
    passive-health log lines.

    @param connectTimeout: the attempt's connect timeout.
    @param responseTimeout: the attempt's response timeout.
    """
    if timedOut:
        return f"no response head within {responseTimeout:g}s"
    leaves = leafReasons(failure)
    if any(leaf.check(RemoteProtocolError) for leaf in leaves):
        return "not an HTTP response"
    return health.describeFailure(leaves[0], connectTimeout)
