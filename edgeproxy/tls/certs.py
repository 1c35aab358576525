# -*- test-case-name: tests.test_tls_certs -*-
"""
Reading the certificates the listeners serve.

This module owns turning the C{[tls] certificates} and C{[tls] default}
settings into a validated L{CertificateSet}: it reads PEM files and
C{.crt}/C{.key} pairs, pairs each private key with its certificate by public
key, orders the chain from the leaf upwards, and refuses anything a client
would reject (a key that matches no certificate, a certificate outside its
validity period, a chain with a gap or a stray certificate, no subject
alternative names).  It is pure: files in, frozen values out, no Twisted and
no OpenSSL contexts (those are L{edgeproxy.tls.store}'s business).

File layout rules (also in C{certs/README.rst} and C{docs/configuration.rst}):

  - A configured I{file} is one bundle: exactly one private key plus its
    certificate and, optionally, the intermediates (and even the root) in any
    order.  A configured file that holds no private key is paired with the
    file of the same basename and a C{.key} suffix next to it
    (C{site.crt} + C{site.key}).
  - A I{per-name directory} is the layout certbot and most CAs produce: it
    holds C{fullchain.pem} (certificate and intermediates) or C{cert.pem}
    plus C{chain.pem}, and C{privkey.pem}.  It is one bundle, read without
    concatenating anything; it may be configured itself, or found inside a
    configured directory (C{/etc/letsencrypt/live/} is a directory of them).
  - Any other configured I{directory} is scanned (not recursively, in name
    order): every C{*.pem} is a bundle as above, every C{NAME.crt} is paired
    with C{NAME.key}, and every subdirectory that is a per-name directory is
    read as one.  A C{*.pem} without a private key, a C{.crt} without its
    C{.key} or a C{.key} without its C{.crt} is an error, so that a stray CA
    bundle or a half-copied renewal is reported rather than silently not
    served.  Other files, other subdirectories and names starting with C{.}
    are ignored (certbot's C{README}).
  - C{[tls] keys} names key files, or directories whose C{*.key} and
    C{*.pem} files are keys: a certificate with no key of its own takes the
    one of them that matches its public key.  systemd's C{LoadCredential=}
    hands a service keys it cannot read itself this way
    (C{keys = ${CREDENTIALS_DIRECTORY}}).
  - When two certificates claim the same name, the one that expires last
    serves it (so an old file left next to its renewal does no harm); an
    exact name is preferred to a wildcard covering it, whatever their
    expiry (L{edgeproxy.tls.store.CertificateStore.lookup}).
  - Files are read only when they are regular files of at most
    L{edgeproxy.config.files.PEM_LIMIT} bytes.

Every bundle that cannot be served is reported, not only the first.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edgeproxy.config.files import PEM_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.model import TLSSettings
from edgeproxy.errors import CertificateError, ConfigError, ConfigErrors

PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]

_SECTION = "tls"

# RFC 7468 §2: textual encoding; the label of BEGIN and END must match.
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----",
    re.DOTALL,
)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}

_Fail = Callable[[str], CertificateError]
"""Makes the L{CertificateError} for a message, file and place filled in."""


@dataclass(frozen=True, slots=True)
class CertificateEntry:
    """
    One servable certificate: a private key, its leaf certificate and the
    chain sent after it.
    """

    path: str
    """The file the entry came from (for a C{.crt}/C{.key} pair: the
    certificate file)."""
    names: tuple[str, ...]
    """Lower-case DNS names (wildcards included, as C{*.example.com}) and IP
    addresses (in their compressed text form) from the subject alternative
    names, in certificate order."""
    notBefore: datetime.datetime
    """Start of validity, UTC."""
    notAfter: datetime.datetime
    """End of validity, UTC."""
    key: PrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False, default=())
    """Intermediates from the issuer of the leaf upwards.  A self-signed root
    found in the file is not included: a client must already have it to
    trust it, so sending it only costs bytes (RFC 8446 §4.4.2)."""
    isDefault: bool = False
    """Whether this entry is served to clients sending no or an unknown SNI
    name."""
    source: str = "file"
    """Where it came from: C{"file"} (C{[tls]}) or C{"acme"} (ordered by
    L{edgeproxy.acme})."""

    @property
    def issuer(self) -> str:
        """The issuer's distinguished name (RFC 4514 text)."""
        return self.certificate.issuer.rfc4514_string()

    def secondsLeft(self, now: float) -> float:
        """
        @return: seconds from C{now} (POSIX time) until C{notAfter}; negative
            once expired.
        """
        return self.notAfter.timestamp() - now


