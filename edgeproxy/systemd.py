# -*- test-case-name: tests.test_systemd -*-
"""
The service manager notification protocol (C{sd_notify}), written here
because Twisted has none and libsystemd is not a dependency worth having for
one datagram.

The protocol (see C{sd_notify(3)}): newline-separated C{KEY=VALUE} fields in
one C{AF_UNIX}/C{SOCK_DGRAM} datagram sent to the path in C{$NOTIFY_SOCKET}; a
leading C{@} in that path names a socket in the Linux abstract namespace (the
C{@} stands for a NUL byte).  Without C{$NOTIFY_SOCKET} the process was not
started by a manager that listens, and every call here does nothing.

A notification is a courtesy to the manager, never a reason to fail: no
method here raises, and a failure to send is logged once (not once per
reload) so that a misconfigured unit does not flood the journal.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from edgeproxy._compat.twisted import systemdPassedSockets

log = Logger()


def _monotonicMicroseconds() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """
    Sends notifications to the service manager named by C{NOTIFY_SOCKET}.

    @ivar address: The socket address datagrams go to (C{str} path or
        C{bytes} abstract name), or L{None} when notifications are off.
    """

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        monotonic: Callable[[], int] = _monotonicMicroseconds,
    ) -> None:
        """
        @param environ: Where C{NOTIFY_SOCKET} is read from (once, now).
        @param monotonic: Returns C{CLOCK_MONOTONIC} in microseconds; the
            manager compares C{MONOTONIC_USEC} of a reload with its own clock
            (C{Type=notify-reload}), so it must be that clock.
        """
        self._monotonic = monotonic
        self._warned = False
        self.address: str | bytes | None = None
        raw = environ.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):
            # Abstract namespace: the name is the bytes after a NUL.
            self.address = b"\0" + raw[1:].encode("utf-8", "surrogateescape")
        elif raw:
            self.address = raw

    @property
    def enabled(self) -> bool:
        """Whether a manager listens for notifications."""
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """
        Send one datagram with C{fields} in order, C{KEY=value} per line.

        @return: C{True} when the datagram was sent, C{False} when
            notifications are off or sending failed (logged once).
        """
        if self.address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload.encode("utf-8"), self.address)
        except Exception as e:
            if not self._warned:
                self._warned = True
                log.warn(
                    "Cannot notify the service manager at {address!r}: {error}"
                    " (further failures are not logged)",
                    address=self.address,
                    error=e,
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager that start-up, or a reload, is complete."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """
        Tell the manager that a reload started.  C{MONOTONIC_USEC} is required
        with C{RELOADING=1} by C{Type=notify-reload} (systemd 253+).
        """
        return self.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic())

    def stopping(self) -> bool:
        """Tell the manager that shutdown started."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Set the one-line status C{systemctl status} shows."""
        # A newline would start a new field: keep the status on one line.
        return self.notify(STATUS=" ".join(text.splitlines()))


class SocketNotPassed(Exception):
    """
    A C{systemd:} endpoint names a socket systemd did not pass to this
    process; the message says which were passed and what to change.
    """


def passedSockets() -> Any:
    """
    The sockets systemd passed to this process, as Twisted's C{systemd:}
    endpoints see them (a L{twisted.python.systemd.ListenFDs}), or L{None}
    when this release of Twisted does not say: only its parser still knows
    (L{edgeproxy._compat.twisted.systemdPassedSockets});
    C{tests/test_systemd.py} fails if Twisted changes it.
    """
    return systemdPassedSockets()


def notPassedMessage(endpoint: str, passed: Any = None) -> str:
    """
    What to tell an operator whose C{systemd:} endpoint found no socket:
    Twisted says only C{KeyError: 'https'}.

    @param endpoint: the endpoint description (C{systemd:domain=...:name=...}).
    @param passed: the L{twisted.python.systemd.ListenFDs} that were passed
        (L{passedSockets} when L{None}).
    """
    if passed is None:
        passed = passedSockets()
    parameters = dict(
        part.partition("=")[::2] for part in endpoint.split(":")[1:] if "=" in part
    )
    restart = "restart the service (a running process cannot receive new sockets)"
    if passed is None:
        return (
            f"systemd passed no socket for {endpoint!r}: check the socket units (the "
            f"service's Sockets=, FileDescriptorName=) and {restart}"
        )
    count = len(passed.inheritedDescriptors())
    names = list(passed.inheritedNamedDescriptors())
    if not count:
        return (
            "systemd passed no sockets to this process: start it through its socket "
            f"units (the service's Sockets=) and {restart}, or use a tcp: endpoint"
        )
    if "index" in parameters:
        return (
            f"systemd passed {count} socket(s), there is no index {parameters['index']}; "
            f"name sockets instead (FileDescriptorName=, name=) and {restart}"
        )
    name = parameters.get("name", "")
    shown = ", ".join(names) or f"{count} without names"
    return (
        f"systemd passed no socket named {name!r} (it passed: {shown}); give a socket unit "
        f"FileDescriptorName={name}, name that unit in the service's Sockets= and {restart}"
    )


def adoptable(endpoint: str, parse: Callable[[], object]) -> object:
    """
    C{parse()} (building the endpoint from C{endpoint}), with Twisted's
    bare C{KeyError}/C{IndexError} for a socket that was not passed turned
    into L{SocketNotPassed} with L{notPassedMessage}.
    """
    try:
        return parse()
    except (KeyError, IndexError):
        if not endpoint.lower().startswith("systemd:"):
            raise
        raise SocketNotPassed(notPassedMessage(endpoint)) from None
