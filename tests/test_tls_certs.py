"""
Tests for L{edgeproxy.tls.certs}: what gets loaded from which files, and
which files are refused with which message.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from edgeproxy.config.model import TLSSettings
from edgeproxy.errors import CertificateError, ConfigError
from edgeproxy.tls.certs import loadEntry
from edgeproxy.tls.layout import loadCertificates

from .certutil import CertificateAuthority, IssuedCertificate, certPEM, makeKey

NOW = time.time()
DAY = 86400.0


def _settings(*paths: Path, default: Path | None = None) -> TLSSettings:
    return TLSSettings(
        certificates=tuple(str(p) for p in paths),
        default=str(default) if default is not None else None,
    )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("certs test root")


def _refused(settings: TLSSettings) -> CertificateError:
    with pytest.raises(CertificateError) as info:
        loadCertificates(settings, now=NOW)
    return info.value


def test_bundleKeyFirstWithChain(ca: CertificateAuthority, tmp_path: Path) -> None:
    intermediate = ca.intermediate()
    issued = intermediate.issue(["A.Example", "*.b.example", "127.0.0.1", "::1"])
    pem = issued.writePEM(tmp_path / "site.pem")
    loaded = loadCertificates(_settings(pem), now=NOW)
    (entry,) = loaded.entries
    assert entry.path == str(pem)
    assert entry.names == ("a.example", "*.b.example", "127.0.0.1", "::1")
    assert entry.certificate == issued.certificate
    assert entry.chain == (intermediate.certificate,)
    assert entry.isDefault and loaded.default is entry
    assert entry.notAfter == issued.certificate.not_valid_after_utc
    assert entry.notAfter.tzinfo is not None


def test_anyOrderAndRootDropped(ca: CertificateAuthority, tmp_path: Path) -> None:
    """
    Key last, root first, intermediate in the middle, leaf at the end: the
    chain is rebuilt leaf upwards and the self-signed root is not served.
    """
    intermediate = ca.intermediate()
    issued = intermediate.issue(["order.example"])
    pem = tmp_path / "mixed.pem"
    pem.write_bytes(
        ca.certificatePEM
        + certPEM(intermediate.certificate)
        + issued.certificatePEM
        + issued.keyPEM
    )
    (entry,) = loadCertificates(_settings(pem), now=NOW).entries
    assert entry.certificate == issued.certificate
    assert entry.chain == (intermediate.certificate,)


def test_twoIntermediatesOutOfOrder(ca: CertificateAuthority, tmp_path: Path) -> None:
    upper = ca.intermediate("upper")
    lower = upper.intermediate("lower")
    issued = lower.issue(["deep.example"])
    pem = tmp_path / "deep.pem"
    pem.write_bytes(
        issued.keyPEM
        + certPEM(upper.certificate)
        + issued.certificatePEM
        + certPEM(lower.certificate)
    )
    (entry,) = loadCertificates(_settings(pem), now=NOW).entries
    assert entry.chain == (lower.certificate, upper.certificate)


def test_directoryPemAndPairs(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue(["one.example"]).writePEM(tmp_path / "one.pem", order="key-last")
    ca.issue(["two.example"]).writePair(tmp_path, "two")
    (tmp_path / "README.txt").write_text("not a certificate")
    (tmp_path / ".hidden.pem").write_text("editor swap file")
    loaded = loadCertificates(_settings(tmp_path), now=NOW)
    assert [e.names for e in loaded.entries] == [("one.example",), ("two.example",)]
    assert loaded.entries[1].path == str(tmp_path / "two.crt")
    assert loaded.default.names == ("one.example",)


def test_explicitCrtPairedWithKey(ca: CertificateAuthority, tmp_path: Path) -> None:
    crt, _ = ca.issue(["pair.example"]).writePair(tmp_path, "pair")
    (entry,) = loadCertificates(_settings(crt), now=NOW).entries
    assert entry.names == ("pair.example",)


def test_defaultSetting(ca: CertificateAuthority, tmp_path: Path) -> None:
    """
    C{default} picks the default among the loaded entries, or adds a file
    that is not among them.
    """
    first = ca.issue(["first.example"]).writePEM(tmp_path / "a.pem")
    second = ca.issue(["second.example"]).writePEM(tmp_path / "b.pem")
    loaded = loadCertificates(_settings(tmp_path, default=second), now=NOW)
    assert loaded.default.path == str(second)
    assert [e.isDefault for e in loaded.entries] == [False, True]

    elsewhere = tmp_path.parent / (tmp_path.name + "-default.pem")
    ca.issue(["fallback.example"]).writePEM(elsewhere)
    loaded = loadCertificates(_settings(first, default=elsewhere), now=NOW)
    assert loaded.default.names == ("fallback.example",)
    assert len(loaded.entries) == 2


def test_byNamePrefersLaterExpiry(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca.issue(["same.example"], notAfter=now + datetime.timedelta(days=80)).writePEM(
        tmp_path / "new.pem"
    )
    ca.issue(["same.example"], notAfter=now + datetime.timedelta(days=5)).writePEM(
        tmp_path / "old.pem"
    )
    loaded = loadCertificates(_settings(tmp_path), now=NOW)
    assert loaded.byName()["same.example"].path == str(tmp_path / "new.pem")


def test_expiringWithin(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca.issue(["soon.example"], notAfter=now + datetime.timedelta(days=3)).writePEM(
        tmp_path / "soon.pem"
    )
    ca.issue(["later.example"]).writePEM(tmp_path / "later.pem")
    loaded = loadCertificates(_settings(tmp_path), now=NOW)
    assert [e.names for e in loaded.expiringWithin(14 * DAY, NOW)] == [("soon.example",)]
    assert loaded.expiringWithin(DAY, NOW) == []
    assert len(loaded.expiringWithin(100 * DAY, NOW)) == 2


# Refusals: each names the file, the section and the key.


def test_keyDoesNotMatch(ca: CertificateAuthority, tmp_path: Path) -> None:
    one = ca.issue(["one.example"])
    other = ca.issue(["other.example"])
    pem = tmp_path / "mismatch.pem"
    pem.write_bytes(other.keyPEM + one.certificatePEM)
    error = _refused(_settings(pem))
    assert isinstance(error, ConfigError)
    assert (error.file, error.section, error.key) == (str(pem), "tls", "certificates")
    assert "does not match" in error.message
    assert str(error).startswith(f"{pem}: [tls] certificates: ")


def test_expired(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = ca.issue(
        ["old.example"],
        notBefore=now - datetime.timedelta(days=100),
        notAfter=now - datetime.timedelta(days=1),
    ).writePEM(tmp_path / "old.pem")
    error = _refused(_settings(pem))
    assert error.file == str(pem) and "expired" in error.message


def test_notYetValid(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = ca.issue(
        ["future.example"],
        notBefore=now + datetime.timedelta(days=2),
        notAfter=now + datetime.timedelta(days=90),
    ).writePEM(tmp_path / "future.pem")
    assert "not valid before" in _refused(_settings(pem)).message


def test_validityCheckedAgainstNow(tmp_path: Path) -> None:
    """
    The check uses C{now}: the same file loads today and is refused once
    the leaf is past its notAfter.
    """
    ca = CertificateAuthority()
    pem = ca.issue(["t.example"]).writePEM(tmp_path / "t.pem")
    loadCertificates(_settings(pem), now=NOW)
    error = _refused_at(_settings(pem), NOW + 200 * DAY)
    assert "expired" in error.message


def _refused_at(settings: TLSSettings, now: float) -> CertificateError:
    with pytest.raises(CertificateError) as info:
        loadCertificates(settings, now=now)
    return info.value


def test_strayIntermediate(ca: CertificateAuthority, tmp_path: Path) -> None:
    """An intermediate that did not issue the leaf is a broken chain."""
    issued = ca.intermediate("right").issue(["chain.example"])
    wrong = ca.intermediate("wrong")
    pem = tmp_path / "broken.pem"
    pem.write_bytes(issued.keyPEM + issued.certificatePEM + certPEM(wrong.certificate))
    error = _refused(_settings(pem))
    assert "broken chain" in error.message and "wrong" in error.message


def test_gapInChain(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Leaf and upper intermediate without the lower one between them."""
    upper = ca.intermediate("upper")
    lower = upper.intermediate("lower")
    issued = lower.issue(["gap.example"])
    pem = tmp_path / "gap.pem"
    pem.write_bytes(issued.keyPEM + issued.certificatePEM + certPEM(upper.certificate))
    assert "broken chain" in _refused(_settings(pem)).message