@dataclass(frozen=True, slots=True)
class CertificateSet:
    """
    Everything a set of C{[tls]} settings names, validated.  Exactly one
    entry has C{isDefault}.
    """

    entries: tuple[CertificateEntry, ...]

    @property
    def default(self) -> CertificateEntry:
        for entry in self.entries:
            if entry.isDefault:
                return entry
        raise AssertionError("a CertificateSet always has a default entry")

    def byName(self) -> dict[str, CertificateEntry]:
        """
        @return: each served name (lower case, wildcards as C{*.suffix}) to
            the entry serving it; for a name on several certificates, the one
            that expires last.
        """
        mapping: dict[str, CertificateEntry] = {}
        for entry in self.entries:
            for name in entry.names:
                current = mapping.get(name)
                if current is None or entry.notAfter > current.notAfter:
                    mapping[name] = entry
        return mapping

    def expiringWithin(
        self, seconds: float, now: float | None = None
    ) -> list[CertificateEntry]:
        """
        @param seconds: the warning horizon.
        @param now: POSIX time; the current time when L{None}.
        @return: the entries whose C{notAfter} is at most C{seconds} away,
            soonest first.
        """
        if now is None:
            now = time.time()
        soon = [e for e in self.entries if e.secondsLeft(now) <= seconds]
        return sorted(soon, key=lambda e: e.notAfter)


@dataclass(frozen=True, slots=True)
class _Bundle:
    """The files of one servable certificate, before they are read."""

    certificate: str
    """The file holding the leaf (and perhaps the key and chain)."""
    key: str | None = None
    """A separate key file, when there is one."""
    chain: tuple[str, ...] = ()
    """Separate files of intermediates (certbot's C{chain.pem})."""
    directory: str | None = None
    """The per-name directory it came from, when it did."""


_PER_NAME_FILES = ("fullchain.pem", "cert.pem")


