# -*- test-case-name: tests.test_content_rules -*-
"""
Which responses the edge may transform, and how their fields change when
it does: plain functions over statuses, methods and fields, shared by the
compression and image stages.

A response is left as it is when transforming it would be wrong:

  - the request was C{HEAD}, or the status has no body to transform
    (1xx, 204, 304) or its body is a part of a representation (206: a
    range of the identity bytes, RFC 9110 14.4);
  - C{Cache-Control: no-transform} on the response or the request
    (RFC 9111 5.2.2.6, 5.2.1.6);
  - it has a C{Content-Encoding} already (compressing twice gains nothing
    and a decoded image is not what it declares);
  - its media type is not one the route transforms;
  - (compression) its known length is under C{compress_min_size}.

When a response I{could} be transformed for some client, it carries
C{Vary} naming the request field the choice depends on, whether or not
this client got a transformed one, so that shared caches keep the
variants apart (RFC 9110 12.5.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from edgeproxy.h1.fields import Fields

__all__ = [
    "Decision",
    "compressDecision",
    "hasNoTransform",
    "imageDecision",
    "mediaType",
    "transformedFields",
    "typeMatches",
    "withVary",
    "weakETag",
]

CONVERTIBLE_IMAGES = {b"image/jpeg": b"jpeg", b"image/png": b"png", b"image/gif": b"gif"}
"""The media types the image stage converts, to their format name."""

_OWS = b" \t"

_NO_BODY = frozenset((204, 206, 304))


class Decision(NamedTuple):
    """What a stage does with one response."""

    transform: bool
    """Transform it (for this request's variant)."""
    vary: bool
    """Add the stage's C{Vary} field (it could be transformed for someone)."""
    why: str
    """A word for the outcome (metrics and tests): C{"transform"} or why not."""


_AS_IS = Decision(False, False, "")


def mediaType(fields: Fields) -> bytes:
    """The C{Content-Type}'s type/subtype, lower case, without parameters
    (C{b""} when there is none)."""
    value = fields.get(b"content-type")
    if value is None:
        return b""
    return value.partition(b";")[0].strip(_OWS).lower()


def typeMatches(media: bytes, patterns: Sequence[bytes]) -> bool:
    """
    Whether C{media} (C{type/subtype}) matches one of C{patterns}:
    C{type/subtype} exactly, C{type/*}, C{type/*+suffix} (RFC 6839
    structured syntax suffixes such as C{+json}) or C{*/*}.
    """
    kind, slash, subtype = media.partition(b"/")
    if not slash:
        return False
    for pattern in patterns:
        patternKind, _, patternSub = pattern.partition(b"/")
        if patternKind != kind and patternKind != b"*":
            continue
        if patternSub == b"*" or patternSub == subtype:
            return True
        if patternSub.startswith(b"*+") and subtype.endswith(patternSub[1:]):
            return True
    return False


def _directives(values: Sequence[bytes]) -> list[bytes]:
    return [
        part.partition(b"=")[0].strip(_OWS).lower()
        for value in values
        for part in value.split(b",")
    ]


def hasNoTransform(fields: Fields) -> bool:
    """Whether C{Cache-Control} holds C{no-transform} (RFC 9111 5.2)."""
    values = fields.getAll(b"cache-control")
    return bool(values) and b"no-transform" in _directives(values)


def _mayTransform(status: int, requestFields: Fields, fields: Fields) -> str:
    """C{""} when a response of this kind may be transformed, else why not."""
    if status < 200 or status in _NO_BODY:
        return "status"
    if b"content-encoding" in fields:
        return "encoded"
    if hasNoTransform(fields) or hasNoTransform(requestFields):
        return "no-transform"
    return ""


def compressDecision(
    method: bytes,
    status: int,
    requestFields: Fields,
    fields: Fields,
    length: int | None,
    hasBody: bool,
    types: Sequence[bytes],
    minSize: int,
    encoding: bytes,
) -> Decision:
    """
    Whether to compress a response with C{encoding} (C{b"identity"}: the
    client takes none the route offers), and whether it gets
    C{Vary: Accept-Encoding}.
    """
    why = _mayTransform(status, requestFields, fields)
    if why:
        return _AS_IS._replace(why=why)
    if not typeMatches(mediaType(fields), types):
        return _AS_IS._replace(why="type")
    if length is not None and length < minSize:
        # Sent as it is to everyone: no variant to tell apart.
        return _AS_IS._replace(why="small")
    if method == b"HEAD" or not hasBody:
        return Decision(False, True, "method")
    if encoding == b"identity":
        return Decision(False, True, "identity")
    return Decision(True, True, "transform")


def imageDecision(
    method: bytes,
    status: int,
    requestFields: Fields,
    fields: Fields,
    hasBody: bool,
    wanted: bool,
) -> Decision:
    """
    Whether to convert an image response, and whether it gets
    C{Vary: Accept}.

    @param wanted: the request asks for a conversion (a format it accepts,
        or resize parameters).
    """
    if status != 200:
        return _AS_IS._replace(why="status")
    why = _mayTransform(status, requestFields, fields)
    if why:
        return _AS_IS._replace(why=why)
    if mediaType(fields) not in CONVERTIBLE_IMAGES:
        return _AS_IS._replace(why="type")
    if method != b"GET" or not hasBody:
        return Decision(False, True, "method")
    if not wanted:
        return Decision(False, True, "original")
    return Decision(True, True, "transform")


def withVary(fields: Fields, name: bytes) -> Fields:
    """C{fields} with C{name} in C{Vary} (unless it is there, or C{*} is)."""
    values = fields.getAll(b"vary")
    if values:
        present = _directives(values)
        if name.lower() in present or b"*" in present:
            return fields
    return fields.withAdded(b"vary", name)


def weakETag(value: bytes) -> bytes:
    """
    A strong entity tag made weak: the transformed bytes are not the ones
    the tag was given for, but they are the same representation
    (RFC 9110 8.8.3.3: weak comparison still matches for C{If-None-Match},
    strong comparison for C{If-Range} no longer does).
    """
    if value.startswith(b"W/"):
        return value
    return b"W/" + value


def transformedFields(fields: Fields, varyName: bytes, changes: Sequence[tuple[bytes, bytes]]) -> Fields:
    """
    The fields of a transformed response: C{changes} set, C{Vary} naming
    C{varyName}, a strong C{ETag} weakened, and the fields that described
    the original bytes dropped (C{Accept-Ranges}: ranges of the new bytes
    are not served; C{Content-Digest} and C{Content-MD5}: a digest of the
    old bytes, RFC 9530 2).
    """
    fields = fields.without(b"accept-ranges", b"content-digest", b"content-md5")
    for name, value in changes:
        fields = fields.withField(name, value)
    etag = fields.get(b"etag")
    if etag is not None and not etag.startswith(b"W/"):
        fields = fields.withField(b"etag", weakETag(etag))
    return withVary(fields, varyName)
