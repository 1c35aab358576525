"""
Custom error pages in C{edge.ini} (L{edgeproxy.config.errorpages}): the
directory's files read with the configuration, the route's pages over the
global ones, and the error a bad directory or file gets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeproxy.config.errorpages import PAGE_LIMIT, mergePages
from edgeproxy.config.model import Config
from edgeproxy.config.stagemodel import ErrorPage, ErrorPages
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

[route:other]
hosts = other.example
upstream = u
"""


def pages(directory: Path, **files: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name.replace("_", ".")
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


def loadWith(tmp_path: Path, proxy: str = "", route: str = "") -> Config:
    path = tmp_path / "edge.ini"
    path.write_text(BASE.format(proxy=proxy, route=route))
    return load(str(path))


def errorOf(tmp_path: Path, proxy: str = "", route: str = "") -> str:
    with pytest.raises(ConfigError) as raised:
        loadWith(tmp_path, proxy, route)
    return str(raised.value)


def test_noneByDefault(tmp_path: Path) -> None:
    config = loadWith(tmp_path)
    assert config.proxy.error_pages is None
    assert config.routes[0].error_pages is None


def test_globalPagesByStatusAndClass(tmp_path: Path) -> None:
    pages(tmp_path / "errors", **{"404_html": "<p>gone</p>", "5xx_json": "{}", "README": "not a page"})
    config = loadWith(tmp_path, proxy="error_pages = errors")
    found = config.proxy.error_pages
    assert found is not None
    page = found.page(404)
    assert page == ErrorPage(str(tmp_path / "errors" / "404.html"), "text/html; charset=utf-8", b"<p>gone</p>")
    assert found.page(502) == found.page(504) and found.page(502).content_type == "application/json"  # type: ignore[union-attr]
    assert found.page(403) is None
    # Every route without pages of its own has the global ones.
    assert [route.error_pages for route in config.routes] == [found, found]


def test_contentTypesByExtension(tmp_path: Path) -> None:
    pages(tmp_path / "e", **{"400_htm": "a", "401_TXT": "b", "402_json": "c"})
    found = loadWith(tmp_path, proxy="error_pages = e").proxy.error_pages
    assert found is not None
    assert [found.page(s).content_type for s in (400, 401, 402)] == [  # type: ignore[union-attr]
        "text/html; charset=utf-8",
        "text/plain; charset=utf-8",
        "application/json",
    ]


def test_routePagesOverTheGlobalOnes(tmp_path: Path) -> None:
    pages(tmp_path / "site", **{"404_html": "site 404", "502_html": "site 502", "5xx_html": "site 5xx",
                                 "403_html": "site 403"})
    pages(tmp_path / "api", **{"5xx_json": "api 5xx", "403_json": "api 403"})
    config = loadWith(tmp_path, proxy="error_pages = site", route="error_pages = api")
    api = config.routes[0].error_pages
    assert api is not None
    # The route's page for the status, else for its class, else the
    # global page for the status, else for its class.
    assert api.page(403).body == b"api 403"  # type: ignore[union-attr]
    assert api.page(502).body == b"api 5xx"  # type: ignore[union-attr]
    assert api.page(404).body == b"site 404"  # type: ignore[union-attr]
    assert api.page(401) is None
    assert config.routes[1].error_pages == config.proxy.error_pages


def test_mergeWithoutEither() -> None:
    only = ErrorPages(classes=((4, ErrorPage("/x", "text/plain; charset=utf-8", b"x")),))
    assert mergePages(None, None) is None
    assert mergePages(only, None) is only and mergePages(None, only) is only


@pytest.mark.parametrize(
    "files, message",
    [
        ({"404_php": "x"}, "404.php: unknown extension .php (a page is .html, .htm, .json or .txt)"),
        ({"301_html": "x"}, "301.html: pages are for the error statuses 400 to 599 (4xx and 5xx), not 301"),
        ({"3xx_html": "x"}, "pages are for the error statuses 400 to 599 (4xx and 5xx), not 3xx"),
        ({"404_html": "x", "404_json": "y"}, "another page for 404 is here too"),
        ({"500_txt": b"\xff\xfe"}, "500.txt is not UTF-8 text"),
        ({"README": "no pages"}, "holds no error page (files named by status: 404.html"),
    ],
)
def test_badDirectoriesNameTheKeyAndTheFile(
    tmp_path: Path, files: dict[str, str | bytes], message: str
) -> None:
    pages(tmp_path / "errors", **files)
    text = errorOf(tmp_path, proxy="error_pages = errors")
    assert "edge.ini:2: [edgeproxy] error_pages: " in text
    assert message in text


def test_missingDirectory(tmp_path: Path) -> None:
    text = errorOf(tmp_path, route="error_pages = nowhere")
    assert "[route:r] error_pages: " in text and "nowhere does not exist" in text


def test_oversizePage(tmp_path: Path) -> None:
    pages(tmp_path / "errors", **{"500_html": "x" * (PAGE_LIMIT + 1)})
    assert f"more than the {PAGE_LIMIT} bytes" in errorOf(tmp_path, proxy="error_pages = errors")


def test_pageThatIsAFIFO(tmp_path: Path) -> None:
    # A page that is not a regular file is refused, never read (which
    # would wait forever).
    directory = pages(tmp_path / "errors", **{"404_html": "ok"})
    os.mkfifo(directory / "500.html")
    assert "500.html is a pipe (FIFO), expected a regular file" in errorOf(
        tmp_path, proxy="error_pages = errors"
    )
