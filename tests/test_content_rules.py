"""
Which responses the content stages transform, and the fields of those they
do: tables over statuses, methods, media types and fields.
"""

from __future__ import annotations

import pytest

from edgeproxy.config.stagemodel import DEFAULT_COMPRESS_TYPES
from edgeproxy.content.rules import (
    compressDecision,
    hasNoTransform,
    imageDecision,
    mediaType,
    transformedFields,
    typeMatches,
    withVary,
)
from edgeproxy.h1.fields import Fields

TYPES = tuple(t.encode() for t in DEFAULT_COMPRESS_TYPES)


@pytest.mark.parametrize(
    "media, expected",
    [
        (b"text/html", True),
        (b"text/event-stream", True),
        (b"application/json", True),
        (b"application/ld+json", True),
        (b"application/problem+json", True),
        (b"application/javascript", True),
        (b"application/xml", True),
        (b"application/atom+xml", True),
        (b"image/svg+xml", True),
        (b"application/wasm", True),
        (b"font/ttf", True),
        (b"font/otf", True),
        # Compressed already, or not worth it.
        (b"font/woff", False),
        (b"font/woff2", False),
        (b"image/png", False),
        (b"image/jpeg", False),
        (b"application/octet-stream", False),
        (b"application/zip", False),
        (b"video/mp4", False),
        (b"", False),
        (b"text", False),
    ],
)
def test_defaultCompressTypes(media: bytes, expected: bool) -> None:
    assert typeMatches(media, TYPES) is expected


def test_typePatterns() -> None:
    assert typeMatches(b"anything/else", (b"*/*",))
    assert typeMatches(b"application/vnd.api+json", (b"application/*+json",))
    assert not typeMatches(b"application/json", (b"application/*+json",))
    assert not typeMatches(b"text/json", (b"application/*+json",))


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"text/html; charset=utf-8", b"text/html"),
        (b"Text/HTML ;charset=x", b"text/html"),
        (b"application/json", b"application/json"),
    ],
)
def test_mediaType(value: bytes, expected: bytes) -> None:
    assert mediaType(Fields([(b"content-type", value)])) == expected
    assert mediaType(Fields()) == b""


@pytest.mark.parametrize(
    "values, expected",
    [
        ([b"no-transform"], True),
        ([b"public, No-Transform, max-age=60"], True),
        ([b"max-age=60", b"no-transform"], True),
        ([b"no-store"], False),
        ([b'private="no-transform"'], False),
        ([], False),
    ],
)
def test_noTransform(values: list[bytes], expected: bool) -> None:
    assert hasNoTransform(Fields([(b"cache-control", v) for v in values])) is expected


HTML = [(b"content-type", b"text/html")]


@pytest.mark.parametrize(
    "method, status, asked, response, length, encoding, expected",
    [
        (b"GET", 200, [], HTML, 5000, b"br", (True, True, "transform")),
        (b"GET", 200, [], HTML, None, b"br", (True, True, "transform")),
        (b"GET", 404, [], HTML, None, b"gzip", (True, True, "transform")),
        (b"POST", 201, [], HTML, None, b"gzip", (True, True, "transform")),
        # The client takes none of the offered codings: Vary all the same.
        (b"GET", 200, [], HTML, 5000, b"identity", (False, True, "identity")),
        (b"HEAD", 200, [], HTML, 5000, b"identity", (False, True, "method")),
        # Sent as is to everyone.
        (b"GET", 200, [], HTML, 100, b"br", (False, False, "small")),
        (b"GET", 206, [], HTML, 5000, b"br", (False, False, "status")),
        (b"GET", 304, [], HTML, None, b"br", (False, False, "status")),
        (b"GET", 204, [], HTML, None, b"br", (False, False, "status")),
        (b"GET", 200, [], [(b"content-type", b"image/png")], 5000, b"br", (False, False, "type")),
        (b"GET", 200, [], [], 5000, b"br", (False, False, "type")),
        (b"GET", 200, [], HTML + [(b"content-encoding", b"gzip")], 5000, b"br", (False, False, "encoded")),
        (b"GET", 200, [], HTML + [(b"cache-control", b"no-transform")], 5000, b"br",
         (False, False, "no-transform")),
        (b"GET", 200, [(b"cache-control", b"no-transform")], HTML, 5000, b"br",
         (False, False, "no-transform")),
    ],
)
def test_compressDecision(
    method: bytes,
    status: int,
    asked: list[tuple[bytes, bytes]],
    response: list[tuple[bytes, bytes]],
    length: int | None,
    encoding: bytes,
    expected: tuple[bool, bool, str],
) -> None:
    decision = compressDecision(
        method, status, Fields(asked), Fields(response), length, True, TYPES, 1024, encoding
    )
    assert tuple(decision) == expected


