# -*- test-case-name: tests.test_content_params -*-
"""
Resize parameters in an image request's query (C{w}, C{h}, C{fit}, C{q},
C{fmt}, with C{image_resize = yes}) and their signatures (with
C{image_signing_key_file}).

The signature scheme, for whoever builds image URLs:

    sig = base64url(HMAC-SHA256(key, PATH + QUERY_BEFORE_SIG)), unpadded

where C{PATH} is the request's path in its normal form (as the proxy
routes it: L{edgeproxy.targets.normaliseTarget}) and C{QUERY_BEFORE_SIG}
the query as sent, from its C{?} up to the C{&sig=} that must end it
(empty when C{sig} is the only parameter).  Every parameter is signed,
not only the resize ones, so that a signed URL cannot be varied to make
the edge convert the same image over and over.  L{signTarget} does it;
from a shell:

    python -m edgeproxy.content.params image.key '/img/cat.jpg?w=400&fmt=auto'

prints C{/img/cat.jpg?w=400&fmt=auto&sig=...}.  The key is the file's
content with surrounding white space stripped.

Pure: no Twisted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
from collections.abc import Sequence
from typing import NamedTuple

from edgeproxy.targets import normaliseTarget

__all__ = [
    "MAX_DIMENSION",
    "Resize",
    "checkSignature",
    "readResize",
    "sign",
    "signTarget",
]

MAX_DIMENSION = 8192
"""The largest C{w} or C{h} accepted."""

_NAMES = (b"w", b"h", b"fit", b"q", b"fmt")
_FITS = {b"contain": "contain", b"cover": "cover", b"fill": "fill"}


class Resize(NamedTuple):
    """The resize parameters of one request (L{None} for those not given)."""

    width: int | None = None
    height: int | None = None
    fit: str = "contain"
    quality: int | None = None
    fmt: bytes | None = None
    """C{b"avif"} or C{b"webp"}: this format whatever C{Accept} says;
    L{None} (or C{fmt=auto}): negotiated."""
    error: str = ""
    """Why the parameters are not acceptable (the answer is 400), or C{""}."""


def _number(value: bytes, low: int, high: int) -> int | None:
    if not value.isdigit() or len(value) > 6:
        return None
    number = int(value)
    return number if low <= number <= high else None


def readResize(query: bytes, formats: Sequence[bytes]) -> Resize | None:
    """
    The resize parameters in C{query} (C{b""} or C{b"?..."}), L{None} when
    it has none; a L{Resize} with C{error} set when they are not valid.

    @param formats: the formats C{fmt} may name (the route's C{images}).
    """
    if not query:
        return None
    found: dict[bytes, bytes] = {}
    for parameter in query[1:].split(b"&"):
        name, _, value = parameter.partition(b"=")
        if name not in _NAMES:
            continue
        if name in found:
            return Resize(error=f"{name.decode()} is given twice")
        found[name] = value
    if not found:
        return None
    values: dict[str, object] = {}
    for name, key in ((b"w", "width"), (b"h", "height")):
        if name in found:
            number = _number(found[name], 1, MAX_DIMENSION)
            if number is None:
                return Resize(error=f"{name.decode()} must be a whole number from 1 to {MAX_DIMENSION}")
            values[key] = number
    if b"fit" in found:
        fit = _FITS.get(found[b"fit"])
        if fit is None:
            return Resize(error="fit must be contain, cover or fill")
        values["fit"] = fit
    if b"q" in found:
        quality = _number(found[b"q"], 1, 100)
        if quality is None:
            return Resize(error="q must be a whole number from 1 to 100")
        values["quality"] = quality
    if b"fmt" in found:
        fmt = found[b"fmt"]
        if fmt != b"auto":
            if fmt not in formats:
                offered = ", ".join(f.decode() for f in formats)
                return Resize(error=f"fmt must be auto or one of {offered}")
            values["fmt"] = fmt
    return Resize(**values)  # type: ignore[arg-type]


def sign(key: bytes, message: bytes) -> bytes:
    """The signature of C{message} (path and query before C{sig})."""
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def _split(query: bytes) -> tuple[bytes, bytes | None]:
    """The query before a final C{sig} parameter, and that parameter's value."""
    if not query:
        return b"", None
    head, ampersand, last = query.rpartition(b"&")
    if not ampersand:
        head, last = b"", query[1:]
    if not last.startswith(b"sig="):
        return query, None
    return head, last[4:]


def checkSignature(key: bytes, path: bytes, query: bytes) -> bool:
    """Whether C{query} ends in a valid C{sig} for C{path} and the rest of it."""
    before, signature = _split(query)
    if signature is None:
        return False
    return hmac.compare_digest(sign(key, path + before), signature)


def signTarget(key: bytes, target: bytes) -> bytes:
    """
    C{target} (an origin-form path and query) with its C{sig} parameter
    appended; the path is put in its normal form first.
    """
    path, query = normaliseTarget(target)
    signed = path + query
    return signed + (b"&" if query else b"?") + b"sig=" + sign(key, signed)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m edgeproxy.content.params KEYFILE TARGET...", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        key = f.read().strip()
    for target in argv[1:]:
        print(signTarget(key, target.encode("ascii")).decode("ascii"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
