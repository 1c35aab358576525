"""
Resize parameters from the query, and the signature scheme (a table of
queries; signing and checking round trips; the command that signs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.content.params import Resize, checkSignature, readResize, sign, signTarget

FORMATS = (b"avif", b"webp")
KEY = b"k" * 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "query, expected",
    [
        (b"", None),
        (b"?v=3", None),
        (b"?w=200", Resize(width=200)),
        (b"?w=200&h=100&fit=cover&q=50&fmt=webp", Resize(200, 100, "cover", 50, b"webp")),
        (b"?h=8192&fmt=auto&v=1", Resize(height=8192)),
        (b"?q=70", Resize(quality=70)),
        (b"?fmt=avif&sig=abc", Resize(fmt=b"avif")),
    ],
)
def test_readResize(query: bytes, expected: Resize | None) -> None:
    assert readResize(query, FORMATS) == expected


@pytest.mark.parametrize(
    "query, error",
    [
        (b"?w=0", "w must be a whole number from 1 to 8192"),
        (b"?w=8193", "w must be"),
        (b"?h=abc", "h must be"),
        (b"?w=", "w must be"),
        (b"?w=-5", "w must be"),
        (b"?w=1&w=2", "w is given twice"),
        (b"?fit=stretch", "fit must be contain, cover or fill"),
        (b"?q=0", "q must be a whole number from 1 to 100"),
        (b"?q=101", "q must be"),
        (b"?fmt=png", "fmt must be auto or one of avif, webp"),
    ],
)
def test_badResize(query: bytes, error: str) -> None:
    resize = readResize(query, FORMATS)
    assert resize is not None and error in resize.error


def test_fmtMustBeOffered() -> None:
    assert readResize(b"?fmt=avif", (b"webp",)).error  # type: ignore[union-attr]


def test_signTarget() -> None:
    signed = signTarget(KEY, b"/img/./cat.jpg?w=200&h=100")
    path, _, query = signed.partition(b"?")
    assert path == b"/img/cat.jpg", "the path is signed in its normal form"
    assert query.startswith(b"w=200&h=100&sig=")
    assert checkSignature(KEY, path, b"?" + query)
    assert signTarget(KEY, b"/a.png").startswith(b"/a.png?sig=")
    assert checkSignature(KEY, b"/a.png", signTarget(KEY, b"/a.png")[6:])


def test_signatureScheme() -> None:
    """HMAC-SHA256 of path and query before sig, unpadded base64url."""
    import base64
    import hashlib
    import hmac

    expected = base64.urlsafe_b64encode(hmac.new(KEY, b"/x.jpg?w=1", hashlib.sha256).digest()).rstrip(b"=")
    assert sign(KEY, b"/x.jpg?w=1") == expected
    assert checkSignature(KEY, b"/x.jpg", b"?w=1&sig=" + expected)


@pytest.mark.parametrize(
    "path, query",
    [
        (b"/x.jpg", b"?w=2&sig=SIG"),  # a parameter changed
        (b"/y.jpg", b"?w=1&sig=SIG"),  # another path
        (b"/x.jpg", b"?w=1&v=2&sig=SIG"),  # a parameter added
        (b"/x.jpg", b"?sig=SIG&w=1"),  # sig not last
        (b"/x.jpg", b"?w=1"),  # no sig
        (b"/x.jpg", b"?w=1&sig="),
    ],
)
def test_wrongSignatures(path: bytes, query: bytes) -> None:
    good = sign(KEY, b"/x.jpg?w=1")
    assert checkSignature(KEY, b"/x.jpg", b"?w=1&sig=" + good)
    assert not checkSignature(KEY, path, query.replace(b"SIG", good))
    assert not checkSignature(b"other" * 8, b"/x.jpg", b"?w=1&sig=" + good)


def test_signingCommand(tmp_path: Path) -> None:
    keyFile = tmp_path / "image.key"
    keyFile.write_bytes(KEY + b"\n")
    out = subprocess.run(
        [sys.executable, "-m", "edgeproxy.content.params", str(keyFile), "/img/cat.jpg?w=400"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == signTarget(KEY, b"/img/cat.jpg?w=400").decode()