JPEG = [(b"content-type", b"image/jpeg")]


@pytest.mark.parametrize(
    "method, status, asked, response, wanted, expected",
    [
        (b"GET", 200, [], JPEG, True, (True, True, "transform")),
        (b"GET", 200, [], [(b"content-type", b"image/png")], True, (True, True, "transform")),
        (b"GET", 200, [], [(b"content-type", b"image/gif")], True, (True, True, "transform")),
        (b"GET", 200, [], JPEG, False, (False, True, "original")),
        (b"HEAD", 200, [], JPEG, True, (False, True, "method")),
        (b"GET", 206, [], JPEG, True, (False, False, "status")),
        (b"GET", 404, [], JPEG, True, (False, False, "status")),
        (b"GET", 200, [], [(b"content-type", b"image/webp")], True, (False, False, "type")),
        (b"GET", 200, [], [(b"content-type", b"image/svg+xml")], True, (False, False, "type")),
        (b"GET", 200, [], JPEG + [(b"cache-control", b"public, no-transform")], True,
         (False, False, "no-transform")),
        (b"GET", 200, [(b"cache-control", b"no-transform")], JPEG, True,
         (False, False, "no-transform")),
        (b"GET", 200, [], JPEG + [(b"content-encoding", b"gzip")], True, (False, False, "encoded")),
    ],
)
def test_imageDecision(
    method: bytes,
    status: int,
    asked: list[tuple[bytes, bytes]],
    response: list[tuple[bytes, bytes]],
    wanted: bool,
    expected: tuple[bool, bool, str],
) -> None:
    decision = imageDecision(method, status, Fields(asked), Fields(response), True, wanted)
    assert tuple(decision) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], [b"Accept-Encoding"]),
        ([b"Origin"], [b"Origin", b"Accept-Encoding"]),
        ([b"origin, accept-encoding"], [b"origin, accept-encoding"]),
        ([b"*"], [b"*"]),
    ],
)
def test_withVary(values: list[bytes], expected: list[bytes]) -> None:
    fields = withVary(Fields([(b"vary", v) for v in values]), b"Accept-Encoding")
    assert list(fields.getAll(b"vary")) == expected


def test_transformedFields() -> None:
    fields = Fields(
        [
            (b"content-type", b"text/html"),
            (b"etag", b'"abc"'),
            (b"accept-ranges", b"bytes"),
            (b"content-digest", b"sha-256=:x:"),
            (b"last-modified", b"Tue, 01 Jan 2030 00:00:00 GMT"),
        ]
    )
    out = transformedFields(fields, b"Accept-Encoding", [(b"content-encoding", b"br")])
    assert out.get(b"etag") == b'W/"abc"'
    assert out.get(b"content-encoding") == b"br"
    assert out.get(b"vary") == b"Accept-Encoding"
    assert b"accept-ranges" not in out and b"content-digest" not in out
    assert out.get(b"last-modified") == fields.get(b"last-modified")
    weak = transformedFields(Fields([(b"etag", b'W/"x"')]), b"Accept", [])
    assert weak.get(b"etag") == b'W/"x"'
