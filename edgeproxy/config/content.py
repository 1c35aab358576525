# -*- test-case-name: tests.test_content_config -*-
"""
Reading the content-optimisation keys: a route's C{compress*} and
C{image*} keys (L{readRouteContent}) and C{[edgeproxy] image_workers} and
C{image_queue} (L{readProxyContent}).

Syntax of the per-encoding and per-format keys: a list of C{NAME:NUMBER}
entries, e.g. C{compress_level = zstd:3, br:5} and C{image_quality =
avif:55}; names not listed keep their default.  A key that only matters
with another (C{compress_types} without C{compress}) is an error rather
than silently ignored, as elsewhere in C{edge.ini}.

No Twisted; the signing key file is read here (and on every reload), as
C{admin_token_file} is.
"""

from __future__ import annotations

import re
from typing import Any

from edgeproxy.config import syntax
from edgeproxy.config.files import TOKEN_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.stagemodel import (
    COMPRESS_ENCODINGS,
    COMPRESS_LEVELS,
    IMAGE_FORMATS,
    IMAGE_QUALITY,
    CompressSettings,
    ImageSettings,
)
from edgeproxy.config.section import Section

__all__ = ["PROXY_KEYS", "ROUTE_KEYS", "readProxyContent", "readRouteContent"]

_COMPRESS_KEYS = ("compress", "compress_types", "compress_min_size", "compress_level")
_IMAGE_KEYS = (
    "images",
    "image_quality",
    "image_max_pixels",
    "image_max_bytes",
    "image_resize",
    "image_signing_key_file",
)
ROUTE_KEYS: tuple[str, ...] = _COMPRESS_KEYS + _IMAGE_KEYS
"""The keys of C{[route:NAME]} read here."""
PROXY_KEYS: tuple[str, ...] = ("image_workers", "image_queue")
"""The keys of C{[edgeproxy]} read here."""

_MEDIA_TYPE = re.compile(r"(\*|[a-z0-9!#$&^_.+-]+)/(\*|\*\+[a-z0-9!#$&^_.+-]+|[a-z0-9!#$&^_.+-]+)\Z")
_SIGNING_KEY_MINIMUM = 32