def test_noSubjectAltNames(ca: CertificateAuthority, tmp_path: Path) -> None:
    pem = ca.issue([]).writePEM(tmp_path / "nosan.pem")
    assert "subject alternative names" in _refused(_settings(pem)).message


def test_ipNetworkInSubjectAltNames(ca: CertificateAuthority, tmp_path: Path) -> None:
    """
    An iPAddress of 8 octets (an address and a mask, which RFC 5280 allows in
    name constraints only) refuses the certificate, saying so: not as
    extensions that cannot be parsed.
    """
    key = makeKey()
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pem = IssuedCertificate(key, cert).writePEM(tmp_path / "network.pem")
    message = _refused(_settings(pem)).message
    assert "the IP network 10.0.0.0/8, where only addresses belong" in message
    assert "does not appear to be" not in message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "no PEM data"),
        (b"hello world\n", "no PEM data"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "not a valid certificate",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "not a valid private key",
        ),
        (
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "encrypted",
        ),
    ],
)
def test_garbage(tmp_path: Path, content: bytes, expected: str) -> None:
    pem = tmp_path / "garbage.pem"
    pem.write_bytes(content)
    error = _refused(_settings(pem))
    assert error.file == str(pem) and expected in error.message


def test_missingFile(tmp_path: Path) -> None:
    error = _refused(_settings(tmp_path / "absent.pem"))
    assert error.file == str(tmp_path / "absent.pem")
    assert "no such file" in error.message


