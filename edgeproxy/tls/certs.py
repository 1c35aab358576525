# -*- test-case-name: tests.test_tls_certs -*-
"""
The certificates the listeners serve, as validated values.

This module owns L{CertificateEntry} (one servable certificate: its key,
leaf and chain), L{CertificateSet} (every certificate of a C{[tls]}
section, one of them the default) and L{loadEntry}, which reads one
bundle (a PEM file, a C{.crt}/C{.key} pair, a per-name directory's files)
into an entry and refuses anything a client would reject: a key that
matches no certificate, a certificate outside its validity period, a chain
with a gap or a stray certificate, no subject alternative names.  Which
files the C{[tls]} section names is L{edgeproxy.tls.layout}'s business,
reading PEM blocks and checking chains L{edgeproxy.tls.pem}'s.  It is
pure: files in, frozen values out, no Twisted and no OpenSSL contexts
(those are L{edgeproxy.tls.store}'s business).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from functools import partial

from cryptography import x509

from edgeproxy.errors import CertificateError
from edgeproxy.tls.pem import (
    PrivateKey,
    buildChain,
    checkValidity,
    leafFor,
    readPEM,
    subjectNames,
)

_SECTION = "tls"


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

    keys, certificates = readPEM(certPath, fail)
    for path in chainFiles:
        chainKeys, chainCertificates = readPEM(path, partial(fail, path=path))
        if chainKeys:
            raise fail("a chain file must not contain a private key", path)
        certificates.extend(chainCertificates)
    if not certificates:
        raise fail("no certificate found" + (" next to the private key" if keys else ""))
    keyProblem: CertificateError | None = None
    if keyPath is not None:
        try:
            moreKeys, moreCertificates = readPEM(keyPath, lambda m: fail(m, keyPath))
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
            if leafFor(poolKey, certificates) is not None:
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

    leaf = leafFor(privateKey, certificates)
    if leaf is None:
        if keyFile != certPath:
            raise fail(
                f"the private key in {keyFile} does not match the certificate in {certPath}",
                keyFile,
            )
        raise fail("the private key does not match any certificate in the file")
    chain, root = buildChain(leaf, certificates, fail)

    for cert in (leaf, *chain):
        checkValidity(cert, now, fail, isLeaf=cert is leaf)

    try:
        names = subjectNames(leaf)
    except ValueError as e:
        # cryptography parses extensions lazily: a malformed or duplicated
        # extension surfaces here rather than at load time.
        raise fail(f"the certificate's extensions are malformed: {e}")
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

    keys, certificates = readPEM(path, fail)
    if keys:
        raise fail("a CA file must not contain a private key")
    if not certificates:
        raise fail("no certificate found")
    return certificates
