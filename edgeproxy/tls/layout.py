# -*- test-case-name: tests.test_tls_certs -*-
"""
Which files the C{[tls]} section names, and the certificates they make.

This module owns turning the C{[tls] certificates}, C{[tls] keys} and
C{[tls] default} settings into a validated L{CertificateSet}
(L{loadCertificates}): it expands the configured paths into bundles by the
rules below, pairs the keys of C{[tls] keys} with the certificates that
have none, loads each bundle (L{edgeproxy.tls.certs.loadEntry}) and marks
the default.  Pure, as L{edgeproxy.tls.certs}.

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

import os
import time
from dataclasses import dataclass, replace

from edgeproxy.config.files import PEM_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.model import TLSSettings
from edgeproxy.errors import CertificateError, ConfigError, ConfigErrors
from edgeproxy.tls.certs import CertificateEntry, CertificateSet, loadEntry
from edgeproxy.tls.pem import KEY_LABELS, PEM_BLOCK, PrivateKey, readPEM

_SECTION = "tls"


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
                keys, _ = readPEM(path, fail)
                if len(keys) != 1:
                    raise fail(f"expected one private key, found {len(keys)}")
            except CertificateError as e:
                errors.append(e)
                continue
            pool.append((path, keys[0]))
    return pool


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
        return None  # readPEM reports it with the right message
    for match in PEM_BLOCK.finditer(data):
        if match.group(1) in KEY_LABELS or match.group(1) == b"ENCRYPTED PRIVATE KEY":
            return None
    return keyPath
