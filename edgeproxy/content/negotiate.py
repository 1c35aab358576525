# -*- test-case-name: tests.test_content_negotiate -*-
"""
Content negotiation for the edge's own transformations: which content
coding a response gets from the request's C{Accept-Encoding}
(L{chooseEncoding}), and which image format from its C{Accept}
(L{chooseImageFormat}).

Both are pure functions of the request's field values and the route's
offer, so that the cache can key a response on the variant they pick
(C{Compress.variant}, C{Images.variant}) rather than on the raw field.

Worked examples (offer C{zstd, br, gzip}):

    Accept-Encoding: gzip, deflate, br, zstd   -> zstd (ties: the route's order)
    Accept-Encoding: gzip;q=1, br;q=0.5        -> gzip
    Accept-Encoding: *                         -> zstd
    Accept-Encoding: *, zstd;q=0               -> br
    Accept-Encoding: br;q=0.5, identity        -> identity (the client prefers it)
    Accept-Encoding: identity;q=0              -> identity (nothing else offered
                                                  is acceptable: RFC 9110 12.5.3
                                                  allows sending it anyway)
    (no Accept-Encoding)                       -> identity

and (offer C{avif, webp}):

    Accept: image/avif,image/webp,*/*          -> avif
    Accept: image/webp,image/*,*/*;q=0.8       -> webp
    Accept: image/*                            -> None (only a type named
                                                  explicitly counts: a client
                                                  taking any image/* may still
                                                  not decode AVIF)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["IDENTITY", "chooseEncoding", "chooseImageFormat", "parseWeighted"]

IDENTITY = b"identity"

_ALIASES = {b"x-gzip": b"gzip"}
"""RFC 9110 8.4.1.3: x-gzip is gzip."""

_OWS = b" \t"


_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
"""RFC 9110 12.4.2: C{0} to C{1} with at most three decimals."""


def _qvalue(text: bytes) -> float | None:
    """The weight C{text} gives, or L{None} when it is malformed."""
    return float(text) if _QVALUE.fullmatch(text) else None


def parseWeighted(values: Sequence[bytes]) -> dict[bytes, float]:
    """
    The entries of a list field with weights (C{Accept}, C{Accept-Encoding}),
    lower-cased, to their q-value (C{1} when none is given).  Parameters other
    than C{q} are dropped; a malformed weight drops its entry; an entry given
    twice keeps its first weight.
    """
    weights: dict[bytes, float] = {}
    for value in values:
        for entry in value.split(b","):
            name, _, parameters = entry.partition(b";")
            name = name.strip(_OWS).lower()
            if not name or name in weights:
                continue
            weight: float | None = 1.0
            for parameter in parameters.split(b";"):
                key, equals, text = parameter.partition(b"=")
                if equals and key.strip(_OWS).lower() == b"q":
                    weight = _qvalue(text.strip(_OWS))
                    break
            if weight is not None:
                weights[name] = weight
    return weights


def chooseEncoding(values: Sequence[bytes], offered: Sequence[bytes]) -> bytes:
    """
    The content coding to send, given the request's C{Accept-Encoding}
    field values (L{None}-free: C{[]} when absent) and the codings the route
    offers, preferred first.

    RFC 9110 12.5.3: a coding the field does not name takes the weight of
    C{*} (or is not acceptable without it); identity is acceptable unless
    excluded, by C{identity;q=0} or C{*;q=0}.  The highest weight wins (the
    weight of identity counts only when the field gives it one, directly or
    through C{*}), and on a tie a coding beats identity and the earlier offer
    beats the later.
    Without the field, identity: most clients that send none cannot decode
    anything else, whatever RFC 9110 says they accept.
    """
    if not values:
        return IDENTITY
    weights = parseWeighted(values)
    for alias, name in _ALIASES.items():
        if alias in weights and name not in weights:
            weights[name] = weights[alias]
    anything = weights.get(b"*")
    best = IDENTITY
    bestWeight = 0.0
    for coding in offered:
        weight = weights.get(coding, anything)
        if weight is not None and weight > bestWeight:
            best, bestWeight = coding, weight
    if best is IDENTITY:
        return IDENTITY
    # Identity is acceptable unless excluded, but preferred only when the
    # client says so with a weight (its own, or that of "*").
    identity = weights.get(IDENTITY, anything if anything is not None else 0.0)
    if identity > bestWeight:
        return IDENTITY
    return best


_IMAGE_TYPES = {b"avif": b"image/avif", b"webp": b"image/webp"}


def chooseImageFormat(values: Sequence[bytes], offered: Sequence[bytes]) -> bytes | None:
    """
    The image format to convert to (C{b"avif"} or C{b"webp"}), given the
    request's C{Accept} field values and the formats the route offers,
    preferred first; L{None} when the client names none of them with a
    weight above zero.  The highest weight wins, ties go to the earlier
    offer.
    """
    if not values:
        return None
    weights = parseWeighted(values)
    best = None
    bestWeight = 0.0
    for fmt in offered:
        weight = weights.get(_IMAGE_TYPES[fmt], 0.0)
        if weight > bestWeight:
            best, bestWeight = fmt, weight
    return best
