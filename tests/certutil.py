"""
Certificates made at test time, so that no private key is ever committed and
none expires in the repository.

    ca = CertificateAuthority("Test Root")
    leaf = ca.issue(["a.example", "*.b.example"])
    leaf.writePEM(tmp / "a.pem")                  # key + certificate + chain
    leaf.writePair(tmp, "a")                       # a.crt (+chain) and a.key
    ca.certificatePEM                              # trust anchor for clients

Keys are ECDSA P-256 by default (fast to make); C{keyType="rsa"} gives
RSA-2048.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def makeKey(keyType: str = "ec") -> PrivateKey:
    if keyType == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def keyPEM(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certPEM(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _subjectAltNames(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass
class IssuedCertificate:
    key: PrivateKey
    certificate: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)
    """Intermediates between this certificate and the root (root excluded)."""

    @property
    def keyPEM(self) -> bytes:
        return keyPEM(self.key)

    @property
    def certificatePEM(self) -> bytes:
        return certPEM(self.certificate)

    @property
    def chainPEM(self) -> bytes:
        return b"".join(certPEM(c) for c in self.chain)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    def writePEM(self, path: Path | str, order: str = "key-first") -> Path:
        """
        Write key, certificate and chain into one PEM file.  C{order} is
        C{"key-first"} or C{"key-last"} (both must be accepted).
        """
        path = Path(path)
        body = self.certificatePEM + self.chainPEM
        path.write_bytes(
            self.keyPEM + body if order == "key-first" else body + self.keyPEM
        )
        return path

    def writePair(self, directory: Path | str, basename: str) -> tuple[Path, Path]:
        """Write C{basename.crt} (certificate + chain) and C{basename.key}."""
        directory = Path(directory)
        crt = directory / f"{basename}.crt"
        key = directory / f"{basename}.key"
        crt.write_bytes(self.certificatePEM + self.chainPEM)
        key.write_bytes(self.keyPEM)
        return crt, key


class CertificateAuthority:
    """A root (or, through L{intermediate}, an intermediate) that issues."""

    def __init__(
        self,
        commonName: str = "edgeproxy test root",
        keyType: str = "ec",
        _issuer: "CertificateAuthority | None" = None,
    ) -> None:
        self.key = makeKey(keyType)
        self.parent = _issuer
        now = _now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
        signer = _issuer.key if _issuer is not None else self.key
        issuerName = _issuer.certificate.subject if _issuer is not None else name
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuerName)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                critical=False,
            )
        )
        self.certificate = builder.sign(signer, hashes.SHA256())

    @property
    def certificatePEM(self) -> bytes:
        return certPEM(self.certificate)

    def writeCertificate(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_bytes(self.certificatePEM)
        return path

    def _chainAbove(self) -> list[x509.Certificate]:
        """Certificates from this CA up to, excluding, the root."""
        chain: list[x509.Certificate] = []
        ca: CertificateAuthority | None = self
        while ca is not None and ca.parent is not None:
            chain.append(ca.certificate)
            ca = ca.parent
        return chain

    def intermediate(self, commonName: str = "edgeproxy test intermediate") -> "CertificateAuthority":
        return CertificateAuthority(commonName, _issuer=self)

    def issue(
        self,
        names: list[str],
        notBefore: datetime.datetime | None = None,
        notAfter: datetime.datetime | None = None,
        keyType: str = "ec",
        clientAuth: bool = False,
        key: PrivateKey | None = None,
    ) -> IssuedCertificate:
        """
        Issue a leaf for C{names} (DNS names, wildcards, or IP literals), valid
        from yesterday for 90 days unless told otherwise.
        """
        now = _now()
        leafKey = key if key is not None else makeKey(keyType)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if clientAuth:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "client")])
            )
            .issuer_name(self.certificate.subject)
            .public_key(leafKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore or now - datetime.timedelta(days=1))
            .not_valid_after(notAfter or now + datetime.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(_subjectAltNames(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(leafKey, cert, self._chainAbove())


def writeCertbot(issued: IssuedCertificate, root: Path | str, name: str, version: int = 1) -> Path:
    """
    Write C{issued} as certbot does: C{archive/NAME/{cert,chain,fullchain,
    privkey}N.pem} and C{live/NAME/*.pem} symbolic links to them (and the
    C{README} certbot leaves in C{live/}).

    @return: the C{live/NAME} directory.
    """
    root = Path(root)
    archive = root / "archive" / name
    live = root / "live" / name
    archive.mkdir(parents=True, exist_ok=True)
    live.mkdir(parents=True, exist_ok=True)
    (root / "live" / "README").write_text("This directory contains your keys and certificates.\n")
    files = {
        "cert": issued.certificatePEM,
        "chain": issued.chainPEM,
        "fullchain": issued.certificatePEM + issued.chainPEM,
        "privkey": issued.keyPEM,
    }
    for kind, data in files.items():
        target = archive / f"{kind}{version}.pem"
        target.write_bytes(data)
        link = live / f"{kind}.pem"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "archive" / name / f"{kind}{version}.pem")
    return live
