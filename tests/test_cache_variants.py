"""
The cache stage with the content stages behind it (compression, images):
which variant a request is answered with, end to end in memory through the
real stages (the harness of L{tests.test_cache_stage}, with the conversion
processes played in this process, L{tests.imagepool}).

A variant is keyed on the stage's choice (C{br}, C{avif}...) only when that
stage made the response what it is; any other response that varies on the
same field is keyed on the field's normalised value (RFC 9111 4.1), so that
no client is ever served a variant it cannot take.  A one-off fallback of
the image stage (the original, because the pool was full) is not stored.
"""

from __future__ import annotations

import gzip

import brotli  # type: ignore[import-untyped]
import zstandard

from edgeproxy.config.stagemodel import CompressSettings, ImageSettings
from tests.imageutil import decode, photoJPEG
from tests.test_cache_stage import FRESH, Site, status

COMPRESS = CompressSettings(("zstd", "br", "gzip"), min_size=0)
IMAGES = ImageSettings(formats=("avif", "webp"))
HTML = FRESH + [(b"Content-Type", b"text/html")]
JPEG = FRESH + [(b"Content-Type", b"image/jpeg")]
PAGE = b"<p>hello</p>" * 20
PHOTO = photoJPEG(200, 150)
CHROME = b"image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = b"image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"

DECODERS = {
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
}


def decoded(fields: dict[str, list[str]], body: bytes) -> tuple[str, bytes]:
    """The coding a response came with, and its body decoded."""
    coding = fields.get("content-encoding", ["identity"])[0]
    return coding, body if coding == "identity" else DECODERS[coding](body)


def test_variantsOfTheCompressionStageShareOneEntryEach() -> None:
    """
    Accept-Encoding is keyed on the coding the compression stage chooses,
    not on the raw field: clients writing it differently share the entry
    of their coding.
    """
    site = Site(compress=COMPRESS)
    first = site.get(headers=[(b"Accept-Encoding", b"gzip, deflate")])
    site.answer(site.sent[0], fields=HTML, body=PAGE)
    assert decoded(*site.one(first)[1:]) == ("gzip", PAGE)
    for accepted in (b"gzip;q=1.0, deflate", b"deflate, gzip, x-" + b"z" * 50):
        code, fields, body = site.one(site.get(headers=[(b"Accept-Encoding", accepted)]))
        assert decoded(fields, body) == ("gzip", PAGE) and status(fields).startswith("edgeproxy; hit")
    plain = site.get(headers=[(b"Accept-Encoding", b"identity")])
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=HTML, body=PAGE)
    assert decoded(*site.one(plain)[1:]) == ("identity", PAGE)
    code, fields, body = site.one(site.get())
    assert decoded(fields, body) == ("identity", PAGE) and status(fields).startswith("edgeproxy; hit")
    assert len(site.sent) == 2


def test_aCodingTheBackendChoseIsKeyedOnTheField() -> None:
    """
    The backend compresses itself (gzip, to a client taking br and gzip):
    the stage left it alone, so a client taking only br is not answered
    with it.
    """
    site = Site(compress=COMPRESS)
    both = site.get(headers=[(b"Accept-Encoding", b"br, gzip")])
    squeezed = gzip.compress(PAGE)
    site.answer(
        site.sent[0], fields=HTML + [(b"Content-Encoding", b"gzip"), (b"Vary", b"Accept-Encoding")], body=squeezed
    )
    assert decoded(*site.one(both)[1:]) == ("gzip", PAGE)
    # The same set of codings, written otherwise, is the same key.
    code, fields, body = site.one(site.get(headers=[(b"Accept-Encoding", b"gzip;q=0.5, br")]))
    assert decoded(fields, body) == ("gzip", PAGE) and status(fields).startswith("edgeproxy; hit")
    brOnly = site.get(headers=[(b"Accept-Encoding", b"br")])
    assert len(site.sent) == 2, "forwarded: what is stored is for clients taking gzip"
    site.answer(site.sent[1], fields=HTML + [(b"Vary", b"Accept-Encoding")], body=PAGE)
    code, fields, body = site.one(brOnly)
    assert decoded(fields, body) == ("br", PAGE) and status(fields).startswith("edgeproxy; fwd=vary-miss")
    code, fields, body = site.one(site.get(headers=[(b"Accept-Encoding", b"br")]))
    assert decoded(fields, body) == ("br", PAGE) and status(fields).startswith("edgeproxy; hit")
    assert len(site.sent) == 2


def test_aResponseTheImageStageDoesNotConvertIsKeyedOnAccept() -> None:
    """
    The backend varies on Accept itself (JSON or HTML): neither is an
    image, so the image stage's choice (C{original} for both) is not the
    key, the Accept field is.
    """
    site = Site(images=IMAGES)
    asJSON = site.get(headers=[(b"Accept", b"application/json")])
    site.answer(site.sent[0], fields=FRESH + [(b"Content-Type", b"application/json"), (b"Vary", b"Accept")],
                body=b'{"hello": 1}')
    assert site.one(asJSON)[2] == b'{"hello": 1}'
    asHTML = site.get(headers=[(b"Accept", b"text/html")])
    assert len(site.sent) == 2, "forwarded: what is stored is the JSON"
    site.answer(site.sent[1], fields=FRESH + [(b"Content-Type", b"text/html"), (b"Vary", b"Accept")],
                body=b"<p>hello</p>")
    assert site.one(asHTML)[2] == b"<p>hello</p>"
    code, fields, body = site.one(site.get(headers=[(b"Accept", b"Application/JSON")]))
    assert body == b'{"hello": 1}' and status(fields).startswith("edgeproxy; hit")
    code, fields, body = site.one(site.get(headers=[(b"Accept", b"text/html")]))
    assert body == b"<p>hello</p>" and status(fields).startswith("edgeproxy; hit")


