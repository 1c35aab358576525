"""
Running tests both ways: with the fast paths through Twisted's and
pyOpenSSL's private surface and without them (L{edgeproxy._compat}).

    from tests.fastpaths import fastPaths, SHOW_DEPRECATIONS

    pytestmark = SHOW_DEPRECATIONS

    def test_something(fastPaths: bool) -> None:
        ...  # runs twice: fastPaths True ("fast"), then False ("public")

The process's decision is put back after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeproxy._compat import FastPaths, useFastPaths

__all__ = ["SHOW_DEPRECATIONS", "fastPaths", "using"]

SHOW_DEPRECATIONS = [
    # setup.cfg ignores Twisted's DeprecationWarnings for the whole suite;
    # the tests of what relies on private names show them again, and fail
    # on one raised by a call from edgeproxy's own code.
    pytest.mark.filterwarnings("default::DeprecationWarning"),
    pytest.mark.filterwarnings("error::DeprecationWarning:edgeproxy"),
]
"""Marks for the C{pytestmark} of those tests."""


class using:
    """Context manager: C{decision} is the process's fast paths meanwhile."""

    def __init__(self, decision: FastPaths | bool) -> None:
        if isinstance(decision, bool):
            decision = FastPaths.on() if decision else FastPaths.off()
        self._decision = decision
        self._previous: FastPaths | None = None

    def __enter__(self) -> FastPaths:
        self._previous = useFastPaths(self._decision)
        return self._decision

    def __exit__(self, *exc: object) -> None:
        assert self._previous is not None
        useFastPaths(self._previous)


@pytest.fixture(params=[True, False], ids=["fast", "public"])
def fastPaths(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The test runs with every fast path on, then with none."""
    with using(bool(request.param)):
        yield bool(request.param)


@pytest.fixture
def fastPathsOn() -> Iterator[None]:
    """The test runs with every fast path on (what it checks exists only there)."""
    with using(True):
        yield
