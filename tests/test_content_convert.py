"""
The conversion itself (in this process, as a conversion process runs it):
every converted image decoded and compared with the original (dimensions,
orientation, a bound on the pixel difference), metadata, animation,
resizing, and the images that must go out as they are.
"""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image, ImageOps

from edgeproxy.content.convert import Job, convert
from tests.imageutil import (
    animatedGif,
    bombPNG,
    decode,
    meanDifference,
    photoJPEG,
    screenshotPNG,
    srgbProfile,
)

MAX = 25_000_000


@pytest.mark.parametrize("target, quality", [("avif", 60), ("webp", 80)])
def test_photoConvertsSmallerAndClose(target: str, quality: int) -> None:
    source = photoJPEG()
    result = convert(source, Job(target, quality, MAX))
    assert result.outcome == "converted", result.detail
    assert result.contentType == f"image/{target}"
    assert len(result.data) < len(source)
    image = decode(result.data)
    assert image.format == target.upper()
    assert (image.width, image.height) == (result.width, result.height) == (640, 480)
    assert meanDifference(image, decode(source)) < 4


@pytest.mark.parametrize("target", ["avif", "webp"])
def test_screenshotConverts(target: str) -> None:
    source = screenshotPNG()
    result = convert(source, Job(target, 80, MAX))
    assert result.outcome == "converted", result.detail
    assert len(result.data) < len(source)
    assert meanDifference(decode(result.data), decode(source)) < 4


@pytest.mark.parametrize("target", ["avif", "webp"])
def test_orientationIsApplied(target: str) -> None:
    """
    A JPEG stored 320x200 with orientation 6 (rotate 90 clockwise) is
    shown 200x320: so is the conversion, which has no EXIF to carry the tag.
    """
    source = photoJPEG(320, 200, orientation=6)
    result = convert(source, Job(target, 80, MAX))
    assert result.outcome == "converted", result.detail
    image = decode(result.data)
    assert image.size == (200, 320)
    assert not image.getexif(), "no EXIF left (orientation applied, camera data dropped)"
    expected = ImageOps.exif_transpose(decode(source))
    assert meanDifference(image, expected) < 4


@pytest.mark.parametrize("target", ["avif", "webp", ""])
def test_orientationOfAPNGIsApplied(target: str) -> None:
    """
    A PNG may carry EXIF too (its eXIf chunk): stored 320x200 with
    orientation 6, it is shown 200x320, and so is the conversion (or the
    resized PNG, which carries no EXIF either).
    """
    source = screenshotPNG(320, 200, orientation=6)
    expected = ImageOps.exif_transpose(decode(source))
    assert expected.size == (200, 320)
    result = convert(source, Job(target, 80, MAX, 200 if not target else None, None))
    assert result.outcome == "converted", result.detail
    image = decode(result.data)
    assert image.size == (result.width, result.height) == (200, 320)
    assert not image.getexif()
    assert meanDifference(image, expected) < 6


@pytest.mark.parametrize("target", ["avif", "webp"])
def test_colourProfileKeptOtherMetadataDropped(target: str) -> None:
    icc = srgbProfile()
    source = photoJPEG(icc=icc)
    result = convert(source, Job(target, 80, MAX))
    image = decode(result.data)
    assert image.info.get("icc_profile") == icc
    assert not image.getexif()
    assert "xmp" not in image.info


@pytest.mark.parametrize("target", ["avif", "webp"])
def test_transparencyKept(target: str) -> None:
    source = screenshotPNG(alpha=True)
    result = convert(source, Job(target, 80, MAX))
    assert result.outcome == "converted", result.detail
    image = decode(result.data)
    assert image.mode == "RGBA"
    alpha = image.getchannel("A")
    assert alpha.getpixel((0, 0)) < 10 and alpha.getpixel((0, 599)) > 245


@pytest.mark.parametrize("target", ["avif", "webp"])
def test_animationKeepsItsFrames(target: str) -> None:
    source = animatedGif(frames=4)
    result = convert(source, Job(target, 80, MAX))
    assert result.outcome == "converted", result.detail
    image = Image.open(io.BytesIO(result.data))
    assert getattr(image, "n_frames", 1) == 4
    original = Image.open(io.BytesIO(source))
    for index in (0, 3):
        image.seek(index)
        original.seek(index)
        assert meanDifference(image.convert("RGB"), original.convert("RGB")) < 8
    assert image.info.get("duration") == 120


def test_bombIsRefusedWithoutDecoding() -> None:
    """
    A 2 KiB PNG declaring 100,000 x 100,000 pixels is refused from its
    header: at once, without the 10 GB its pixels would take.
    """
    bomb = bombPNG()
    assert len(bomb) < 64 * 1024
    started = time.perf_counter()
    result = convert(bomb, Job("webp", 80, MAX))
    assert result.outcome == "too_large"
    assert time.perf_counter() - started < 1.0


def test_tooManyPixelsIsRefused() -> None:
    result = convert(photoJPEG(640, 480), Job("webp", 80, 640 * 480 - 1))
    assert result.outcome == "too_large"
    assert convert(photoJPEG(640, 480), Job("webp", 80, 640 * 480)).outcome == "converted"


def test_framesCountTowardsPixels() -> None:
    source = animatedGif(frames=4, width=100, height=100)
    assert convert(source, Job("webp", 80, 100 * 100 * 4 - 1)).outcome == "too_large"


def test_largerResultKeepsTheOriginal() -> None:
    """A small, heavily compressed JPEG: a high-quality conversion is larger."""
    source = photoJPEG(64, 48, quality=10)
    result = convert(source, Job("avif", 100, MAX))
    assert result.outcome == "larger"
    assert result.data == b""


@pytest.mark.parametrize("data", [b"", b"not an image", photoJPEG()[:500]])
def test_brokenInputFails(data: bytes) -> None:
    assert convert(data, Job("webp", 80, MAX)).outcome == "broken"


def test_otherFormatsAreNotConverted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buffer, "BMP")
    assert convert(buffer.getvalue(), Job("webp", 80, MAX)).outcome == "unsupported"


@pytest.mark.parametrize(
    "width, height, fit, expected",
    [
        (320, None, "contain", (320, 240)),
        (None, 120, "contain", (160, 120)),
        (320, 320, "contain", (320, 240)),
        (320, 320, "cover", (320, 320)),
        (320, 100, "fill", (320, 100)),
        # Never enlarged.
        (2000, None, "contain", (640, 480)),
        (2000, 2000, "cover", (640, 480)),
    ],
)
def test_resize(width: int | None, height: int | None, fit: str, expected: tuple[int, int]) -> None:
    source = photoJPEG(640, 480)
    result = convert(source, Job("webp", 80, MAX, width, height, fit))
    assert result.outcome == "converted", result.detail
    image = decode(result.data)
    assert image.size == expected == (result.width, result.height)
    if fit == "contain":
        assert meanDifference(image, decode(source).resize(expected)) < 6


def test_resizeOfARotatedPhoto() -> None:
    source = photoJPEG(640, 480, orientation=6)
    result = convert(source, Job("avif", 60, MAX, 240, None))
    assert decode(result.data).size == (240, 320)


def test_resizeInTheSourceFormat() -> None:
    """A client taking neither AVIF nor WebP gets the resized JPEG (or PNG)."""
    result = convert(photoJPEG(), Job("", 0, MAX, 100, None))
    assert result.contentType == "image/jpeg"
    assert decode(result.data).size == (100, 75)
    result = convert(screenshotPNG(), Job("", 0, MAX, 400, None))
    assert result.contentType == "image/png"
    assert decode(result.data).size == (400, 300)
