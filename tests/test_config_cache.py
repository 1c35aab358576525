"""
Tests for L{edgeproxy.config.cache}: the C{[cache]} section and a route's
cache keys as read from a real file, and the error each mistake gets,
naming the file, the line, the section and the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config.parse import load
from edgeproxy.config.stagemodel import CacheSettings, RouteCache
from edgeproxy.errors import ConfigError

BASE = """\
[listen:a]
endpoint = tcp:8080

[upstream:u]
servers = 127.0.0.1:9000

[route:r]
hosts = *
upstream = u
{route}

{cache}
"""


def write(tmp_path: Path, route: str = "", cache: str = "") -> tuple[str, str]:
    text = BASE.format(route=route, cache=cache)
    path = tmp_path / "edge.ini"
    path.write_text(text)
    return str(path), text


def lineOf(text: str, marker: str) -> int:
    [line] = [n for n, content in enumerate(text.splitlines(), 1) if content.startswith(marker)]
    return line


def test_read(tmp_path: Path) -> None:
    path, _ = write(
        tmp_path,
        route="cache = yes\nstale_if_error = 1m\ndefault_ttl = 30s",
        cache="[cache]\nmemory = 1MiB\nkey_includes = header:X-Tenant, cookie:Lang\npurge_from = 10.0.0.0/8",
    )
    config = load(path)
    assert config.cache is not None
    assert config.cache.memory == 2**20 and config.cache.key_includes == ("header:x-tenant", "cookie:Lang")
    assert config.cache.disk is None and config.cache.name == CacheSettings().name
    assert config.routes[0].cache == RouteCache(stale_if_error=60.0, default_ttl=30.0)


# (route keys, [cache] section, the section, key and line marker the error
# names, what its message says)
ERRORS = [
    ("", "[cache]\nmemory = 0", "cache", "memory", "memory =", "memory = 0 needs disk = PATH"),
    ("", "[cache]\nkey_includes = query:x", "cache", "key_includes", "key_includes",
     "expected header:NAME or cookie:NAME, got 'query:x'"),
    ("", "[cache]\nkey_includes = client_ip", "cache", "key_includes", "key_includes",
     "expected header:NAME or cookie:NAME, got 'client_ip'"),
    ("", "[cache]\nkey_includes = header:a/b", "cache", "key_includes", "key_includes",
     "expected a header name (an HTTP token)"),
    ("", "[cache]\nkey_includes = header:X-A, header:x-a", "cache", "key_includes", "key_includes",
     "'header:x-a' is listed twice"),
    ("", "[cache]\ndisk_size = 1GiB", "cache", "disk_size", "disk_size", "only used with disk = PATH"),
    ("", "[cache]\ntargeted_field = a b", "cache", "targeted_field", "targeted_field", "expected an HTTP token"),
    ("", "[cache]\npurge_from = nowhere", "cache", "purge_from", "purge_from", "expected IP addresses"),
    ("", "[cache]\nmax_object_size = 0", "cache", "max_object_size", "max_object_size", "at least 1 bytes"),
    ("", "[cache]\nmemory_size = 1MiB", "cache", "memory_size", "memory_size", "did you mean 'memory'?"),
    ("stale_if_error = 1m", "", "route:r", "stale_if_error", "stale_if_error", "only used with cache = yes"),
    ("cache = no\ndefault_ttl = 1m", "", "route:r", "default_ttl", "default_ttl", "only used with cache = yes"),
    ("cache_cookies = yes", "", "route:r", "cache_cookies", "cache_cookies", "only used with cache = yes"),
    ("cache = maybe", "", "route:r", "cache", "cache =", "expected"),
]


@pytest.mark.parametrize(
    "route, cache, section, key, marker, message", ERRORS, ids=[case[-1][:40] for case in ERRORS]
)
def test_errors(tmp_path: Path, route: str, cache: str, section: str, key: str, marker: str, message: str) -> None:
    path, text = write(tmp_path, route, cache)
    with pytest.raises(ConfigError) as raised:
        load(path)
    found = [e for e in getattr(raised.value, "errors", (raised.value,)) if message in e.message]
    assert found, str(raised.value)
    error = found[0]
    assert (error.file, error.section, error.key) == (path, section, key)
    assert error.line == lineOf(text, marker)
    assert str(error).startswith(f"{path}:{error.line}: [{section}] {key}: ")


def test_aDiskPathThatIsAFile(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    path, text = write(tmp_path, "cache = yes", f"[cache]\ndisk = {tmp_path / 'taken'}")
    with pytest.raises(ConfigError) as raised:
        load(path)
    error = raised.value
    assert (error.section, error.key, error.line) == ("cache", "disk", lineOf(text, "disk ="))
    assert "exists and is not a directory" in str(error)


def test_memoryZeroWithADiskIsFine(tmp_path: Path) -> None:
    path, _ = write(tmp_path, "cache = yes", f"[cache]\nmemory = 0\ndisk = {tmp_path / 'cache'}")
    config = load(path)
    assert config.cache is not None and config.cache.memory == 0
