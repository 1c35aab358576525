# -*- test-case-name: tests.test_cache_key -*-
"""
The cache key: which stored response a request may get.

The primary key is the URL the client asked for, written as
C{scheme://host/path?query}:

  - the scheme of the connection (C{https} on a TLS listener);
  - the C{Host} (or C{:authority}) the request was routed by, in lower
    case, without a trailing dot and without the scheme's default port;
  - the path and query exactly as the pipeline normalised them once
    (L{edgeproxy.pipeline.values.Request.path}, C{query}): never parsed
    again, so that no second reading of the target can address an entry
    the router did not route there;
  - then the parts C{[cache] key_includes} names (C{header:NAME},
    C{cookie:NAME}), each tagged with its kind and name.

Nothing else: the key never holds fields that could make one URL's entry
answer another (C{X-Forwarded-Host}, C{X-Original-URL}, C{Forwarded}...).
What an origin varies on beyond the URL it must say with C{Vary}, and
then the entry is further keyed on the listed request fields (the
secondary key, L{secondaryKey}), each normalised (RFC 9111 4.1).  A field
a later stage of the route chooses a variant from (C{Accept-Encoding} for
compression, C{Accept} for images) is keyed on that choice instead, but
only for a response that stage made what it is (marked C{chosenOn} by it:
L{edgeproxy.pipeline.values.Response}): so the few variants a stage makes
are stored once each, however clients write the field, while a response
the stage left alone (compressed by the backend itself, a JSON answer to
C{Accept: application/json}) can only answer clients sending the same
normalised field, never one that cannot take it.  The two kinds of part
are written apart (C{name=value}, C{name:choice}) so neither can ever
address an entry of the other.

    >>> urlOf(b"https", b"Example.COM:443", b"/a/b", b"?x=1")
    b'https://example.com/a/b?x=1'
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgeproxy.errors import BadRequest
from edgeproxy.h1.fields import Fields
from edgeproxy.targets import normaliseTarget

__all__ = [
    "SECONDARY",
    "KeyPart",
    "VariantStage",
    "hostOf",
    "includedParts",
    "normaliseField",
    "parseKeyIncludes",
    "purgeURL",
    "secondaryKey",
    "urlOf",
    "variantStages",
]

_DEFAULT_PORTS = {b"https": b":443", b"http": b":80"}

SECONDARY = b"\x01"
"""Between a primary key and a secondary key (no field value holds it)."""

_hosts: dict[tuple[bytes, bytes], bytes] = {}
_MAX_HOSTS = 1024


def hostOf(scheme: bytes, host: bytes) -> bytes:
    """
    The host part of the key: lower case, no trailing dot, no default
    port (C{Example.com.:443} on https is C{example.com}).
    """
    cached = _hosts.get((scheme, host))
    if cached is not None:
        return cached
    name = host.lower()
    port = b""
    if name.startswith(b"["):
        end = name.find(b"]")
        if end >= 0:
            name, port = name[: end + 1], name[end + 1 :]
    else:
        name, colon, rest = name.partition(b":")
        port = colon + rest
    if name.endswith(b"."):
        name = name[:-1]
    if port == _DEFAULT_PORTS.get(scheme) or port == b":":
        port = b""
    result = name + port
    if len(_hosts) < _MAX_HOSTS:
        _hosts[(scheme, host)] = result
    return result


def urlOf(scheme: bytes, host: bytes, path: bytes, query: bytes) -> bytes:
    """The URL part of the primary key (see the module docstring)."""
    return scheme + b"://" + hostOf(scheme, host) + path + query


class KeyPart:
    """One C{key_includes} entry: C{header:NAME} or C{cookie:NAME}."""

    __slots__ = ("kind", "name", "tag")

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name.lower().encode("ascii") if kind == "header" else name.encode("ascii")
        self.tag = (b"\x00h:" if kind == "header" else b"\x00c:") + self.name + b"="

    def value(self, fields: Fields) -> bytes:
        if self.kind == "header":
            return b",".join(fields.getAll(self.name))
        return cookieValue(fields, self.name) or b""


def parseKeyIncludes(entries: Iterable[str]) -> tuple[KeyPart, ...]:
    """C{key_includes} as checked by the configuration (C{header:x-a})."""
    parts = []
    for entry in entries:
        kind, _, name = entry.partition(":")
        parts.append(KeyPart(kind, name))
    return tuple(parts)


def includedParts(parts: Sequence[KeyPart], fields: Fields) -> bytes:
    """What C{key_includes} adds to the primary key for these fields."""
    return b"".join(part.tag + part.value(fields) for part in parts)


def cookieValue(fields: Fields, name: bytes) -> bytes | None:
    """The value of cookie C{name} in the request's C{Cookie} fields."""
    for value in fields.getAll(b"cookie"):
        for pair in value.split(b";"):
            key, equals, found = pair.strip(b" \t").partition(b"=")
            if equals and key == name:
                return found
    return None


