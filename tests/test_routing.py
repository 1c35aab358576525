"""
Tests for L{edgeproxy.routing}.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.config.model import Route
from edgeproxy.errors import ConfigError
from edgeproxy.routing import RouteMatch, Router, normaliseHost


def route(name: str, hosts: tuple[str, ...], paths: tuple[str, ...] = ("/",)) -> Route:
    return Route(name=name, hosts=hosts, paths=paths, upstream="u-" + name)


ROUTES = [
    route("site", ("example.com", "www.example.com"), ("/",)),
    route("api", ("example.com",), ("/api", "/v2/")),
    route("apiv1", ("example.com",), ("/api/v1",)),
    route("wild", ("*.example.com",), ("/",)),
    route("wildstatic", ("*.example.com",), ("/static/",)),
    route("ip4", ("192.0.2.10",), ("/",)),
    route("ip6", ("2001:db8::1",), ("/",)),
    route("any", ("*",), ("/",)),
    route("anyhealth", ("*",), ("/healthz",)),
    route("onlyapi", ("api-only.test",), ("/api",)),
]


@pytest.fixture
def router() -> Router:
    return Router(ROUTES)


@pytest.mark.parametrize(
    "host,path,name,prefix",
    [
        (b"example.com", b"/", "site", "/"),
        (b"example.com", b"/index.html", "site", "/"),
        (b"example.com", b"/api", "api", "/api"),
        (b"example.com", b"/api/", "api", "/api"),
        (b"example.com", b"/api/users", "api", "/api"),
        (b"example.com", b"/apix", "site", "/"),
        (b"example.com", b"/api/v1", "apiv1", "/api/v1"),
        (b"example.com", b"/api/v1/x", "apiv1", "/api/v1"),
        (b"example.com", b"/api/v10", "api", "/api"),
        (b"example.com", b"/v2", "site", "/"),
        (b"example.com", b"/v2/", "api", "/v2/"),
        (b"example.com", b"/v2/x", "api", "/v2/"),
        (b"EXAMPLE.com.", b"/api", "api", "/api"),
        (b"example.com:8443", b"/api", "api", "/api"),
        (b"www.example.com", b"/api", "site", "/"),
        (b"a.example.com", b"/x", "wild", "/"),
        (b"A.Example.COM:443", b"/static/app.js", "wildstatic", "/static/"),
        (b"a.example.com", b"/static", "wild", "/"),
        (b"a.b.example.com", b"/", "any", "/"),
        (b"other.test", b"/", "any", "/"),
        (b"other.test", b"/healthz", "anyhealth", "/healthz"),
        (b"other.test", b"/healthz/deep", "anyhealth", "/healthz"),
        (b"other.test", b"/healthzz", "any", "/"),
        (b"192.0.2.10", b"/", "ip4", "/"),
        (b"192.0.2.10:80", b"/", "ip4", "/"),
        (b"[2001:DB8:0::1]:443", b"/", "ip6", "/"),
        (b"[2001:db8::1]", b"/x", "ip6", "/"),
        (b"", b"/", "any", "/"),
        (b"example.com", b"//api", "site", "/"),
    ],
)
def test_match(router: Router, host: bytes, path: bytes, name: str, prefix: str) -> None:
    match = router.match(host, path)
    assert match is not None
    # The matched prefix is bytes, as the paths it is compared with.
    assert (match.route.name, match.prefix) == (name, prefix.encode())


def test_wildcardDoesNotMatchApex() -> None:
    router = Router([route("wild", ("*.example.com",))])
    assert router.match(b"example.com", b"/") is None
    assert router.match(b"a.b.example.com", b"/") is None
    assert router.match(b"a.example.com", b"/") is not None


def test_noFallThroughFromKnownHost(router: Router) -> None:
    """
    A host with routes but no matching prefix gets no route, even though
    the catch-all has one.
    """
    assert router.match(b"api-only.test", b"/other") is None
    assert router.match(b"api-only.test", b"/api/x").route.name == "onlyapi"


def test_unparseableHost(router: Router) -> None:
    assert router.match(b"caf\xc3\xa9.example", b"/") is None
    assert router.match(b"[::1", b"/") is None
    assert router.match(b"[::1]x", b"/") is None


def test_noCatchAll() -> None:
    router = Router([route("site", ("example.com",))])
    assert router.match(b"other.test", b"/") is None


def test_hosts(router: Router) -> None:
    assert router.hosts == {
        "example.com", "www.example.com", "192.0.2.10", "2001:db8::1", "api-only.test",
    }


def test_firstRouteKeepsDuplicatePrefix() -> None:
    router = Router([route("a", ("x.test",), ("/p",)), route("b", ("x.test",), ("/p",))])
    assert router.match(b"x.test", b"/p").route.name == "a"


def test_prefixesNormalised() -> None:
    router = Router([route("a", ("x.test",), ("/%7euser/./docs",))])
    assert router.match(b"x.test", b"/~user/docs/a") == RouteMatch(router.match(b"x.test", b"/~user/docs").route, b"/~user/docs")


@pytest.mark.parametrize(
    "hosts,paths",
    [(("x.test",), ("/a/../..",)), (("x.test",), ("api",)), (("x.test",), ("/a?b",)), (("*.",), ("/",)), (("a*b",), ("/",))],
)
def test_badConfiguration(hosts: tuple[str, ...], paths: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        Router([route("bad", hosts, paths)])
    assert caught.value.section == "route:bad"


@pytest.mark.parametrize(
    "raw,name",
    [
        (b"Example.COM", "example.com"),
        (b"example.com.", "example.com"),
        (b"example.com:80", "example.com"),
        (b"[::1]:80", "::1"),
        (b"[2001:DB8::0:1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        (b"", ""),
    ],
)
def test_normaliseHost(raw: bytes | str, name: str) -> None:
    assert normaliseHost(raw) == name


# Longest-prefix property: the table lookup agrees with a linear scan.

_SEGMENTS = st.sampled_from(["a", "b", "api", "v1", ""])
_PREFIXES = st.lists(_SEGMENTS, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
_PATHS = st.lists(st.sampled_from(["a", "b", "api", "v1", "", "ab", "apix"]), max_size=5).map(
    lambda s: ("/" + "/".join(s)).encode()
)


def _prefixMatches(prefix: str, path: bytes) -> bool:
    p = prefix.encode()
    if p.endswith(b"/"):
        return path.startswith(p)
    return path == p or path.startswith(p + b"/")


@settings(max_examples=500)
@given(st.lists(_PREFIXES, min_size=1, max_size=8, unique=True), _PATHS)
def test_longestPrefixWins(prefixes: list[str], path: bytes) -> None:
    routes = [route(f"r{i}", ("h.test",), (prefix,)) for i, prefix in enumerate(prefixes)]
    match = Router(routes).match(b"h.test", path)
    candidates = [prefix for prefix in prefixes if _prefixMatches(prefix, path)]
    if not candidates:
        assert match is None
        return
    assert match is not None
    longest = max(candidates, key=len)
    assert match.prefix == longest.encode()
    assert match.route.name == f"r{prefixes.index(longest)}"


@settings(max_examples=200)
@given(st.lists(_PREFIXES, min_size=1, max_size=6, unique=True), _PATHS)
def test_longestPrefixAcrossRoutesOfOneHostSet(prefixes: list[str], path: bytes) -> None:
    """
    Prefixes spread over several routes of one wildcard host set behave as
    one table.
    """
    routes = [route(f"r{i}", ("*.h.test", "x.other"), (prefix,)) for i, prefix in enumerate(prefixes)]
    router = Router(routes)
    match = router.match(b"a.h.test", path)
    other = router.match(b"x.other", path)
    assert (match is None) == (other is None)
    if match is not None:
        assert match == other
        assert all(len(p) <= len(match.prefix) for p in prefixes if _prefixMatches(p, path))
