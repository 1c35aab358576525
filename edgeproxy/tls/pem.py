# -*- test-case-name: tests.test_tls_certs -*-
"""
Reading PEM files of keys and certificates, and the checks a served
certificate passes.

This module owns L{readPEM} (the private keys and certificates of one
file, refused when unreadable, encrypted or undecodable), pairing a key
with its certificate by public key (L{leafFor}), ordering a chain from the
leaf upwards (L{buildChain}), the validity period (L{checkValidity}) and
the subject alternative names (L{subjectNames}).  Every refusal is a
L{CertificateError} made by the caller's C{fail}, which knows the file and
the configuration key.  Pure: files in, values out.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from typing import Callable, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edgeproxy.config.files import PEM_LIMIT, FileProblem, readRegularFile
from edgeproxy.errors import CertificateError

PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]

# RFC 7468 §2: textual encoding; the label of BEGIN and END must match.
PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----",
    re.DOTALL,
)
KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}

Fail = Callable[[str], CertificateError]
"""Makes the L{CertificateError} for a message, file and place filled in."""


def readPEM(
    path: str, fail: Fail
) -> tuple[list[PrivateKey], list[x509.Certificate]]:
    """The private keys and certificates of the PEM file C{path}."""
    try:
        data = readRegularFile(path, PEM_LIMIT)
    except FileProblem as e:
        message = str(e)
        raise fail("no such file" if message == "does not exist" else message)
    keys: list[PrivateKey] = []
    certificates: list[x509.Certificate] = []
    blocks = list(PEM_BLOCK.finditer(data))
    if not blocks:
        raise fail("no PEM data (expected -----BEGIN ...----- blocks)")
    for number, match in enumerate(blocks, start=1):
        label = match.group(1)
        block = match.group(0)
        if label == b"CERTIFICATE":
            try:
                certificates.append(x509.load_pem_x509_certificate(block))
            except ValueError as e:
                raise fail(f"PEM block {number} is not a valid certificate: {e}")
        elif label == b"ENCRYPTED PRIVATE KEY":
            raise fail("encrypted private keys are not supported; store it decrypted, mode 0600")
        elif label in KEY_LABELS:
            try:
                loaded = serialization.load_pem_private_key(block, password=None)
            except TypeError:
                raise fail("encrypted private keys are not supported; store it decrypted, mode 0600")
            except (ValueError, UnsupportedAlgorithm) as e:
                raise fail(f"PEM block {number} is not a valid private key: {e}")
            if not isinstance(
                loaded,
                (
                    rsa.RSAPrivateKey,
                    ec.EllipticCurvePrivateKey,
                    ed25519.Ed25519PrivateKey,
                    ed448.Ed448PrivateKey,
                ),
            ):
                raise fail(f"PEM block {number}: unsupported key type {type(loaded).__name__}")
            keys.append(loaded)
        # Other labels (EC PARAMETERS from "openssl ecparam", DH PARAMETERS)
        # carry nothing we serve.
    return keys, certificates


def _publicBytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def leafFor(
    key: PrivateKey, certificates: list[x509.Certificate]
) -> x509.Certificate | None:
    """The certificate of C{certificates} whose public key is C{key}'s."""
    wanted = _publicBytes(key.public_key())
    for cert in certificates:
        try:
            if _publicBytes(cert.public_key()) == wanted:
                return cert
        except (ValueError, UnsupportedAlgorithm):
            continue
    return None


def _issuedBy(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def buildChain(
    leaf: x509.Certificate, certificates: list[x509.Certificate], fail: Fail
) -> tuple[list[x509.Certificate], x509.Certificate | None]:
    """
    Order C{certificates} from the issuer of C{leaf} upwards.

    @return: the intermediates to send and the self-signed root if the file
        held one (not sent).
    @raise CertificateError: when a certificate in the file is not on the
        path from the leaf to its root: a wrong intermediate, or a gap in the
        chain.
    """
    remaining = [c for c in certificates if c != leaf]
    chain: list[x509.Certificate] = []
    root: x509.Certificate | None = None
    current = leaf
    while not _issuedBy(current, current):
        issuer = next((c for c in remaining if _issuedBy(current, c)), None)
        if issuer is None:
            break
        remaining = [c for c in remaining if c != issuer]
        if _issuedBy(issuer, issuer):
            root = issuer
            break
        chain.append(issuer)
        current = issuer
    if remaining:
        stray = remaining[0]
        raise fail(
            "broken chain: the certificate for "
            f"{stray.subject.rfc4514_string()!r} does not issue "
            f"{current.subject.rfc4514_string()!r} (issuer "
            f"{current.issuer.rfc4514_string()!r}); "
            "an intermediate is missing or does not belong to this certificate"
        )
    return chain, root


def checkValidity(
    cert: x509.Certificate, now: float, fail: Fail, isLeaf: bool
) -> None:
    what = "the certificate" if isLeaf else (
        f"the chain certificate {cert.subject.rfc4514_string()!r}"
    )
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if cert.not_valid_after_utc < moment:
        raise fail(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > moment:
        raise fail(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")


def subjectNames(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for dns in san.value.get_values_for_type(x509.DNSName):
        name = dns.lower().rstrip(".")
        if name and name not in names:
            names.append(name)
    for ip in san.value.get_values_for_type(x509.IPAddress):
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            # cryptography gives a network for an 8- or 32-octet iPAddress,
            # a form RFC 5280 allows in name constraints only.
            raise ValueError(
                f"its subject alternative names list the IP network {ip}, where only "
                "addresses belong (RFC 5280 4.2.1.6)"
            )
        text = str(ip)
        if text not in names:
            names.append(text)
    return tuple(names)
