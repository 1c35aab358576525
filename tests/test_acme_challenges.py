"""
L{edgeproxy.acme.challenges}: what answers an HTTP-01 validation and what
the TLS-ALPN-01 certificate holds.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509

from edgeproxy.acme.challenges import ID_PE_ACME_IDENTIFIER, ChallengeStore, tlsALPN01Certificate

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


@pytest.fixture
def store() -> ChallengeStore:
    challenges = ChallengeStore()
    challenges.addHTTP01("App.Example", TOKEN, KEY_AUTHORIZATION)
    return challenges


@pytest.mark.parametrize(
    "host, path, answered",
    [
        (b"app.example", b"/.well-known/acme-challenge/" + TOKEN.encode(), True),
        (b"APP.example:80", b"/.well-known/acme-challenge/" + TOKEN.encode(), True),
        ("app.example.", b"/.well-known/acme-challenge/" + TOKEN.encode() + b"?x=1", True),
        # Another name than the challenge's: not ours to answer.
        (b"other.example", b"/.well-known/acme-challenge/" + TOKEN.encode(), False),
        (None, b"/.well-known/acme-challenge/" + TOKEN.encode(), False),
        (b"app.example", b"/.well-known/acme-challenge/" + TOKEN[:-1].encode(), False),
        (b"app.example", b"/.well-known/acme-challenge/../" + TOKEN.encode(), False),
        (b"app.example", b"/" + TOKEN.encode(), False),
        (b"app.example", b"/.well-known/acme-challenge/", False),
    ],
)
def test_http01Answer(store: ChallengeStore, host: bytes | str | None, path: bytes, answered: bool) -> None:
    expected = KEY_AUTHORIZATION.encode() if answered else None
    assert store.http01Answer(host, path) == expected


def test_http01Removed(store: ChallengeStore) -> None:
    path = b"/.well-known/acme-challenge/" + TOKEN.encode()
    store.removeHTTP01ForName("app.example")
    assert store.http01Answer(b"app.example", path) is None
    assert store.pending == 0


def test_tlsALPN01Certificate() -> None:
    """RFC 8737 §3: one DNS name, the critical acmeIdentifier with the digest."""
    challenge = tlsALPN01Certificate("app.example", KEY_AUTHORIZATION)
    certificate = x509.load_pem_x509_certificate(challenge.certificatePEM)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["app.example"]
    extension = certificate.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert extension.critical
    digest = hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
    assert extension.value.value == b"\x04\x20" + digest


def test_snapshotRestore(store: ChallengeStore) -> None:
    """What a worker receives gives it the same answers."""
    store.addTLSALPN01(tlsALPN01Certificate("tls.example", KEY_AUTHORIZATION))
    changes: list[int] = []
    worker = ChallengeStore()
    worker.listeners.append(lambda: changes.append(worker.pending))
    worker.restore(store.snapshot())
    assert changes == [2]
    path = b"/.well-known/acme-challenge/" + TOKEN.encode()
    assert worker.http01Answer(b"app.example", path) == KEY_AUTHORIZATION.encode()
    assert worker.tlsALPN01("TLS.example") == store.tlsALPN01("tls.example")
    worker.restore({"http01": [], "tlsalpn01": []})
    assert worker.pending == 0
