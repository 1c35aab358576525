# -*- test-case-name: tests.test_tls_certs -*-
"""
Development certificates for edgeproxy: a private CA and the certificates the
example configuration uses.  Nothing this writes may be committed.

    .venv/bin/python certs/generate.py [--dir certs] [--force]

writes, under C{--dir} (default: the directory of this script):

  - C{internal/ca.pem}: the development root, certificate only (give it to
    clients: C{curl --cacert}, and to C{[upstream:*] ca});
  - C{internal/ca-key.pem}: its private key (needed to issue more);
  - C{live/default.pem}: key + certificate + intermediate for C{localhost},
    C{*.localhost}, C{127.0.0.1} and C{::1}, what the proxy serves;
  - C{internal/origin.pem}: key + certificate + intermediate for
    C{origin.internal} (and 127.0.0.1, ::1), served by the example origin;
  - C{internal/edge-client.pem}: key + certificate + intermediate the proxy
    may present to backends (client authentication).

It does nothing for a file that exists, chains to the current root and is
valid for more than 14 more days, unless C{--force}.  A missing or expiring
root regenerates everything.  Only C{cryptography} is used; private keys are
written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - depends on the interpreter used
    sys.exit(
        "certs/generate.py needs the 'cryptography' package: run it with the "
        "project's virtualenv, e.g. .venv/bin/python certs/generate.py"
    )

RENEW_BEFORE = datetime.timedelta(days=14)
LEAF_LIFETIME = datetime.timedelta(days=90)
CA_LIFETIME = datetime.timedelta(days=3650)

LEAVES: dict[str, dict[str, object]] = {
    "live/default.pem": {
        "names": ["localhost", "*.localhost", "127.0.0.1", "::1"],
        "client": False,
    },
    "internal/origin.pem": {
        "names": ["origin.internal", "127.0.0.1", "::1"],
        "client": False,
    },
    "internal/edge-client.pem": {"names": ["edgeproxy-edge"], "client": True},
}
CA_CERT = "internal/ca.pem"
CA_KEY = "internal/ca-key.pem"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(commonName: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName),
        ]
    )


def _keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certPEM(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)  # readers never see a half-written file
    print(f"wrote {path}")


def _caExtensions(
    builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, pathLength: int | None
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=pathLength), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def makeRoot() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = _name("edgeproxy development root")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + CA_LIFETIME)
    )
    return key, _caExtensions(builder, key, None).sign(key, hashes.SHA256())


def makeIntermediate(
    rootKey: ec.EllipticCurvePrivateKey, root: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("edgeproxy development intermediate"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        # An intermediate only needs to outlive the leaves it signs.
        .not_valid_after(min(root.not_valid_after_utc, now + LEAF_LIFETIME + datetime.timedelta(days=1)))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(rootKey.public_key()), critical=False
        )
    )
    return key, _caExtensions(builder, key, 0).sign(rootKey, hashes.SHA256())


def makeLeaf(
    issuerKey: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    names: list[str],
    client: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()), critical=False
        )
        .sign(issuerKey, hashes.SHA256())
    )
    return key, certificate


def _spki(publicKey: object) -> bytes:
    return publicKey.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _stillGood(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() > RENEW_BEFORE and cert.not_valid_before_utc <= _now()


def _loadRoot(base: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The existing root, if both files are there, match and are good."""
    try:
        cert = x509.load_pem_x509_certificate((base / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((base / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return None
    return (key, cert) if _stillGood(cert) else None


def _leafIsGood(path: Path, root: x509.Certificate) -> bool:
    """
    The bundle exists, its key matches its leaf, the leaf is good for more
    than RENEW_BEFORE and chains (through its intermediate) to C{root}.
    """
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
        certificates = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError, TypeError):
        return False
    if len(certificates) < 2:
        return False
    leaf, intermediate = certificates[0], certificates[1]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        return False
    try:
        leaf.verify_directly_issued_by(intermediate)
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return _stillGood(leaf) and _stillGood(intermediate)


def generate(base: Path, force: bool = False) -> list[Path]:
    """
    Create or renew what is missing or expiring.

    @return: the files written.
    """
    written: list[Path] = []
    root = None if force else _loadRoot(base)
    if root is None:
        rootKey, rootCert = makeRoot()
        _write(base / CA_KEY, _keyPEM(rootKey), private=True)
        _write(base / CA_CERT, _certPEM(rootCert), private=False)
        written += [base / CA_KEY, base / CA_CERT]
        force = True  # every leaf must chain to the new root
    else:
        rootKey, rootCert = root

    stale = [
        relative
        for relative in LEAVES
        if force or not _leafIsGood(base / relative, rootCert)
    ]
    if not stale:
        return written
    intermediateKey, intermediate = makeIntermediate(rootKey, rootCert)
    for relative in stale:
        spec = LEAVES[relative]
        key, cert = makeLeaf(
            intermediateKey, intermediate, list(spec["names"]), bool(spec["client"])  # type: ignore[call-overload]
        )
        _write(base / relative, _keyPEM(key) + _certPEM(cert) + _certPEM(intermediate), private=True)
        written.append(base / relative)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where to write live/ and internal/ (default: %(default)s)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate everything, even valid files"
    )
    options = parser.parse_args(argv)
    written = generate(options.dir, options.force)
    if not written:
        print(f"certificates in {options.dir} are valid for more than {RENEW_BEFORE.days} days; nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