def test_certificateWithoutKeyInDirectory(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A CA bundle dropped into a certificate directory is reported."""
    ca.issue(["ok.example"]).writePEM(tmp_path / "ok.pem")
    bundle = ca.writeCertificate(tmp_path / "ca-bundle.pem")
    error = _refused(_settings(tmp_path))
    assert error.file == str(bundle) and "no private key" in error.message


def test_halfPairs(ca: CertificateAuthority, tmp_path: Path) -> None:
    crt, key = ca.issue(["half.example"]).writePair(tmp_path, "half")
    key.unlink()
    error = _refused(_settings(tmp_path))
    assert error.file == str(crt) and "half.key" in error.message
    crt.unlink()
    ca.issue(["other.example"]).writePair(tmp_path, "other")[0].unlink()
    error = _refused(_settings(tmp_path))
    assert error.file == str(tmp_path / "other.key")


def test_twoKeys(ca: CertificateAuthority, tmp_path: Path) -> None:
    one, two = ca.issue(["1.example"]), ca.issue(["2.example"])
    pem = tmp_path / "two.pem"
    pem.write_bytes(one.keyPEM + one.certificatePEM + two.keyPEM + two.certificatePEM)
    assert "2 private keys" in _refused(_settings(pem)).message


def test_emptyDirectory(tmp_path: Path) -> None:
    error = _refused(_settings(tmp_path))
    assert error.key == "certificates" and "no certificate found" in error.message


def test_badDefault(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Errors in the C{default} file carry C{key="default"}."""
    good = ca.issue(["good.example"]).writePEM(tmp_path / "good.pem")
    bad = tmp_path.parent / (tmp_path.name + "-bad.pem")
    bad.write_bytes(b"junk")
    error = _refused(_settings(good, default=bad))
    assert (error.file, error.key) == (str(bad), "default")


def test_clientCertificateNeedsNoNames(ca: CertificateAuthority, tmp_path: Path) -> None:
    pem = ca.issue([], clientAuth=True).writePEM(tmp_path / "client.pem")
    entry = loadEntry(str(pem), requireNames=False, section="upstream:x", key="client_certificate")
    assert entry.names == ()
    with pytest.raises(CertificateError) as info:
        loadEntry(str(pem), section="upstream:x", key="client_certificate")
    assert info.value.section == "upstream:x"


def test_rsaKeysAndIPv6(tmp_path: Path) -> None:
    ca = CertificateAuthority(keyType="rsa")
    pem = ca.issue(["2001:DB8::1", "rsa.example"], keyType="rsa").writePEM(tmp_path / "r.pem")
    (entry,) = loadCertificates(_settings(pem), now=NOW).entries
    assert entry.names == ("rsa.example", "2001:db8::1")


# The development certificate generator (certs/generate.py)


def _generator():  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "certs" / "generate.py"
    spec = importlib.util.spec_from_file_location("edgeproxy_certs_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generatorOutputLoads(tmp_path: Path) -> None:
    """
    What the generator writes is what edgeproxy accepts: the served
    certificate with its chain, the origin's and the client's.
    """
    generate = _generator()
    written = generate.generate(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "internal/ca.pem",
        "internal/ca-key.pem",
        "live/default.pem",
        "internal/origin.pem",
        "internal/edge-client.pem",
    }
    loaded = loadCertificates(_settings(tmp_path / "live"), now=NOW)
    assert loaded.default.names == ("localhost", "*.localhost", "127.0.0.1", "::1")
    assert len(loaded.default.chain) == 1
    root = _loadPEMCertificate(tmp_path / "internal" / "ca.pem")
    loaded.default.chain[0].verify_directly_issued_by(root)
    assert loadEntry(str(tmp_path / "internal" / "origin.pem")).names[0] == "origin.internal"
    assert loadEntry(str(tmp_path / "internal" / "edge-client.pem")).names == ("edgeproxy-edge",)
    for private in ["internal/ca-key.pem", "live/default.pem", "internal/origin.pem"]:
        assert (tmp_path / private).stat().st_mode & 0o077 == 0, private
    assert b"PRIVATE KEY" not in (tmp_path / "internal" / "ca.pem").read_bytes()


def _loadPEMCertificate(path: Path):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generatorIsIdempotent(tmp_path: Path) -> None:
    generate = _generator()
    generate.generate(tmp_path)
    before = (tmp_path / "live" / "default.pem").read_bytes()
    assert generate.generate(tmp_path) == []
    (tmp_path / "internal" / "origin.pem").write_bytes(b"damaged")
    assert generate.generate(tmp_path) == [tmp_path / "internal" / "origin.pem"]
    assert (tmp_path / "live" / "default.pem").read_bytes() == before
    assert len(generate.generate(tmp_path, force=True)) == 5
    assert (tmp_path / "live" / "default.pem").read_bytes() != before
