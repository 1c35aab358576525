"""
L{edgeproxy.tls.ocsp}: which OCSP responses may be stapled (checked on
responses built with cryptography's OCSP builder), and the stapler's
fetch, refresh and retry on a memory clock.
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from edgeproxy.tls.certs import loadEntry
from edgeproxy.tls.ocsp import OCSPRefused, OCSPStapler, checkResponse, requestFor, responderURL
from tests.certutil import CertificateAuthority, IssuedCertificate

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def withResponder(ca: CertificateAuthority, names: list[str], url: str = "http://127.0.0.1:9/ocsp") -> IssuedCertificate:
    """A leaf naming C{url} as its OCSP responder."""
    leaf = ca.issue(names)
    builder = x509.CertificateBuilder(
        issuer_name=leaf.certificate.issuer,
        subject_name=leaf.certificate.subject,
        public_key=leaf.key.public_key(),
        serial_number=leaf.certificate.serial_number,
        not_valid_before=leaf.certificate.not_valid_before_utc,
        not_valid_after=leaf.certificate.not_valid_after_utc,
        extensions=list(leaf.certificate.extensions),
    ).add_extension(
        x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url))
        ]),
        critical=False,
    )
    return IssuedCertificate(leaf.key, builder.sign(ca.key, hashes.SHA256()), leaf.chain)


def response(
    leaf: x509.Certificate,
    issuer: CertificateAuthority,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    thisUpdate: datetime.datetime | None = None,
    nextUpdate: datetime.datetime | None = None,
    signer: CertificateAuthority | None = None,
) -> bytes:
    """A DER OCSP response, as a responder would build it."""
    from cryptography.hazmat.primitives.serialization import Encoding

    signer = signer or issuer
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf,
        issuer=issuer.certificate,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=thisUpdate or NOW - datetime.timedelta(hours=1),
        next_update=nextUpdate or NOW + datetime.timedelta(days=3),
        revocation_time=NOW - datetime.timedelta(days=1) if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, signer.certificate)
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(Encoding.DER)


@pytest.fixture
def chain() -> tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]:
    root = CertificateAuthority("ocsp root")
    intermediate = root.intermediate("ocsp intermediate")
    return root, intermediate, withResponder(intermediate, ["a.example"])


def test_responderURL(chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    _, intermediate, leaf = chain
    assert responderURL(leaf.certificate) == "http://127.0.0.1:9/ocsp"
    assert responderURL(intermediate.issue(["b.example"]).certificate) is None


def test_goodResponseIsStapled(chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    _, intermediate, leaf = chain
    der = response(leaf.certificate, intermediate)
    staple = checkResponse(der, leaf.certificate, intermediate.certificate, NOW.timestamp())
    assert staple.der == der
    assert staple.nextUpdate == (NOW + datetime.timedelta(days=3)).timestamp()
    # Refreshed half-way through its validity.
    assert staple.refreshAt() == pytest.approx(staple.thisUpdate + (staple.nextUpdate - staple.thisUpdate) / 2)


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"status": ocsp.OCSPCertStatus.REVOKED}, "REVOKED"),
        ({"status": ocsp.OCSPCertStatus.UNKNOWN}, "unknown"),
        ({"thisUpdate": NOW - datetime.timedelta(days=3), "nextUpdate": NOW - datetime.timedelta(hours=1)}, "expired"),
        ({"thisUpdate": NOW + datetime.timedelta(hours=2)}, "not valid yet"),
    ],
)
def test_refusedResponses(
    chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate], kwargs: dict, why: str
) -> None:
    _, intermediate, leaf = chain
    der = response(leaf.certificate, intermediate, **kwargs)
    with pytest.raises(OCSPRefused, match=why):
        checkResponse(der, leaf.certificate, intermediate.certificate, NOW.timestamp())


def test_signedByAStranger(chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    """A response signed by a key the issuer did not delegate to is refused."""
    _, intermediate, leaf = chain
    stranger = CertificateAuthority("stranger")
    der = response(leaf.certificate, intermediate, signer=stranger)
    with pytest.raises(OCSPRefused, match="not signed by the issuer"):
        checkResponse(der, leaf.certificate, intermediate.certificate, NOW.timestamp())


def test_anotherCertificate(chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    _, intermediate, leaf = chain
    other = withResponder(intermediate, ["other.example"])
    der = response(other.certificate, intermediate)
    with pytest.raises(OCSPRefused, match="another certificate"):
        checkResponse(der, leaf.certificate, intermediate.certificate, NOW.timestamp())


def test_requestNamesTheCertificate(chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    _, intermediate, leaf = chain
    request = ocsp.load_der_ocsp_request(requestFor(leaf.certificate, intermediate.certificate))
    assert request.serial_number == leaf.certificate.serial_number


def test_stapler(tmp_path, chain: tuple[CertificateAuthority, CertificateAuthority, IssuedCertificate]) -> None:
    """
    Fetched at once, refreshed half-way, kept through a failed refresh until
    it expires, dropped at once on a revoked answer; a certificate without a
    responder is not fetched at all.
    """
    _, intermediate, leaf = chain
    entry = loadEntry(str(leaf.writePEM(tmp_path / "a.pem")), None, NOW.timestamp())
    plain = loadEntry(str(intermediate.issue(["b.example"]).writePEM(tmp_path / "b.pem")), None, NOW.timestamp())
    clock = Clock()
    clock.advance(NOW.timestamp())
    answers: list[Deferred[bytes]] = []
    asked: list[str] = []

    def fetch(url: str, body: bytes) -> Deferred[bytes]:
        asked.append(url)
        return answers.pop(0)

    stapler = OCSPStapler(clock, fetch)
    good = response(leaf.certificate, intermediate, thisUpdate=NOW, nextUpdate=NOW + datetime.timedelta(hours=4))
    answers.append(succeed(good))
    stapler.update([entry, plain])
    assert stapler.stapleFor(entry, clock.seconds()) is None
    clock.advance(0)
    assert asked == ["http://127.0.0.1:9/ocsp"]
    assert stapler.stapleFor(entry, clock.seconds()) == good
    assert stapler.status(plain, clock.seconds()) is None
    assert stapler.status(entry, clock.seconds())["stapled"] is True
    # Half-way: refreshed; the refresh fails, the staple stays.
    answers.append(fail(ConnectionRefusedError("refused")))
    clock.advance(2 * 3600)
    assert len(asked) == 2
    assert stapler.stapleFor(entry, clock.seconds()) == good
    assert "refused" in stapler.status(entry, clock.seconds())["last_error"]
    # The retry gets a revoked answer: nothing stapled from now on.
    answers.append(succeed(response(leaf.certificate, intermediate, status=ocsp.OCSPCertStatus.REVOKED)))
    clock.advance(60)
    assert len(asked) == 3
    assert stapler.stapleFor(entry, clock.seconds()) is None
    stapler.stop()