class VariantStage(Protocol):
    """
    A later stage of the route that makes variants of the responses it
    handles: C{variant(request)} is its choice from the request field
    C{varyField}, and a response it made carries that field in its
    C{chosenOn} (see the module docstring).
    """

    varyField: bytes

    def variant(self, request: Any) -> bytes: ...


def variantStages(stages: Iterable[Any]) -> dict[bytes, VariantStage]:
    """The later stages that choose a variant, by the field they vary on."""
    found: dict[bytes, VariantStage] = {}
    for stage in stages:
        field = getattr(stage, "varyField", None)
        if isinstance(field, bytes) and callable(getattr(stage, "variant", None)):
            found.setdefault(field.lower(), stage)
    return found


_CODINGS = frozenset({b"br", b"gzip", b"deflate", b"zstd", b"compress", b"identity", b"*", b"x-gzip"})
_CASE_INSENSITIVE = frozenset({b"accept", b"accept-language", b"accept-charset", b"origin"})


def _elements(values: Sequence[bytes]) -> list[bytes]:
    return [
        element.strip(b" \t")
        for value in values
        for element in value.split(b",")
        if element.strip(b" \t")
    ]


def _acceptedCodings(values: Sequence[bytes]) -> bytes:
    # The codings accepted (q > 0) out of the few that exist: at most 2^8
    # keys whatever the client writes (RFC 9110 12.5.3).
    accepted = set()
    for element in _elements(values):
        coding, _, parameters = element.partition(b";")
        coding = coding.strip(b" \t").lower()
        if coding not in _CODINGS:
            continue
        refused = False
        for parameter in parameters.split(b";"):
            name, _, value = parameter.strip(b" \t").partition(b"=")
            if name.lower() == b"q":
                try:
                    refused = float(value.decode("ascii")) <= 0
                except (UnicodeDecodeError, ValueError):
                    refused = True
        if not refused:
            accepted.add(coding)
    return b",".join(sorted(accepted))


def normaliseField(name: bytes, values: Sequence[bytes]) -> bytes:
    """
    A request field's value as the secondary key holds it: list elements
    trimmed and joined by one comma, lower case for the fields that are
    case-insensitive, C{Accept-Encoding} reduced to the set of codings it
    accepts.
    """
    if not values:
        return b""
    if name == b"accept-encoding":
        return _acceptedCodings(values)
    joined = b",".join(_elements(values))
    if name in _CASE_INSENSITIVE:
        joined = joined.lower().replace(b" ", b"").replace(b"\t", b"")
    return joined


def secondaryKey(
    names: Sequence[bytes],
    request: Any,
    variants: dict[bytes, VariantStage],
    chosen: Collection[bytes] = (),
) -> bytes:
    """
    The secondary key of C{request} for a response varying on C{names}
    (RFC 9111 4.1): each field's normalised value (C{name=value}), or for
    the fields in C{chosen} that a later stage of C{variants} chooses from,
    the variant it chooses (C{name:variant}).
    """
    fields = request.fields
    parts = []
    for name in names:
        stage = variants.get(name) if name in chosen else None
        if stage is not None:
            # Neither ":" nor "=" is a token character (a field name ends
            # at either): a choice can never read as a value.
            parts.append(name + b":" + stage.variant(request))
        else:
            parts.append(name + b"=" + normaliseField(name, fields.getAll(name)))
    return SECONDARY + b"\x00".join(parts)


def variedOn(secondary: bytes) -> tuple[bytes, ...]:
    """The field names of a secondary key (L{secondaryKey}'s, without its
    leading L{SECONDARY}), in order."""
    # A name is a token, which holds neither "=" nor ":": it ends at the
    # first of either, whatever the value after it holds.
    return tuple(part.partition(b"=")[0].partition(b":")[0] for part in secondary.split(b"\x00"))


def purgeURL(text: str, prefix: bool = False) -> bytes:
    """
    The URL part of the key for a URL given to purge (the admin API's
    C{url=} and C{prefix=}), normalised as requests are.  A prefix without
    a path gets C{/} (so that C{https://a.example} never reaches
    C{https://a.example.org}).

    @raise ValueError: not an absolute http or https URL.
    """
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an absolute http or https URL, got {text!r}")
    try:
        netloc = parts.netloc.encode("idna" if not parts.netloc.isascii() else "ascii")
    except UnicodeError:
        raise ValueError(f"cannot encode the host of {text!r}") from None
    if b"@" in netloc:
        raise ValueError(f"a URL to purge has no user information: {text!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query or text.rstrip().endswith("?") else "")
    try:
        path, query = normaliseTarget(target.encode("utf-8"))
    except BadRequest as e:
        raise ValueError(f"cannot use the path of {text!r}: {e}") from None
    if prefix and not parts.path and not parts.query:
        path = b"/"
    return urlOf(scheme.encode("ascii"), netloc, path, query)