def _offered(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen: list[str] = []
    for entry in syntax.splitList(text):
        name = entry.lower()
        if name not in known:
            raise ValueError(f"expected {what} from {', '.join(known)}, got {entry!r}")
        if name in chosen:
            raise ValueError(f"{what} {entry!r} is listed twice")
        chosen.append(name)
    return tuple(chosen)


def _mediaTypes(text: str) -> tuple[str, ...]:
    types: list[str] = []
    for entry in syntax.splitList(text):
        value = entry.lower()
        if not _MEDIA_TYPE.match(value) or value.startswith("*/") and value != "*/*":
            raise ValueError(
                f"expected media types such as text/html, text/* or application/*+json, "
                f"got {entry!r}"
            )
        if value not in types:
            types.append(value)
    if not types:
        raise ValueError("expected at least one media type")
    return tuple(types)


def _perName(
    text: str, ranges: dict[str, tuple[int, int]], defaults: dict[str, int], what: str
) -> tuple[tuple[str, int], ...]:
    values = dict(defaults)
    seen: set[str] = set()
    for entry in syntax.splitList(text):
        name, colon, number = entry.partition(":")
        name = name.lower()
        if not colon or name not in ranges:
            raise ValueError(
                f"expected NAME:{what} entries with NAME from {', '.join(ranges)}, "
                f"such as {next(iter(ranges))}:{defaults[next(iter(ranges))]}, got {entry!r}"
            )
        low, high = ranges[name]
        if not number.isascii() or not number.isdigit() or not low <= int(number) <= high:
            raise ValueError(f"the {what} of {name} is a whole number from {low} to {high}, got {number!r}")
        if name in seen:
            raise ValueError(f"{name} is listed twice")
        seen.add(name)
        values[name] = int(number)
    return tuple(values.items())


def _signingKey(section: Section, text: str) -> bytes:
    path = section.resolve(text)
    try:
        data = readRegularFile(path, TOKEN_LIMIT)
    except FileProblem as e:
        raise ValueError(f"{path} {e}") from None
    key = data.strip()
    if len(key) < _SIGNING_KEY_MINIMUM:
        # A short key is guessable, and then anyone can sign any size.
        raise ValueError(
            f"{path} holds {len(key)} bytes; a signing key needs at least "
            f"{_SIGNING_KEY_MINIMUM} (for example the output of: openssl rand -hex 32)"
        )
    return key


def _readCompress(section: Section) -> CompressSettings | None:
    nothing: tuple[str, ...] = ()
    encodings = section.convert(
        "compress", nothing, lambda text: _offered(text, COMPRESS_ENCODINGS, "encodings")
    ) if section.values.get("compress", "").strip() else nothing
    if not encodings:
        for key in _COMPRESS_KEYS[1:]:
            if section.has(key) and section.ok("compress"):
                section.report(key, "only used with compress = ENCODINGS (compression is off)")
        return None
    defaults = CompressSettings(encodings=encodings)
    ranges = {name: (low, high) for name, (low, high, _) in COMPRESS_LEVELS.items()}
    return CompressSettings(
        encodings=encodings,
        types=section.convert("compress_types", defaults.types, _mediaTypes),
        min_size=section.size("compress_min_size", defaults.min_size),
        levels=section.convert(
            "compress_level",
            defaults.levels,
            lambda text: _perName(text, ranges, dict(defaults.levels), "level"),
        ),
    )


def _readImages(section: Section) -> ImageSettings | None:
    nothing: tuple[str, ...] = ()
    formats = section.convert(
        "images", nothing, lambda text: _offered(text, IMAGE_FORMATS, "formats")
    ) if section.values.get("images", "").strip() else nothing
    if not formats:
        for key in _IMAGE_KEYS[1:]:
            if section.has(key) and section.ok("images"):
                section.report(key, "only used with images = FORMATS (image conversion is off)")
        return None
    defaults = ImageSettings(formats=formats)
    resize = section.boolean("image_resize", defaults.resize)
    if section.has("image_signing_key_file") and not resize and section.ok("image_resize"):
        section.report("image_signing_key_file", "only used with image_resize = yes")
    return ImageSettings(
        formats=formats,
        quality=section.convert(
            "image_quality",
            defaults.quality,
            lambda text: _perName(
                text, {name: (1, 100) for name in IMAGE_FORMATS}, IMAGE_QUALITY, "quality"
            ),
        ),
        max_pixels=section.integer("image_max_pixels", defaults.max_pixels, minimum=1),
        max_bytes=section.size("image_max_bytes", defaults.max_bytes, minimum=1),
        resize=resize,
        signing_key=section.convert(
            "image_signing_key_file", None, lambda text: _signingKey(section, text)
        ) if resize else None,
    )


def readRouteContent(section: Section) -> dict[str, Any]:
    """
    The C{compress} and C{images} fields of a L{edgeproxy.config.model.Route}
    from its section (problems are reported to the section).
    """
    return {"compress": _readCompress(section), "images": _readImages(section)}


def readProxyContent(section: Section, defaultWorkers: int) -> dict[str, Any]:
    """
    The C{image_workers} and C{image_queue} fields of
    L{edgeproxy.config.model.ProxySettings} from C{[edgeproxy]}.
    """

    def workers(text: str) -> int:
        if text.strip().lower() == "auto":
            return defaultWorkers
        if not re.fullmatch(r"[0-9]+", text.strip()) or not 1 <= int(text) <= 256:
            raise ValueError(f"expected a number of conversions from 1 to 256, or auto, got {text!r}")
        return int(text)

    return {
        "image_workers": section.convert("image_workers", defaultWorkers, workers),
        "image_queue": section.integer("image_queue", None, minimum=0, maximum=100_000),
    }
