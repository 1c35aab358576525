"""
The content-optimisation keys of C{edge.ini}: their values, defaults, and
the errors a bad one gets (file, line, section, key).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeproxy.config.model import availableCPUs
from edgeproxy.config.stagemodel import CompressSettings, ImageSettings
from edgeproxy.config.parse import load
from edgeproxy.errors import ConfigError

BASE = """\
[edgeproxy]
{proxy}
[listen:a]
endpoint = tcp:8080

[upstream:u]
servers = 127.0.0.1:9000

[route:r]
hosts = *
upstream = u
{route}
"""


def loadWith(tmp_path: Path, route: str = "", proxy: str = "") -> object:
    path = tmp_path / "edge.ini"
    path.write_text(BASE.format(route=route, proxy=proxy))
    return load(str(path))


def errorOf(tmp_path: Path, route: str = "", proxy: str = "") -> str:
    with pytest.raises(ConfigError) as raised:
        loadWith(tmp_path, route, proxy)
    return str(raised.value)


def test_offByDefault(tmp_path: Path) -> None:
    config = loadWith(tmp_path)
    route = config.routes[0]  # type: ignore[attr-defined]
    assert route.compress is None and route.images is None
    assert config.proxy.image_workers == availableCPUs()  # type: ignore[attr-defined]
    assert config.proxy.image_queue is None  # type: ignore[attr-defined]


def test_emptyCompressIsOff(tmp_path: Path) -> None:
    assert loadWith(tmp_path, "compress =").routes[0].compress is None  # type: ignore[attr-defined]


def test_compressKeys(tmp_path: Path) -> None:
    route = loadWith(
        tmp_path,
        "compress = br, GZIP\ncompress_types = text/html, application/*+json\n"
        "compress_min_size = 2KiB\ncompress_level = br:5, gzip:9",
    ).routes[0]  # type: ignore[attr-defined]
    assert route.compress == CompressSettings(
        encodings=("br", "gzip"),
        types=("text/html", "application/*+json"),
        min_size=2048,
        levels=(("zstd", 3), ("br", 5), ("gzip", 9)),
    )


def test_compressDefaults(tmp_path: Path) -> None:
    settings = loadWith(tmp_path, "compress = zstd, br, gzip").routes[0].compress  # type: ignore[attr-defined]
    assert settings.min_size == 1024
    assert settings.level("zstd") == 3 and settings.level("br") == 4 and settings.level("gzip") == 6
    assert "text/*" in settings.types and "application/wasm" in settings.types


def test_imageKeys(tmp_path: Path) -> None:
    key = tmp_path / "sign.key"
    key.write_text("k" * 64 + "\n")
    route = loadWith(
        tmp_path,
        "images = webp, avif\nimage_quality = avif:50\nimage_max_pixels = 1000000\n"
        "image_max_bytes = 2MiB\nimage_resize = yes\nimage_signing_key_file = sign.key",
    ).routes[0]  # type: ignore[attr-defined]
    assert route.images == ImageSettings(
        formats=("webp", "avif"),
        quality=(("avif", 50), ("webp", 80)),
        max_pixels=1_000_000,
        max_bytes=2 * 1024 * 1024,
        resize=True,
        signing_key=b"k" * 64,
    )
    assert "kkkk" not in repr(route.images)


@pytest.mark.parametrize(
    "proxy, workers, imageWorkers",
    [
        ("", 1, 6),
        ("workers = 2", 2, 3),
        ("workers = 4", 4, 1),
        ("workers = 8", 8, 1),
        ("workers = auto", 6, 1),
        ("workers = 2\nimage_workers = auto", 2, 3),
        ("workers = 2\nimage_workers = 5", 2, 5),
    ],
)
def test_imageWorkersDivideTheCPUsAmongTheWorkers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: str, workers: int, imageWorkers: int
) -> None:
    """
    Each worker process has its own conversion processes: by default they
    share out the CPUs this process may run on (its affinity: 6 of the
    machine's 64 here), not each take them all.
    """
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    settings = loadWith(tmp_path, proxy=proxy).proxy  # type: ignore[attr-defined]
    assert (settings.workers, settings.image_workers) == (workers, imageWorkers)


def test_proxyKeys(tmp_path: Path) -> None:
    proxy = loadWith(tmp_path, proxy="image_workers = 3\nimage_queue = 0").proxy  # type: ignore[attr-defined]
    assert (proxy.image_workers, proxy.image_queue) == (3, 0)


@pytest.mark.parametrize(
    "route, proxy, message",
    [
        ("compress = deflate", "", "edge.ini:12: [route:r] compress: expected encodings from zstd, br, gzip, got 'deflate'"),
        ("compress = br, br", "", "encodings 'br' is listed twice"),
        ("compress_types = text/html", "", "[route:r] compress_types: only used with compress = ENCODINGS"),
        ("compress = br\ncompress_types = html", "", "expected media types such as text/html"),
        ("compress = br\ncompress_level = br:12", "", "the level of br is a whole number from 0 to 11, got '12'"),
        ("compress = zstd\ncompress_level = zstd:22", "", "the level of zstd is a whole number from 1 to 19"),
        ("compress = br\ncompress_level = 5", "", "expected NAME:level entries"),
        ("compress = br\ncompress_min_size = 1KB", "", "[route:r] compress_min_size"),
        ("images = jxl", "", "expected formats from avif, webp, got 'jxl'"),
        ("image_resize = yes", "", "only used with images = FORMATS"),
        ("images = avif\nimage_quality = avif:0", "", "the quality of avif is a whole number from 1 to 100"),
        ("images = avif\nimage_signing_key_file = k", "", "only used with image_resize = yes"),
        ("images = avif\nimage_resize = yes\nimage_signing_key_file = missing.key", "", "missing.key"),
        ("", "image_workers = 0", "[edgeproxy] image_workers: expected a number of conversions from 1 to 256"),
        ("", "image_queue = -1", "[edgeproxy] image_queue"),
    ],
)
def test_errors(tmp_path: Path, route: str, proxy: str, message: str) -> None:
    assert message in errorOf(tmp_path, route, proxy)


def test_shortSigningKeyIsRefused(tmp_path: Path) -> None:
    (tmp_path / "short.key").write_text("secret")
    message = errorOf(tmp_path, "images = avif\nimage_resize = yes\nimage_signing_key_file = short.key")
    assert "[route:r] image_signing_key_file" in message
    assert "needs at least 32" in message
