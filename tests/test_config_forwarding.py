"""
A route's own timeouts and retries in C{edge.ini}
(L{edgeproxy.config.forwarding}): their values, and the error a bad one gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config.model import Config
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.config.parse import load
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
"""


def loadWith(tmp_path: Path, route: str = "") -> Config:
    path = tmp_path / "edge.ini"
    path.write_text(BASE.format(route=route))
    return load(str(path))


def test_noneByDefault(tmp_path: Path) -> None:
    assert loadWith(tmp_path).routes[0].forwarding is None


def test_everyKey(tmp_path: Path) -> None:
    route = loadWith(
        tmp_path,
        "connect_timeout = 2s\nresponse_timeout = 1m\nretries = 0\nrequest_timeout = 90s",
    ).routes[0]
    assert route.forwarding == RouteForwarding(
        connect_timeout=2.0, response_timeout=60.0, retries=0, request_timeout=90.0
    )


def test_oneKeyLeavesTheOthersToTheUpstream(tmp_path: Path) -> None:
    route = loadWith(tmp_path, "response_timeout = 5s").routes[0]
    assert route.forwarding == RouteForwarding(response_timeout=5.0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("response_timeout = soon", "[route:r] response_timeout: "),
        ("request_timeout = 0s", "[route:r] request_timeout: expected a duration greater than zero"),
        ("retries = 11", "[route:r] retries: expected a whole number of at least 0 and at most 10"),
        ("connect_timeout =", "[route:r] connect_timeout: expected a value"),
    ],
)
def test_badValuesNameTheKey(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        loadWith(tmp_path, line)
    assert message in str(raised.value)
    assert "edge.ini:10:" in str(raised.value)
