"""
Test images made at test time with Pillow (no binary fixtures): photo-like
(gradients and noise, as JPEG), screenshot-like (flat areas and sharp
edges, as PNG), with EXIF orientation, a colour profile, transparency,
animation; and a decompression bomb (a PNG whose header declares a huge
image).  The benchmarks use the same generators, so their fixed set is
reproducible.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageChops, ImageCms, ImageDraw, ImageFilter, ImageFont, ImageStat

__all__ = [
    "animatedGif",
    "bombPNG",
    "decode",
    "meanDifference",
    "photo",
    "photoJPEG",
    "screenshot",
    "screenshotPNG",
    "srgbProfile",
]


def photo(width: int = 640, height: int = 480, seed: int = 1) -> Image.Image:
    """A photograph-like RGB image: smooth gradients, soft shapes, fine noise."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height))
    red = base.rotate(rng.choice((0, 90, 180, 270))).resize((width, height))
    green = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    blue = Image.radial_gradient("L").resize((width, height))
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(10, max(11, width // 4))
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(3))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    return Image.blend(image, noise, 0.12)


def screenshot(width: int = 800, height: int = 600, seed: int = 2) -> Image.Image:
    """
    A screenshot-like RGB image: a gradient header, flat panels, lines of
    anti-aliased text, a photo and a button.
    """
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (246, 247, 249))
    draw = ImageDraw.Draw(image)
    header = Image.linear_gradient("L").rotate(90).resize((width, 48))
    image.paste(Image.merge("RGB", (header, header, header.point(lambda v: 80 + v // 3))), (0, 0))
    draw.rectangle((0, 48, width // 6, height), fill=(230, 233, 237))
    font = ImageFont.load_default(size=14)
    words = "the quick brown fox jumps over a lazy dog at the edge of the image".split()
    for row in range(70, height - height // 4, 22):
        line = " ".join(rng.choice(words) for _ in range(width // 90))
        draw.text((width // 6 + 20, row), line, fill=(30, 30, 30), font=font)
    for row in range(70, height, 28):
        draw.text((16, row), rng.choice(words).title(), fill=(60, 60, 90), font=font)
    picture = (width // 3, height // 5)
    image.paste(photo(*picture, seed=seed), (width // 6 + 20, height - picture[1] - 10))
    draw.rounded_rectangle((width // 2, height - 100, width // 2 + 160, height - 60), 8, fill=(31, 136, 61))
    return image


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def srgbProfile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def photoJPEG(width: int = 640, height: int = 480, seed: int = 1, orientation: int = 1,
              icc: bytes | None = None, quality: int = 90) -> bytes:
    """A photo as JPEG, with an EXIF orientation tag (and camera metadata)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    exif[0x0110] = "Model 1"
    options: dict[str, object] = {"quality": quality, "exif": exif.tobytes()}
    if icc is not None:
        options["icc_profile"] = icc
    return _save(photo(width, height, seed), "JPEG", **options)


def screenshotPNG(width: int = 800, height: int = 600, seed: int = 2, alpha: bool = False,
                  orientation: int | None = None) -> bytes:
    """A screenshot as PNG; with C{orientation}, an C{eXIf} chunk holding that tag."""
    image = screenshot(width, height, seed)
    if alpha:
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    options: dict[str, object] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    return _save(image, "PNG", **options)


def animatedGif(frames: int = 4, width: int = 160, height: int = 120) -> bytes:
    """An animated GIF: a photo-like background with a square moving across."""
    background = photo(width, height, seed=3)
    images = []
    for i in range(frames):
        frame = background.copy()
        ImageDraw.Draw(frame).rectangle((i * 20, 10, i * 20 + 30, 60), fill=(200, 30, 30))
        images.append(frame)
    return _save(images[0], "GIF", save_all=True, append_images=images[1:], duration=120, loop=0)


def bombPNG(width: int = 100_000, height: int = 100_000) -> bytes:
    """
    A tiny PNG whose header declares C{width} x C{height} pixels: decoding
    it would need tens of gigabytes.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A few rows of zeros, compressed: what a bomb carries.
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def meanDifference(a: Image.Image, b: Image.Image) -> float:
    """The mean absolute difference per channel (0-255) of two same-sized images."""
    a = a.convert("RGB")
    b = b.convert("RGB")
    assert a.size == b.size, (a.size, b.size)
    means = ImageStat.Stat(ImageChops.difference(a, b)).mean
    return sum(means) / len(means)
