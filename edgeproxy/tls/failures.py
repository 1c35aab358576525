# -*- test-case-name: tests.test_metrics -*-
"""
Why a client's TLS handshake failed, in the few words a metric label can
carry: L{handshakeFailureReason}.

The reasons:

  - C{no_shared_cipher}: the client offered no cipher suite, signature
    algorithm or group this proxy accepts;
  - C{protocol_version}: no common TLS version (a TLS 1.0/1.1 client, or
    TLS 1.2 against C{min_version = 1.3}), or not TLS at all;
  - C{unknown_sni}: the client asked for a name no certificate covers, got
    the default certificate, and gave up (the usual end of such a
    handshake: a verifying client refuses a certificate for another name);
  - C{other}: anything else (a client that does not trust the chain, a
    broken record...).

OpenSSL reports a failure as a list of C{(library, function, reason)}
strings; the reason strings matched here are OpenSSL 3's.  Pure: no
Twisted, no HTTP.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL

from edgeproxy.tls.store import sentUnknownName

__all__ = ["HANDSHAKE_FAILURE_REASONS", "handshakeFailureReason"]

HANDSHAKE_FAILURE_REASONS = ("no_shared_cipher", "protocol_version", "unknown_sni", "other")

_NO_SHARED = (
    "no shared cipher",
    "no shared signature algorithms",
    "no suitable signature algorithm",
    "no suitable key share",
    "no shared groups",
    "sslv3 alert handshake failure",
    "tlsv1 alert insufficient security",
)
_VERSION = (
    "unsupported protocol",
    "wrong version number",
    "version too low",
    "tlsv1 alert protocol version",
    "http request",
    "https proxy request",
    "unknown protocol",
    "packet length too long",
    "record layer failure",
)


def _reasons(error: BaseException) -> list[str]:
    texts: list[str] = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            texts.append(str(entry[-1]).lower())
    if not texts:
        texts.append(str(error).lower())
    return texts


def handshakeFailureReason(reason: Any, connection: SSL.Connection | None = None) -> str:
    """
    @param reason: the L{Failure} (or exception) the connection was lost
        with, before its handshake completed.
    @param connection: the server's L{SSL.Connection}, when known: it tells
        whether the client sent a name no certificate covers.
    @return: one of L{HANDSHAKE_FAILURE_REASONS}.
    """
    error = getattr(reason, "value", reason)
    if not isinstance(error, SSL.Error):
        return "other"
    texts = _reasons(error)
    if any(known in text for text in texts for known in _NO_SHARED):
        return "no_shared_cipher"
    if any(known in text for text in texts for known in _VERSION):
        return "protocol_version"
    if connection is not None and sentUnknownName(connection):
        return "unknown_sni"
    return "other"
