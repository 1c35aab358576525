# -*- test-case-name: tests.test_tls_ocsp -*-
"""
OCSP stapling (RFC 6066 §8, RFC 6960): the responses the TLS listeners
staple to their certificates.

L{OCSPStapler} fetches a response for every served certificate that names
an OCSP responder (its Authority Information Access), keeps it, and
refreshes it at half its validity (between C{thisUpdate} and
C{nextUpdate}); a failed fetch is retried with a growing delay while the
response held stays stapled until its C{nextUpdate}.  L{checkResponse}
(pure) decides what may be stapled: a successful response for exactly
this certificate, signed by its issuer or by a responder the issuer
delegated to, currently valid, and C{good}.  A revoked, unknown, expired
or badly signed response is never stapled (a client would reject the
connection, RFC 6960 §4.2.2.1), and it is logged.

A certificate without a responder URL is served without a staple and
without a word in the log.  The store (L{edgeproxy.tls.store}) asks
L{OCSPStapler.stapleFor} at each handshake whose client asks for a status.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from edgeproxy.tls.certs import CertificateEntry

__all__ = ["OCSPRefused", "Staple", "OCSPStapler", "checkResponse", "responderURL", "requestFor"]

log = Logger()

CLOCK_SKEW = 300.0
"""Seconds a response's C{thisUpdate} may lie in the future (the responder's
clock may run ahead of ours)."""

FETCH_TIMEOUT = 10.0
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0
MIN_REFRESH = 60.0
"""Never fetch the same response more often than this."""


class OCSPRefused(Exception):
    """A response that must not be stapled; the message says why."""


@dataclass(frozen=True, slots=True)
class Staple:
    der: bytes
    thisUpdate: float
    nextUpdate: float
    fetchedAt: float

    def refreshAt(self) -> float:
        """Half-way through its validity (and not sooner than a minute)."""
        return max(self.fetchedAt + MIN_REFRESH, self.thisUpdate + (self.nextUpdate - self.thisUpdate) / 2)


def responderURL(certificate: x509.Certificate) -> str | None:
    """The first C{http} OCSP responder of the AIA extension, or L{None}."""
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except (x509.ExtensionNotFound, ValueError):
        return None
    for description in aia.value:
        if description.access_method == AuthorityInformationAccessOID.OCSP:
            location = description.access_location
            if isinstance(location, x509.UniformResourceIdentifier) and location.value.lower().startswith("http://"):
                return location.value
    return None


def requestFor(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """The DER OCSP request for one certificate (SHA-1 CertID, RFC 5019 §2.1.1)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _verify(signer: x509.Certificate, response: ocsp.OCSPResponse) -> bool:
    key = signer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(),
                       response.signature_hash_algorithm)  # type: ignore[arg-type]
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes,
                       ec.ECDSA(response.signature_hash_algorithm))  # type: ignore[arg-type]
        else:
            key.verify(response.signature, response.tbs_response_bytes)  # type: ignore[call-arg, union-attr]
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True


