# -*- test-case-name: tests.test_acme_challenges -*-
"""
The pending ACME challenges and what answers them.

L{ChallengeStore} owns the challenges the CA may be validating right now:
HTTP-01 tokens (RFC 8555 §8.3) and TLS-ALPN-01 certificates (RFC 8737).
It is pure: it decides what answers a validation request
(L{ChallengeStore.http01Answer}, L{ChallengeStore.tlsALPN01}) and tells
its listeners when the set changes, so that the TLS store can build the
challenge contexts and a supervisor can tell its workers.  In a worker,
the same store is filled from the control channel instead of by the ACME
client.

L{tlsALPN01Certificate} makes the self-signed certificate of RFC 8737 §3
for one name and key authorization.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

__all__ = [
    "ACME_TLS_1",
    "HTTP01_PREFIX",
    "ChallengeStore",
    "TLSALPNChallenge",
    "tlsALPN01Certificate",
]

ACME_TLS_1 = b"acme-tls/1"
"""The ALPN protocol of TLS-ALPN-01 (RFC 8737 §6.2)."""

HTTP01_PREFIX = b"/.well-known/acme-challenge/"
"""Where HTTP-01 tokens are fetched (RFC 8555 §8.3)."""

ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""RFC 8737 §6.1: the acmeIdentifier extension."""

# RFC 8555 §8.1: tokens are base64url, at least 128 bits.
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{22,256}\Z")


@dataclass(frozen=True, slots=True)
class TLSALPNChallenge:
    """One pending TLS-ALPN-01 challenge: the certificate to present."""

    name: str
    certificatePEM: bytes
    keyPEM: bytes


def tlsALPN01Certificate(name: str, keyAuthorization: str) -> TLSALPNChallenge:
    """
    The challenge certificate of RFC 8737 §3: self-signed, the one DNS name
    in its subjectAltName, and a critical acmeIdentifier extension holding
    the SHA-256 digest of the key authorization (a DER OCTET STRING).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    # DER OCTET STRING of 32 bytes: tag 0x04, length 0x20.
    extensionValue = b"\x04\x20" + digest
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME challenge")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, extensionValue), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return TLSALPNChallenge(
        name=name,
        certificatePEM=certificate.public_bytes(serialization.Encoding.PEM),
        keyPEM=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _hostOnly(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


class ChallengeStore:
    """
    The challenges pending now.  An HTTP-01 token is answered for the name
    it was issued for only; a TLS-ALPN-01 certificate is presented for its
    name only.

    @ivar listeners: called with no argument after every change.
    """

    def __init__(self) -> None:
        self._http01: dict[bytes, tuple[str, bytes]] = {}
        self._tlsALPN01: dict[str, TLSALPNChallenge] = {}
        self.listeners: list[Callable[[], None]] = []

    # HTTP-01 --------------------------------------------------------------

    def addHTTP01(self, name: str, token: str, keyAuthorization: str) -> None:
        self._http01[token.encode("ascii")] = (name.lower(), keyAuthorization.encode("ascii"))
        self._changed()

    def removeHTTP01(self, token: str) -> None:
        if self._http01.pop(token.encode("ascii"), None) is not None:
            self._changed()

    def removeHTTP01ForName(self, name: str) -> None:
        name = name.lower()
        tokens = [token for token, (owner, _) in self._http01.items() if owner == name]
        for token in tokens:
            del self._http01[token]
        if tokens:
            self._changed()

    def http01Answer(self, host: str | bytes | None, path: bytes) -> bytes | None:
        """
        The body answering an HTTP-01 validation request, or L{None} when
        the request is not one (the caller then handles it as usual).

        The ACME HTTP-01 hook of every plain-HTTP listener calls this first,
        before redirecting or routing (RFC 8555 §8.3: the CA fetches
        C{http://NAME/.well-known/acme-challenge/TOKEN} on port 80 and
        follows no redirect to another scheme before it got the token).

        @param host: the request's C{Host} (a port is ignored).
        @param path: the request target's path (a query is ignored).
        """
        if not self._http01 or not path.startswith(HTTP01_PREFIX):
            return None
        token = path[len(HTTP01_PREFIX):].partition(b"?")[0]
        if not _TOKEN.match(token):
            return None
        entry = self._http01.get(token)
        if entry is None:
            return None
        name, keyAuthorization = entry
        if host is None:
            return None
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if _hostOnly(host) != name:
            return None
        return keyAuthorization

    # TLS-ALPN-01 ------------------------------------------------------------

    def addTLSALPN01(self, challenge: TLSALPNChallenge) -> None:
        self._tlsALPN01[challenge.name.lower()] = challenge
        self._changed()

    def removeTLSALPN01(self, name: str) -> None:
        if self._tlsALPN01.pop(name.lower(), None) is not None:
            self._changed()

    def tlsALPN01(self, name: str) -> TLSALPNChallenge | None:
        return self._tlsALPN01.get(name.lower())

    @property
    def tlsALPN01Challenges(self) -> dict[str, TLSALPNChallenge]:
        """Name -> pending TLS-ALPN-01 challenge (a copy)."""
        return dict(self._tlsALPN01)

    @property
    def pending(self) -> int:
        """How many challenges are pending (both kinds)."""
        return len(self._http01) + len(self._tlsALPN01)

    # Messages (supervisor -> workers) ---------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Everything pending, as one JSON-able message body (see L{restore})."""
        return {
            "http01": [
                {"token": token.decode("ascii"), "name": name, "keyAuthorization": ka.decode("ascii")}
                for token, (name, ka) in self._http01.items()
            ],
            "tlsalpn01": [
                {"name": c.name, "certificate": c.certificatePEM.decode("ascii"), "key": c.keyPEM.decode("ascii")}
                for c in self._tlsALPN01.values()
            ],
        }

    def restore(self, snapshot: dict[str, object]) -> None:
        """Replace everything pending by what L{snapshot} gave (a worker)."""
        http01: dict[bytes, tuple[str, bytes]] = {}
        for entry in snapshot.get("http01") or ():  # type: ignore[attr-defined]
            http01[str(entry["token"]).encode("ascii")] = (
                str(entry["name"]).lower(),
                str(entry["keyAuthorization"]).encode("ascii"),
            )
        tlsALPN01: dict[str, TLSALPNChallenge] = {}
        for entry in snapshot.get("tlsalpn01") or ():  # type: ignore[attr-defined]
            challenge = TLSALPNChallenge(
                str(entry["name"]).lower(),
                str(entry["certificate"]).encode("ascii"),
                str(entry["key"]).encode("ascii"),
            )
            tlsALPN01[challenge.name] = challenge
        self._http01 = http01
        self._tlsALPN01 = tlsALPN01
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()