def test_convertedImagesAreKeyedOnTheFormat() -> None:
    """Browsers writing Accept differently share the entry of their format."""
    site = Site(images=IMAGES)
    chrome = site.get(b"/photo.jpg", headers=[(b"Accept", CHROME)])
    site.answer(site.sent[0], fields=JPEG, body=PHOTO)
    code, fields, body = site.one(chrome)
    assert fields["content-type"] == ["image/avif"] and decode(body).size == (200, 150)
    code, fields, body = site.one(site.get(b"/photo.jpg", headers=[(b"Accept", FIREFOX)]))
    assert fields["content-type"] == ["image/avif"] and status(fields).startswith("edgeproxy; hit")
    old = site.get(b"/photo.jpg", headers=[(b"Accept", b"image/png,image/*;q=0.8,*/*;q=0.5")])
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=JPEG, body=PHOTO)
    assert site.one(old)[2] == PHOTO
    code, fields, body = site.one(site.get(b"/photo.jpg", headers=[(b"Accept", b"*/*")]))
    assert body == PHOTO and status(fields).startswith("edgeproxy; hit")


def test_anOriginalSentBecauseThePoolWasFullIsNotStored() -> None:
    """
    The original goes out at once while the pool is full, but is not
    stored as the AVIF variant: the next AVIF client gets a conversion.
    """
    site = Site(images=IMAGES, holdConversions=True)
    busy = site.get(b"/busy.jpg", headers=[(b"Accept", CHROME)])
    site.answer(site.sent[0], fields=JPEG, body=PHOTO)
    assert busy.value() == b"", "converting (held)"
    first = site.get(b"/photo.jpg", headers=[(b"Accept", CHROME)])
    site.answer(site.sent[1], fields=JPEG, body=PHOTO)
    code, fields, body = site.one(first)
    assert body == PHOTO and fields["content-type"] == ["image/jpeg"] and fields["vary"] == ["Accept"]
    assert "stored" not in status(fields).split("; ") and "detail=transient" in status(fields)
    [process] = site.conversions.started
    process.release()
    assert site.one(busy)[1]["content-type"] == ["image/avif"]
    second = site.get(b"/photo.jpg", headers=[(b"Accept", CHROME)])
    assert len(site.sent) == 3, "forwarded: nothing was stored"
    site.answer(site.sent[2], fields=JPEG, body=PHOTO)
    process.release()
    code, fields, body = site.one(second)
    assert fields["content-type"] == ["image/avif"] and "stored" in status(fields).split("; ")
    code, fields, body = site.one(site.get(b"/photo.jpg", headers=[(b"Accept", CHROME)]))
    assert fields["content-type"] == ["image/avif"] and status(fields).startswith("edgeproxy; hit")


def test_anOriginalKeptBecauseItIsSmallerIsStored() -> None:
    """A conversion that would be larger keeps the original: that would not
    change on a retry, so it is stored as the variant."""
    site = Site(images=ImageSettings(formats=("avif",), quality=(("avif", 100), ("webp", 80))))
    small = photoJPEG(48, 36, quality=10)
    first = site.get(b"/small.jpg", headers=[(b"Accept", CHROME)])
    site.answer(site.sent[0], fields=JPEG, body=small)
    code, fields, body = site.one(first)
    assert body == small and "stored" in status(fields).split("; ")
    code, fields, body = site.one(site.get(b"/small.jpg", headers=[(b"Accept", FIREFOX)]))
    assert body == small and status(fields).startswith("edgeproxy; hit")
    assert len(site.sent) == 1


def test_variantsOfAFieldAsWrittenAreBounded() -> None:
    """
    A response varying on a field no stage chooses on (here C{Accept}, no
    image stage) is keyed on the field as the client wrote it: past
    C{MAX_VARIANTS} copies of one URL, a new spelling is answered but not
    stored, and the stored ones are still served.
    """
    from edgeproxy.cache.responses import MAX_VARIANTS

    site = Site()
    varying = FRESH + [(b"Content-Type", b"text/plain"), (b"Vary", b"Accept")]
    for n in range(MAX_VARIANTS + 5):
        request = site.get(headers=[(b"Accept", b"text/x-%d" % n)])
        site.answer(site.sent[-1], fields=varying, body=b"%d" % n)
        code, fields, body = site.one(request)
        assert body == b"%d" % n
        if n < MAX_VARIANTS:
            assert "stored" in status(fields), (n, status(fields))
        else:
            assert "detail=too-many-variants" in status(fields), (n, status(fields))
    assert len(site.sent) == MAX_VARIANTS + 5
    code, fields, body = site.one(site.get(headers=[(b"Accept", b"text/x-0")]))
    assert body == b"0" and status(fields).startswith("edgeproxy; hit")
    assert len(site.sent) == MAX_VARIANTS + 5


def test_aBrokenImageIsStoredAsItCameAndNotConvertedAgain() -> None:
    """
    An image that cannot be decoded (a truncated upload) goes out as it
    came, and is stored so: the same bytes would fail again, so the next
    client gets it from the cache instead of another conversion.
    """
    site = Site(images=IMAGES)
    broken = PHOTO[:300]
    first = site.get(b"/broken.jpg", headers=[(b"Accept", CHROME)])
    site.answer(site.sent[0], fields=JPEG, body=broken)
    code, fields, body = site.one(first)
    assert body == broken and fields["content-type"] == ["image/jpeg"]
    assert "stored" in status(fields).split("; ")
    code, fields, body = site.one(site.get(b"/broken.jpg", headers=[(b"Accept", FIREFOX)]))
    assert body == broken and status(fields).startswith("edgeproxy; hit")
    assert len(site.sent) == 1
