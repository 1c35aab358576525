"""
The header keys' configuration (L{edgeproxy.config.headers}): a route's
header rules and C{[edgeproxy] request_id} / C{client_ip_header} read into
their values, and every mistake refused with the file, line, section and
key, before anything starts.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgeproxy.config.headers import NOT_SET_ON_REQUESTS, NOT_SET_ON_RESPONSES
from edgeproxy.config.stagemodel import HeaderRules
from edgeproxy.config.parse import load
from edgeproxy.errors import ConfigError, ConfigErrors
from edgeproxy.h1.responses import HOP_BY_HOP
from edgeproxy.pipeline.forwarded import PROXY_ADDED

BASE = """\
[listen:web]
endpoint = tcp:8080

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = example.com
upstream = app
"""


def configure(tmp_path: Path, route: str = "", proxy: str = "") -> str:
    text = BASE + textwrap.dedent(route)
    if proxy:
        text = "[edgeproxy]\n" + textwrap.dedent(proxy) + "\n" + text
    path = tmp_path / "edge.ini"
    path.write_text(text)
    return str(path)


def refusal(tmp_path: Path, route: str = "", proxy: str = "") -> ConfigError:
    path = configure(tmp_path, route, proxy)
    with pytest.raises(ConfigError) as raised:
        load(path)
    error = raised.value
    assert not isinstance(error, ConfigErrors), str(error)
    return error


def test_rulesRead(tmp_path: Path) -> None:
    """One field per line; names lower case; patterns kept with their '*'."""
    config = load(
        configure(
            tmp_path,
            """\
            request_headers_set = X-Env: prod
                X-Team: edge ops
            request_headers_add = X-Trace:   a, b
            request_headers_remove = X-Debug, X-Internal-*
                Cookie
            response_headers_set = Content-Security-Policy: default-src 'self'; frame-ancestors 'none'
                Cache-Control: no-store, private
                Set-Cookie: a=1
                Set-Cookie: b=2
            response_headers_remove = X_Backend_Debug
            """,
        )
    )
    [route] = config.routes
    assert route.request_headers == HeaderRules(
        remove=("x-debug", "x-internal-*", "cookie"),
        set=(("x-env", "prod"), ("x-team", "edge ops")),
        add=(("x-trace", "a, b"),),
    )
    assert route.response_headers == HeaderRules(
        remove=("x_backend_debug",),
        set=(
            ("content-security-policy", "default-src 'self'; frame-ancestors 'none'"),
            ("cache-control", "no-store, private"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ),
    )


def test_noRulesNoValue(tmp_path: Path) -> None:
    [route] = load(configure(tmp_path)).routes
    assert (route.request_headers, route.response_headers) == (None, None)


def test_proxyDefaults(tmp_path: Path) -> None:
    """A request ID in X-Request-ID by default; no client address field."""
    config = load(configure(tmp_path))
    assert (config.proxy.request_id, config.proxy.client_ip_header) == ("X-Request-ID", None)


def test_proxyKeys(tmp_path: Path) -> None:
    config = load(configure(tmp_path, proxy="request_id = X-Correlation-ID\nclient_ip_header = X-Real-IP"))
    assert (config.proxy.request_id, config.proxy.client_ip_header) == ("X-Correlation-ID", "X-Real-IP")
    config = load(configure(tmp_path, proxy="request_id = off\nclient_ip_header = off"))
    assert (config.proxy.request_id, config.proxy.client_ip_header) == (None, None)


ROUTE_ERRORS = [
    # (key = value as written, the line the error points at, what it says)
    ("request_headers_set = X-Env", "request_headers_set", "expected 'Name: value'"),
    ("request_headers_set = : prod", "request_headers_set", "expected 'Name: value'"),
    ("request_headers_set = X Env: prod", "request_headers_set", "expected a field name"),
    ("request_headers_set = X-Env:", "request_headers_set", "has no value"),
    ("request_headers_set = X-Env: caf\u00e9", "request_headers_set", "printable ASCII"),
    ("request_headers_set = X-Env: a\x00b", "request_headers_set", "printable ASCII"),
    ("request_headers_set = X-Env: a\x1bb", "request_headers_set", "printable ASCII"),
    ("request_headers_set = X_Env: prod", "request_headers_set", "with '_' are not passed on"),
    ("request_headers_set = Host: other.example", "request_headers_set", "host_header"),
    ("request_headers_add = Connection: close", "request_headers_add", "connection or framing"),
    ("request_headers_set = Transfer-Encoding: chunked", "request_headers_set", "connection or framing"),
    ("request_headers_set = Content-Length: 5", "request_headers_set", "connection or framing"),
    ("request_headers_set = X-Forwarded-For: 1.2.3.4", "request_headers_set", "trusted_proxies"),
    ("request_headers_set = Via: 1.1 other", "request_headers_set", "[edgeproxy] via"),
    ("request_headers_set = X-Real-IP: 1.2.3.4", "request_headers_set", "client_ip_header"),
    ("request_headers_set = X-Request-ID: fixed", "request_headers_set", "[edgeproxy] request_id"),
    ("response_headers_add = X-Request-ID: fixed", "response_headers_add", "[edgeproxy] request_id"),
    ("response_headers_set = Transfer-Encoding: gzip", "response_headers_set", "connection or framing"),
    ("response_headers_set = Content-Length: 0", "response_headers_set", "connection or framing"),
    ("response_headers_remove = Connection", "response_headers_remove", "connection or framing"),
    ("request_headers_remove = Host", "request_headers_remove", "RFC 9112 3.2"),
    ("request_headers_remove = *", "request_headers_remove", "name's start followed by '*'"),
    ("request_headers_remove = X-*-Id", "request_headers_remove", "name's start followed by '*'"),
    ("response_headers_remove = X@Y", "response_headers_remove", "expected a field name"),
    ("request_headers_set =", "request_headers_set", "expected a value"),
]


@pytest.mark.parametrize("written, key, message", ROUTE_ERRORS)
def test_routeErrors(tmp_path: Path, written: str, key: str, message: str) -> None:
    error = refusal(tmp_path, written + "\n")
    assert (error.section, error.key) == ("route:app", key), str(error)
    assert error.line == BASE.count("\n") + 1
    assert error.file == str(tmp_path / "edge.ini")
    assert message in error.message, str(error)
    assert str(error).startswith(f"{tmp_path / 'edge.ini'}:{error.line}: [route:app] {key}: ")


def test_errorNamesTheLineOfTheValue(tmp_path: Path) -> None:
    """In a value of several lines, the message says which line is wrong."""
    error = refusal(
        tmp_path,
        """\
        response_headers_set = X-A: 1
            X-B 2
        """,
    )
    assert error.key == "response_headers_set"
    assert "line 2 of the value" in error.message and "'X-B 2'" in error.message


def test_responseFieldsWithUnderscoresAreFine(tmp_path: Path) -> None:
    """Only requests drop names with '_' (the backend's CGI would confuse them)."""
    [route] = load(configure(tmp_path, "response_headers_add = X_Frame: 1\n")).routes
    assert route.response_headers == HeaderRules(add=(("x_frame", "1"),))


def test_renamedRequestIdIsTheOneRefused(tmp_path: Path) -> None:
    """The cross-check follows [edgeproxy] request_id and client_ip_header."""
    path = configure(
        tmp_path, "request_headers_set = X-Request-ID: fixed\n", proxy="request_id = X-Trace-ID"
    )
    assert load(path).routes[0].request_headers == HeaderRules(set=(("x-request-id", "fixed"),))
    error = refusal(
        tmp_path, "request_headers_add = X-Client: 1\n", proxy="client_ip_header = X-Client"
    )
    assert (error.key, error.section) == ("request_headers_add", "route:app")
    assert "client_ip_header = X-Client" in error.message
    load(configure(tmp_path, "response_headers_set = X-Request-ID: fixed\n", proxy="request_id = off"))


PROXY_ERRORS = [
    ("request_id = X Request", "request_id", "expected a field name"),
    ("request_id = X_Request_ID", "request_id", "'_'"),
    ("request_id = Host", "request_id", "cannot be used"),
    ("request_id = X-Forwarded-For", "request_id", "cannot be used"),
    ("request_id = Content-Length", "request_id", "cannot be used"),
    ("request_id = X-Real-IP", "request_id", "carries an address"),
    ("client_ip_header = Via", "client_ip_header", "cannot be used"),
    ("request_id = X-Id\nclient_ip_header = x-id", "client_ip_header", "request ID's field"),
]


@pytest.mark.parametrize("written, key, message", PROXY_ERRORS)
def test_proxyErrors(tmp_path: Path, written: str, key: str, message: str) -> None:
    error = refusal(tmp_path, proxy=written)
    assert (error.section, error.key) == ("edgeproxy", key), str(error)
    assert message in error.message, str(error)


def test_everyMistakeAtOnce(tmp_path: Path) -> None:
    """Several bad header keys are reported in one run, each at its line."""
    path = configure(
        tmp_path,
        "request_headers_set = Host: x\nresponse_headers_add = Connection: close\n",
        proxy="request_id = a b",
    )
    with pytest.raises(ConfigErrors) as raised:
        load(path)
    assert [(error.section, error.key) for error in raised.value.errors] == [
        ("edgeproxy", "request_id"),
        ("route:app", "request_headers_set"),
        ("route:app", "response_headers_add"),
    ]


def test_refusedNamesCoverWhatTheProxyWrites() -> None:
    """
    The names refused on requests are the ones the forward stage writes or
    drops itself (L{edgeproxy.pipeline.forwarded}), and on both sides the
    connection fields (L{edgeproxy.h1}): the lists are kept in step.
    """
    connection = {name.decode() for name in HOP_BY_HOP} | {"content-length"}
    assert connection <= set(NOT_SET_ON_RESPONSES) == connection
    assert {name.decode() for name in PROXY_ADDED} | connection | {"x-real-ip"} == set(NOT_SET_ON_REQUESTS)
