"""
The pure parts of L{edgeproxy.acme.client}: the RFC 9773 certificate
identifier, C{Retry-After}, new keys.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgeproxy.acme.client import ariCertID, newKey, parseRetryAfter
from edgeproxy.config.acmemodel import ACMEKeyType


def test_ariCertIDOfRFC9773() -> None:
    """RFC 9773 §4.1's example: AKI 69:88:5B:..., serial 00:87:65:43:21."""
    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(0x87654321).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
        .sign(key, hashes.SHA256())
    )
    assert ariCertID(certificate) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_parseRetryAfter() -> None:
    assert parseRetryAfter("120", 0.0) == 120.0
    assert parseRetryAfter(None, 0.0) is None
    assert parseRetryAfter("soon", 0.0) is None
    when = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert parseRetryAfter("Tue, 01 Jan 2030 00:01:00 GMT", when) == 60.0


def test_newKey() -> None:
    for keyType, kind, size in [
        (ACMEKeyType.ECDSA_P256, ec.EllipticCurvePrivateKey, 256),
        (ACMEKeyType.ECDSA_P384, ec.EllipticCurvePrivateKey, 384),
        (ACMEKeyType.RSA_2048, rsa.RSAPrivateKey, 2048),
    ]:
        key = serialization.load_pem_private_key(newKey(keyType), password=None)
        assert isinstance(key, kind) and key.key_size == size