def _signedBy(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == certificate.subject
    keyHash = hashlib.sha1(
        certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        if isinstance(certificate.public_key(), rsa.RSAPublicKey)
        else certificate.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ).digest()
    return response.responder_key_hash == keyHash


def checkResponse(der: bytes, certificate: x509.Certificate, issuer: x509.Certificate, now: float) -> Staple:
    """
    Decide whether a DER OCSP response may be stapled to C{certificate}.

    @raise OCSPRefused: saying why not (not successful, another
        certificate, bad signature, not yet or no longer valid, revoked,
        unknown).
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise OCSPRefused(f"not an OCSP response: {e}") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPRefused(f"the responder answered {response.response_status.name.lower()}")
    if response.serial_number != certificate.serial_number:
        raise OCSPRefused("the response is for another certificate")
    # RFC 6960 §4.2.2.2: signed by the issuer itself, or by a responder
    # certificate the issuer issued with the OCSPSigning purpose.
    signer = issuer if _signedBy(response, issuer) else None
    if signer is None:
        for candidate in response.certificates:
            try:
                usage = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (x509.ExtensionNotFound, ValueError):
                continue
            if ExtendedKeyUsageOID.OCSP_SIGNING not in usage or not _signedBy(response, candidate):
                continue
            try:
                candidate.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            signer = candidate
            break
    if signer is None or not _verify(signer, response):
        raise OCSPRefused("the response is not signed by the issuer or a responder it delegated to")
    thisUpdate = response.this_update_utc.timestamp()
    nextUpdate = response.next_update_utc.timestamp() if response.next_update_utc else None
    if thisUpdate > now + CLOCK_SKEW:
        raise OCSPRefused("the response is not valid yet (thisUpdate in the future)")
    if nextUpdate is None:
        # RFC 5019 §2.2.4: responses for stapling carry nextUpdate.
        raise OCSPRefused("the response has no nextUpdate")
    if nextUpdate <= now:
        raise OCSPRefused(
            "the response expired at " + datetime.datetime.fromtimestamp(nextUpdate, datetime.timezone.utc).isoformat()
        )
    status = response.certificate_status
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = response.revocation_time_utc
        raise OCSPRefused("the certificate is REVOKED" + (f" since {when.isoformat()}" if when else ""))
    if status != ocsp.OCSPCertStatus.GOOD:
        raise OCSPRefused("the responder does not know the certificate (status unknown)")
    return Staple(der=der, thisUpdate=thisUpdate, nextUpdate=nextUpdate, fetchedAt=now)


Fetch = Callable[[str, bytes], "Deferred[bytes]"]
"""POST an OCSP request (DER) to a URL; fires with the response body."""


def treqFetch(reactor: Any) -> Fetch:
    """The production L{Fetch}: a C{treq} POST (RFC 6960 appendix A.1)."""
    import treq

    async def fetch(url: str, body: bytes) -> bytes:
        response = await treq.post(
            url,
            data=body,
            headers=Headers({b"Content-Type": [b"application/ocsp-request"]}),
            timeout=FETCH_TIMEOUT,
            reactor=reactor,
            persistent=False,
        )
        content = await treq.content(response)
        if response.code != 200:
            raise OCSPRefused(f"the responder answered HTTP {response.code}")
        return content

    return lambda url, body: Deferred.fromCoroutine(fetch(url, body))


@dataclass
class _Tracked:
    entry: CertificateEntry
    url: str
    issuer: x509.Certificate
    staple: Staple | None = None
    lastError: str | None = None
    failures: int = 0
    timer: Any = None


def _key(entry: CertificateEntry) -> bytes:
    return entry.certificate.fingerprint(hashes.SHA256())


class OCSPStapler:
    """
    The OCSP responses of the served certificates: fetched, checked, kept
    and refreshed.  L{update} with the certificates served after every
    swap.
    """

    def __init__(self, clock: Any, fetch: Fetch) -> None:
        self._clock = clock
        self._fetch = fetch
        self._tracked: dict[bytes, _Tracked] = {}

    def update(self, entries: Iterable[CertificateEntry]) -> None:
        """Track these certificates (those naming a responder), and only these."""
        wanted: dict[bytes, CertificateEntry] = {}
        for entry in entries:
            if responderURL(entry.certificate) is not None:
                wanted[_key(entry)] = entry
        for key in list(self._tracked):
            if key not in wanted:
                tracked = self._tracked.pop(key)
                if tracked.timer is not None and tracked.timer.active():
                    tracked.timer.cancel()
        for key, entry in wanted.items():
            if key in self._tracked:
                continue
            if not entry.chain:
                log.warn(
                    "OCSP: cannot staple for {names}: its issuer is not in {path}",
                    names=", ".join(entry.names), path=entry.path,
                )
                continue
            url = responderURL(entry.certificate)
            assert url is not None
            tracked = _Tracked(entry, url, entry.chain[0])
            self._tracked[key] = tracked
            tracked.timer = self._clock.callLater(0, self._refresh, key)

    def stop(self) -> None:
        for tracked in self._tracked.values():
            if tracked.timer is not None and tracked.timer.active():
                tracked.timer.cancel()
        self._tracked = {}

    def stapleFor(self, entry: CertificateEntry, now: float) -> bytes | None:
        """The response to staple now, or L{None} (none, or expired)."""
        tracked = self._tracked.get(_key(entry))
        if tracked is None or tracked.staple is None or tracked.staple.nextUpdate <= now:
            return None
        return tracked.staple.der

    def status(self, entry: CertificateEntry, now: float) -> dict[str, Any] | None:
        """For C{/status}: the staple's age and validity, or L{None} when
        the certificate names no responder."""
        tracked = self._tracked.get(_key(entry))
        if tracked is None:
            return None
        staple = tracked.staple
        stapled = staple is not None and staple.nextUpdate > now
        return {
            "responder": tracked.url,
            "stapled": stapled,
            "age_seconds": round(now - staple.fetchedAt, 1) if staple is not None else None,
            "this_update": staple.thisUpdate if staple is not None else None,
            "next_update": staple.nextUpdate if staple is not None else None,
            "last_error": tracked.lastError,
        }

    def _refresh(self, key: bytes) -> None:
        Deferred.fromCoroutine(self._fetchOne(key))

    async def _fetchOne(self, key: bytes) -> None:
        tracked = self._tracked.get(key)
        if tracked is None:
            return
        tracked.timer = None
        entry = tracked.entry
        names = ", ".join(entry.names)
        try:
            der = await self._fetch(tracked.url, requestFor(entry.certificate, tracked.issuer))
            staple = checkResponse(der, entry.certificate, tracked.issuer, self._clock.seconds())
        except Exception as e:
            if self._tracked.get(key) is not tracked:
                return
            why = str(e) or type(e).__name__
            tracked.failures += 1
            tracked.lastError = why
            if isinstance(e, OCSPRefused) and ("REVOKED" in why or "expired" in why or "unknown" in why):
                # What we held must not outlive a verdict like this one.
                tracked.staple = None
            delay = min(MAX_RETRY, FIRST_RETRY * 2 ** min(tracked.failures - 1, 10))
            log.error(
                "OCSP: no staple for {names} from {url}: {why}; next try in {delay}s",
                names=names, url=tracked.url, why=why, delay=delay,
            )
            tracked.timer = self._clock.callLater(delay, self._refresh, key)
            return
        if self._tracked.get(key) is not tracked:
            return
        tracked.staple = staple
        tracked.failures = 0
        tracked.lastError = None
        delay = max(MIN_REFRESH, staple.refreshAt() - self._clock.seconds())
        log.info(
            "OCSP: stapling a good response for {names}, valid until {nextUpdate}",
            names=names,
            nextUpdate=datetime.datetime.fromtimestamp(staple.nextUpdate, datetime.timezone.utc).isoformat(),
        )
        tracked.timer = self._clock.callLater(delay, self._refresh, key)
