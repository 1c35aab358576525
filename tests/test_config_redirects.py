"""
Redirect routes in C{edge.ini} (L{edgeproxy.config.redirects}): the
template's checks, the status, and the keys a redirect route may not have.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config.model import Config
from edgeproxy.config.stagemodel import RouteRedirect
from edgeproxy.config.parse import load
from edgeproxy.config.redirects import parseTemplate
from edgeproxy.errors import ConfigError

BASE = """\
[listen:a]
endpoint = tcp:8080

[upstream:u]
servers = 127.0.0.1:9000

[route:r]
hosts = www.example.com
{route}
"""


def loadWith(tmp_path: Path, route: str) -> Config:
    path = tmp_path / "edge.ini"
    path.write_text(BASE.format(route=route))
    return load(str(path))


def errorOf(tmp_path: Path, route: str) -> str:
    with pytest.raises(ConfigError) as raised:
        loadWith(tmp_path, route)
    return str(raised.value)


def test_wwwToApex(tmp_path: Path) -> None:
    route = loadWith(tmp_path, "redirect = https://example.com$request_uri").routes[0]
    assert route.upstream is None
    assert route.redirect == RouteRedirect(
        location="https://example.com$request_uri",
        parts=(("text", "https://example.com"), ("var", "request_uri")),
        status=301,
    )


def test_movedSubtreeWithItsStatus(tmp_path: Path) -> None:
    route = loadWith(
        tmp_path,
        "paths = /old/\nstrip_prefix = yes\nredirect = https://example.com/new$path$is_args$args\n"
        "redirect_status = 308",
    ).routes[0]
    assert route.strip_prefix
    assert route.redirect is not None and route.redirect.status == 308


@pytest.mark.parametrize(
    "template",
    [
        "https://example.com",
        "https://example.com/",
        "http://[2001:db8::1]:8080/x$request_uri",
        "$scheme://example.com$request_uri",
        "https://$host:8443$request_uri",
        "https://$host$path",
        "https://example.com:8443?from=$host",
        "/",
        "/new$request_uri",
        "/?q=$query",
    ],
)
def test_acceptedTemplates(template: str) -> None:
    assert parseTemplate(template)


@pytest.mark.parametrize(
    "template, message",
    [
        ("https://example.com$nope", "unknown variable $nope (variables are: $request_uri"),
        ("https://example.com/$", "a '$' must start a variable"),
        ("$request_uri", "expected an http:// or https:// URL"),
        ("example.com/x", "expected an http:// or https:// URL"),
        ("javascript:alert(1)", "expected an http:// or https:// URL"),
        ("/$path", "a path must start with / and a written character other than /"),
        ("//evil.example/x", "a path must start with / and a written character other than /"),
        ("/\\evil.example", "a path must start with / and a written character other than /"),
        ("https://$path", "must be written out or be $host, not $path"),
        ("https://example.com$query", "the host must be followed by"),
        ("https://example.com$is_args", "the host must be followed by"),
        ("https://$host.evil.example/", "the host must be followed by"),
        ("https://user@evil.example/", "is not a host name"),
        ("https://a b/", "printable ASCII only"),
        ("https://example.com/\x7f", "printable ASCII only"),
        ("$scheme:example.com", "$scheme must be followed by ://"),
    ],
)
def test_refusedTemplates(template: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parseTemplate(template)
    assert message in str(raised.value)


def test_errorsNameTheKey(tmp_path: Path) -> None:
    assert "edge.ini:9: [route:r] redirect: unknown variable $uri" in errorOf(
        tmp_path, "redirect = https://example.com$uri"
    )
    assert "[route:r] redirect_status: expected one of 301, 302, 303, 307, 308, got '300'" in errorOf(
        tmp_path, "redirect = /x\nredirect_status = 300"
    )


def test_eitherUpstreamOrRedirect(tmp_path: Path) -> None:
    both = errorOf(tmp_path, "upstream = u\nredirect = https://example.com/")
    assert "[route:r] upstream: a route has either upstream (it forwards) or redirect (it answers)" in both
    neither = errorOf(tmp_path, "paths = /")
    assert "[route:r] upstream: missing required key 'upstream'" in neither
    assert "or redirect = URL" in neither


def test_keysARedirectRouteCannotUse(tmp_path: Path) -> None:
    message = errorOf(tmp_path, "redirect = https://example.com/\ncache = yes\nresponse_timeout = 5s")
    assert "[route:r] cache: not used on a redirect route" in message
    assert "[route:r] response_timeout: not used on a redirect route" in message


def test_statusOnlyWithRedirect(tmp_path: Path) -> None:
    assert "[route:r] redirect_status: only used with redirect = URL" in errorOf(
        tmp_path, "upstream = u\nredirect_status = 302"
    )
