# -*- test-case-name: tests.test_config_errorpages -*-
"""
Reading custom error pages: C{error_pages = DIRECTORY} in C{[edgeproxy]}
(every request) and in C{[route:NAME]} (that route's requests, over the
global pages).  Part of L{edgeproxy.config.parse}; the pages are served by
L{edgeproxy.http.errorpages}.

The directory holds one file per status or class of statuses, named as
Caddy and most static sites name them: C{404.html}, C{502.json},
C{5xx.html}, C{4xx.txt}.  The extension gives the content type
(L{CONTENT_TYPES}).  Other files (a C{README}, images) are left alone;
a file named like a page with another status or extension, or two files
for one status, is an error naming it.  Every page is read here, when the
configuration is (at start, by C{edgeproxy check}, on every reload), as a
regular file of at most L{PAGE_LIMIT} bytes in UTF-8: never while a
request waits, and a bad file on reload keeps the running configuration.

A route's pages are merged with the global ones when read
(L{mergePages}): for a status, the route's page for it, else the route's
page for its class, else the global page for it, else the global page for
its class, else the built-in page.
"""

from __future__ import annotations

import os
import re

from edgeproxy.config.files import FileProblem, readRegularFile
from edgeproxy.config.stagemodel import ErrorPage, ErrorPages
from edgeproxy.config.section import Section

__all__ = ["CONTENT_TYPES", "ERROR_PAGES_KEYS", "PAGE_LIMIT", "mergePages", "readErrorPages"]

ERROR_PAGES_KEYS = ("error_pages",)
"""The key of C{[edgeproxy]} and of C{[route:NAME]} read here."""

PAGE_LIMIT = 256 * 1024
"""Bytes of one page: every page is held in memory by every process."""

CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "htm": "text/html; charset=utf-8",
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}
"""A page's content type by the extension of its file."""

_PAGE_NAME = re.compile(r"([0-9]{3}|[0-9]xx)\.([^.]+)\Z", re.IGNORECASE)


def readErrorPages(section: Section) -> ErrorPages | None:
    """The pages of C{error_pages} in C{section}, or L{None} without it."""
    return section.convert("error_pages", None, lambda text: _readDirectory(section.resolve(text)))


def _readDirectory(directory: str) -> ErrorPages:
    if not os.path.isdir(directory):
        problem = "does not exist" if not os.path.exists(directory) else "is not a directory"
        raise ValueError(f"{directory} {problem} (expected a directory of pages such as 404.html)")
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise ValueError(f"{directory} cannot be read: {e.strerror or e}") from None
    exact: dict[int, ErrorPage] = {}
    classes: dict[int, ErrorPage] = {}
    for name in names:
        match = _PAGE_NAME.match(name)
        if match is None:
            continue  # not a page (a README, an image)
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            continue
        status, extension = match.group(1).lower(), match.group(2).lower()
        if extension not in CONTENT_TYPES:
            raise ValueError(
                f"{path}: unknown extension .{match.group(2)} (a page is .html, .htm, .json or .txt)"
            )
        if status.endswith("xx"):
            key, table = int(status[0]), classes
            valid = key in (4, 5)
        else:
            key, table = int(status), exact
            valid = 400 <= key <= 599
        if not valid:
            raise ValueError(
                f"{path}: pages are for the error statuses 400 to 599 (4xx and 5xx), not {status}"
            )
        if key in table:
            raise ValueError(f"{path}: another page for {status} is here too ({table[key].path})")
        table[key] = _readPage(path, CONTENT_TYPES[extension])
    if not exact and not classes:
        raise ValueError(
            f"{directory} holds no error page (files named by status: 404.html, 502.json, 5xx.html...)"
        )
    return ErrorPages(exact=tuple(sorted(exact.items())), classes=tuple(sorted(classes.items())))


def _readPage(path: str, contentType: str) -> ErrorPage:
    try:
        body = readRegularFile(path, PAGE_LIMIT)
    except FileProblem as e:
        raise ValueError(f"{path} {e}") from None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return ErrorPage(path=path, content_type=contentType, body=body)


def mergePages(own: ErrorPages | None, fallback: ErrorPages | None) -> ErrorPages | None:
    """
    A route's pages over the global ones, in the order the module docstring
    gives: a global page for one status is kept only when the route has no
    page for that status nor for its class.
    """
    if own is None or fallback is None:
        return own if own is not None else fallback
    exact = dict(own.exact)
    ownClasses = dict(own.classes)
    for status, page in fallback.exact:
        if status not in exact and status // 100 not in ownClasses:
            exact[status] = page
    classes = dict(fallback.classes)
    classes.update(ownClasses)
    return ErrorPages(exact=tuple(sorted(exact.items())), classes=tuple(sorted(classes.items())))
