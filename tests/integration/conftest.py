"""
Fixtures shared by the integration tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.proc import NotifyReceiver


@pytest.fixture
def notify() -> Iterator[NotifyReceiver]:
    """A NOTIFY_SOCKET to hand to twistd, closed after the test."""
    receiver = NotifyReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