def isPerNameDirectory(path: str) -> bool:
    """Whether C{path} is a directory in certbot's layout (one name per directory)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in _PER_NAME_FILES)


def _perName(directory: str) -> _Bundle:
    key = os.path.join(directory, "privkey.pem")
    keyPath = key if os.path.lexists(key) else None
    fullchain = os.path.join(directory, "fullchain.pem")
    if os.path.isfile(fullchain):
        return _Bundle(fullchain, keyPath, (), directory)
    chain = os.path.join(directory, "chain.pem")
    return _Bundle(
        os.path.join(directory, "cert.pem"),
        keyPath,
        (chain,) if os.path.lexists(chain) else (),
        directory,
    )


def loadCertificates(settings: TLSSettings, now: float | None = None) -> CertificateSet:
    """
    Read and validate every certificate C{settings} names.

    @param settings: the C{[tls]} section.
    @param now: POSIX time to check validity against; the current time when
        L{None}.
    @raise CertificateError: naming the offending file, with section C{tls}
        and key C{certificates}, C{keys} or C{default}; a L{ConfigErrors}
        of them when several bundles cannot be served.
    """
    if now is None:
        now = time.time()
    errors: list[ConfigError] = []
    pool = _keyPool(settings.keys, errors)
    entries: list[CertificateEntry] = []
    seen: set[str] = set()
    for configured in settings.certificates:
        for bundle in _bundlesIn(configured, errors):
            real = os.path.realpath(bundle.certificate)
            if real in seen:
                continue
            seen.add(real)
            try:
                entries.append(_loadBundle(bundle, now, "certificates", pool))
            except CertificateError as e:
                errors.append(e)

    defaultIndex = 0
    if settings.default is not None:
        default = settings.default
        bundle = _perName(default) if os.path.isdir(default) else _Bundle(default, pairedKeyPath(default))
        real = os.path.realpath(bundle.certificate)
        for index, entry in enumerate(entries):
            if os.path.realpath(entry.path) == real:
                defaultIndex = index
                break
        else:
            if real in seen:
                # It is among the certificates and could not be loaded:
                # reported once, as such.
                raise ConfigErrors.of(errors)
            try:
                entries.append(_loadBundle(bundle, now, "default", pool))
                defaultIndex = len(entries) - 1
            except CertificateError as e:
                errors.append(e)

    if errors:
        raise ConfigErrors.of(errors)
    if not entries:
        raise CertificateError(
            "no certificate found in "
            + (", ".join(settings.certificates) or "(nothing configured)"),
            file=settings.certificates[0] if settings.certificates else None,
            section=_SECTION,
            key="certificates",
        )
    entries[defaultIndex] = replace(entries[defaultIndex], isDefault=True)
    return CertificateSet(tuple(entries))


def _loadBundle(
    bundle: _Bundle, now: float, key: str, pool: list[tuple[str, PrivateKey]]
) -> CertificateEntry:
    return loadEntry(
        bundle.certificate, bundle.key, now, key=key, chainFiles=bundle.chain, keyPool=pool
    )


def _keyPool(paths: tuple[str, ...], errors: list[ConfigError]) -> list[tuple[str, PrivateKey]]:
    """The keys of C{[tls] keys}: files, and C{*.key}/C{*.pem} in directories."""
    pool: list[tuple[str, PrivateKey]] = []
    for configured in paths:
        if os.path.isdir(configured):
            try:
                names = sorted(os.listdir(configured))
            except OSError as e:
                errors.append(
                    CertificateError(
                        f"cannot list directory: {e.strerror}",
                        file=configured, section=_SECTION, key="keys",
                    )
                )
                continue
            files = [
                os.path.join(configured, name)
                for name in names
                if not name.startswith(".") and name.endswith((".key", ".pem"))
            ]
        else:
            files = [configured]
        for path in files:
            if not os.path.isfile(path):
                continue

            def fail(message: str, path: str = path) -> CertificateError:
                return CertificateError(message, file=path, section=_SECTION, key="keys")

            try:
                keys, _ = _readPEM(path, fail)
                if len(keys) != 1:
                    raise fail(f"expected one private key, found {len(keys)}")
            except CertificateError as e:
                errors.append(e)
                continue
            pool.append((path, keys[0]))
    return pool


def loadEntry(
    certPath: str,
    keyPath: str | None = None,
    now: float | None = None,
    *,
    section: str = _SECTION,
    key: str = "certificates",
    requireNames: bool = True,
    chainFiles: tuple[str, ...] = (),
    keyPool: list[tuple[str, PrivateKey]] | None = None,
) -> CertificateEntry:
    """
    Load one bundle (or C{.crt} + C{.key} pair, or per-name directory) into
    a validated entry.

    Also used for client certificates presented to backends (with another
    C{section}/C{key}).

    @param certPath: PEM file holding the certificate (and possibly the key
        and chain).
    @param keyPath: separate PEM file holding the key, or L{None}.
    @param chainFiles: separate PEM files holding intermediates.
    @param keyPool: keys (with their files) to pair by public key when the
        bundle has none of its own (C{[tls] keys}).
    @param requireNames: refuse a certificate without DNS/IP subject
        alternative names (a server certificate); client certificates need
        none.
    @raise CertificateError: naming the file at fault.
    """
    if now is None:
        now = time.time()

    def fail(message: str, path: str = certPath) -> CertificateError:
        return CertificateError(message, file=path, section=section, key=key)

    keys, certificates = _readPEM(certPath, fail)
    for path in chainFiles:
        chainKeys, chainCertificates = _readPEM(path, partial(fail, path=path))
        if chainKeys:
            raise fail("a chain file must not contain a private key", path)
        certificates.extend(chainCertificates)
    if not certificates:
        raise fail("no certificate found" + (" next to the private key" if keys else ""))
    keyProblem: CertificateError | None = None
    if keyPath is not None:
        try:
            moreKeys, moreCertificates = _readPEM(keyPath, lambda m: fail(m, keyPath))
        except CertificateError as e:
            # A key systemd passed in (keyPool) may stand in for one this
            # user cannot read.
            keyProblem = e
        else:
            certificates.extend(moreCertificates)
            keys.extend(moreKeys)
    keyFile = keyPath if keyPath is not None and keyProblem is None and keys else certPath
    if not keys:
        for poolPath, poolKey in keyPool or ():
            if _leafFor(poolKey, certificates) is not None:
                keys, keyFile = [poolKey], poolPath
                break
    if not keys:
        if keyProblem is not None:
            raise keyProblem
        pooled = " or among [tls] keys" if keyPool else ""
        raise fail(
            "no private key: put the key in the same PEM file or next to it "
            f"as a .key file with the same basename{pooled}"
        )
    if len(keys) > 1:
        raise fail(f"{len(keys)} private keys found; one bundle holds exactly one key")
    privateKey = keys[0]

    leaf = _leafFor(privateKey, certificates)
    if leaf is None:
        if keyFile != certPath:
            raise fail(
                f"the private key in {keyFile} does not match the certificate in {certPath}",
                keyFile,
            )
        raise fail("the private key does not match any certificate in the file")
    chain, root = _buildChain(leaf, certificates, fail)

    for cert in (leaf, *chain):
        _checkValidity(cert, now, fail, isLeaf=cert is leaf)

    try:
        names = _subjectNames(leaf)
    except ValueError as e:
        # cryptography parses extensions lazily: a malformed or duplicated
        # extension surfaces here rather than at load time.
        raise fail(f"the certificate's extensions cannot be parsed: {e}")
    if requireNames and not names:
        raise fail(
            "the certificate has no DNS or IP subject alternative names; "
            "clients ignore the common name (RFC 9110 §4.3.4)"
        )
    return CertificateEntry(
        path=certPath,
        names=names,
        notBefore=leaf.not_valid_before_utc,
        notAfter=leaf.not_valid_after_utc,
        key=privateKey,
        certificate=leaf,
        chain=tuple(chain),
    )


def readCertificates(
    path: str, *, section: str, key: str
) -> list[x509.Certificate]:
    """
    Read a bundle of trust anchors (a CA file): every certificate in it, no
    private key allowed.

    @raise CertificateError: when the file is unreadable, holds no
        certificate, holds a private key or an undecodable block.
    """

    def fail(message: str) -> CertificateError:
        return CertificateError(message, file=path, section=section, key=key)

    keys, certificates = _readPEM(path, fail)
    if keys:
        raise fail("a CA file must not contain a private key")
    if not certificates:
        raise fail("no certificate found")
    return certificates


def _bundlesIn(configured: str, errors: list[ConfigError]) -> list[_Bundle]:
    """
    Expand one configured path into bundles following the layout rules of
    the module docstring; layout problems go to C{errors}.
    """

    def problem(message: str, path: str) -> None:
        errors.append(
            CertificateError(message, file=path, section=_SECTION, key="certificates")
        )

    if not os.path.isdir(configured):
        if not os.path.exists(configured):
            problem("no such file or directory", configured)
            return []
        return [_Bundle(configured, pairedKeyPath(configured))]
    if isPerNameDirectory(configured):
        return [_perName(configured)]
    try:
        names = sorted(os.listdir(configured))
    except OSError as e:
        problem(f"cannot list directory: {e.strerror}", configured)
        return []
    bundles: list[_Bundle] = []
    files = {n for n in names if not n.startswith(".")}
    for name in sorted(files):
        path = os.path.join(configured, name)
        if os.path.isdir(path):
            if isPerNameDirectory(path):
                bundles.append(_perName(path))
            continue
        if not os.path.isfile(path):
            continue
        base, ext = os.path.splitext(name)
        if ext == ".pem":
            bundles.append(_Bundle(path))
        elif ext == ".crt":
            if base + ".key" not in files:
                problem(f"no {base}.key next to this certificate", path)
                continue
            bundles.append(_Bundle(path, os.path.join(configured, base + ".key")))
        elif ext == ".key" and base + ".crt" not in files:
            problem(f"private key without a {base}.crt next to it", path)
    return bundles


def pairedKeyPath(certPath: str) -> str | None:
    """
    The C{.key} file next to an explicitly configured file, used only when
    that file holds no private key itself.

    @return: the key file's path, or L{None} when there is none to pair.
    """
    keyPath = os.path.splitext(certPath)[0] + ".key"
    if keyPath == certPath or not os.path.isfile(keyPath):
        return None
    try:
        data = readRegularFile(certPath, PEM_LIMIT)
    except FileProblem:
        return None  # _readPEM reports it with the right message
    for match in _PEM_BLOCK.finditer(data):
        if match.group(1) in _KEY_LABELS or match.group(1) == b"ENCRYPTED PRIVATE KEY":
            return None
    return keyPath


def _readPEM(
    path: str, fail: _Fail
) -> tuple[list[PrivateKey], list[x509.Certificate]]:
    try:
        data = readRegularFile(path, PEM_LIMIT)
    except FileProblem as e:
        message = str(e)
        raise fail("no such file" if message == "does not exist" else message)
    keys: list[PrivateKey] = []
    certificates: list[x509.Certificate] = []
    blocks = list(_PEM_BLOCK.finditer(data))
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
        elif label in _KEY_LABELS:
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
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _leafFor(
    key: PrivateKey, certificates: list[x509.Certificate]
) -> x509.Certificate | None:
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


def _buildChain(
    leaf: x509.Certificate, certificates: list[x509.Certificate], fail: _Fail
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


def _checkValidity(
    cert: x509.Certificate, now: float, fail: _Fail, isLeaf: bool
) -> None:
    what = "the certificate" if isLeaf else (
        f"the chain certificate {cert.subject.rfc4514_string()!r}"
    )
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if cert.not_valid_after_utc < moment:
        raise fail(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > moment:
        raise fail(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")


def _subjectNames(cert: x509.Certificate) -> tuple[str, ...]:
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
        text = str(ipaddress.ip_address(ip))
        if text not in names:
            names.append(text)
    return tuple(names)
