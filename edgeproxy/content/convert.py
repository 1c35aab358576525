# -*- test-case-name: tests.test_content_convert -*-
"""
The image conversion itself: a JPEG, PNG or GIF in, an AVIF, WebP (or,
when only resized, the source's own format) out, with Pillow.

L{convert} is a pure function of the bytes and a L{Job}; it runs in the
conversion processes (L{edgeproxy.content.worker}), never in the proxy's,
and is tested directly.  It:

  - refuses an image whose header declares more than C{maxPixels}
    (width x height x frames) before decoding anything, so a
    decompression bomb costs the parse of its header and nothing more
    (Pillow's own C{MAX_IMAGE_PIXELS} is set to the same bound behind it);
  - applies the EXIF orientation (of a JPEG, or a PNG's C{eXIf} chunk) to
    the pixels (the output has no EXIF to carry the tag), keeps the ICC
    colour profile, and writes no other metadata (EXIF, XMP, comments);
  - keeps every frame of an animation, with its durations and loop count;
  - resizes when asked (never enlarging), drafting JPEGs at a reduced scale
    first so a large photo made small is not decoded at full size;
  - reports C{larger} when the result is not smaller than the source and
    no resize was asked for (the original then goes out).

Pure apart from Pillow: no Twisted, no I/O.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, ImageSequence

from edgeproxy.content.job import CONTENT_TYPES, Job, Result

__all__ = ["CONTENT_TYPES", "Job", "Result", "convert"]

_SOURCES = {"JPEG": "jpeg", "PNG": "png", "GIF": "gif"}
_PILLOW_FORMATS = {"avif": "AVIF", "webp": "WEBP", "jpeg": "JPEG", "png": "PNG", "gif": "GIF"}
_ROTATED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""
_AVIF_SPEED = 8
"""libavif's speed (0 slowest to 10): 8 is the usual on-the-fly setting,
several times faster than the default 6 for a few percent more bytes."""
_WEBP_METHOD = 4
_JPEG_QUALITY = 85
"""For a resized JPEG kept as JPEG without a C{q}."""


def _box(size: tuple[int, int], job: Job) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """
    The size to scale to, and the size to crop the middle to (C{cover}) or
    L{None}; never larger than the source.
    """
    width, height = size
    wanted = (job.width, job.height)
    if job.fit == "fill":
        return (min(job.width or width, width), min(job.height or height, height)), None
    scales = [w / s for w, s in zip(wanted, size) if w is not None]
    scale = max(scales) if job.fit == "cover" else min(scales)
    scale = min(scale, 1.0)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    if job.fit == "cover" and job.width is not None and job.height is not None:
        return scaled, (min(job.width, scaled[0]), min(job.height, scaled[1]))
    return scaled, None


def _normalised(frame: Image.Image) -> Image.Image:
    """A frame in RGB, or RGBA when it has transparency."""
    if frame.mode in ("RGB", "RGBA"):
        return frame
    if frame.mode in ("RGBa", "LA", "La", "PA") or frame.has_transparency_data:
        return frame.convert("RGBA")
    return frame.convert("RGB")


def _resized(frame: Image.Image, job: Job) -> Image.Image:
    size, crop = _box(frame.size, job)
    if size != frame.size:
        frame = frame.resize(size, Image.Resampling.LANCZOS)
    if crop is not None and crop != frame.size:
        left = (frame.width - crop[0]) // 2
        top = (frame.height - crop[1]) // 2
        frame = frame.crop((left, top, left + crop[0], top + crop[1]))
    return frame


def convert(data: bytes, job: Job) -> Result:
    """Convert the image in C{data} as C{job} says (see the module docstring)."""
    # Pillow warns at MAX_IMAGE_PIXELS and refuses at twice that; our own
    # check below refuses first, this is the bound behind it.
    Image.MAX_IMAGE_PIXELS = job.maxPixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _convert(data, job)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Result("too_large", detail=str(e))
    except MemoryError:
        # Not the image's fault: another try may do.
        return Result("failed", detail="out of memory")
    except Exception as e:  # noqa: BLE001 - any decoder or encoder error keeps the original
        # The same bytes fail the same way (a truncated or hostile file).
        return Result("broken", detail=f"{type(e).__name__}: {e}")


def _convert(data: bytes, job: Job) -> Result:
    image = Image.open(io.BytesIO(data))
    source = _SOURCES.get(image.format or "")
    if source is None:
        return Result("unsupported", detail=f"format {image.format}")
    if image.mode in ("CMYK", "YCbCr", "LAB", "I", "F"):
        # Turning these into RGB needs colour management the profile alone
        # does not give; the original is right as it is.
        return Result("unsupported", detail=f"mode {image.mode}")
    width, height = image.size
    frames = getattr(image, "n_frames", 1)
    if width * height * frames > job.maxPixels:
        return Result("too_large", detail=f"{width}x{height}x{frames}")
    target = job.target or source
    # EXIF in a JPEG's APP1 or a PNG's eXIf chunk (GIF has none).
    orientation = image.getexif().get(0x0112, 1) if source != "gif" else 1
    if job.resizing and source == "jpeg":
        # Decode at the smallest DCT scale still at least as large as the
        # result (the box is for the image as displayed: swap for rotations).
        box, _ = _box((height, width) if orientation in _ROTATED else (width, height), job)
        if orientation in _ROTATED:
            box = (box[1], box[0])
        image.draft(image.mode, box)
    icc = image.info.get("icc_profile")
    animated = frames > 1
    out: list[Image.Image] = []
    durations: list[int] = []
    for frame in ImageSequence.Iterator(image) if animated else [image]:
        frame.load()
        if animated:
            # The iterator hands the same image back, moved to each frame.
            frame = frame.copy()
        if orientation != 1:
            frame = ImageOps.exif_transpose(frame)
        frame = _normalised(frame)
        if job.resizing:
            frame = _resized(frame, job)
        out.append(frame)
        durations.append(int(frame.info.get("duration", image.info.get("duration", 100)) or 100))
    first = out[0]
    # No metadata but the colour profile: drop what the frames carried.
    first.info = {}
    options: dict[str, object] = {}
    if icc:
        options["icc_profile"] = icc
    if target == "avif":
        options.update(quality=job.quality, speed=_AVIF_SPEED, max_threads=1)
    elif target == "webp":
        options.update(quality=job.quality, method=_WEBP_METHOD)
    elif target == "jpeg":
        options.update(quality=job.quality or _JPEG_QUALITY)
        if first.mode == "RGBA":
            first = out[0] = first.convert("RGB")
    if animated:
        options.update(save_all=True, append_images=out[1:], duration=durations,
                       loop=image.info.get("loop", 0))
    buffer = io.BytesIO()
    first.save(buffer, _PILLOW_FORMATS[target], **options)
    result = buffer.getvalue()
    if len(result) >= len(data) and not job.resizing:
        return Result("larger", detail=f"{len(result)} >= {len(data)}")
    return Result("converted", result, CONTENT_TYPES[target], first.width, first.height)
