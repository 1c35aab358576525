# -*- test-case-name: tests.test_compat -*-
"""
The fence around what edgeproxy takes from the private surface of Twisted,
pyOpenSSL and the OpenSSL bindings pyOpenSSL wraps, and the switch that
decides once per process whether its fast paths are used.

Every private name of Twisted that edgeproxy uses is used under
L{edgeproxy._compat.twisted}, every one of pyOpenSSL and its bindings in
L{edgeproxy._compat.pyopenssl}, every one of the C{h2} library in
L{edgeproxy._compat.h2}, behind functions and classes with
public-looking signatures; nothing else in edgeproxy imports or reads one
(C{tests/test_compat_fence.py} walks the source to keep it so).

What they hold is of two kinds:

  - I{Fast paths}: faster ways of doing what Twisted's public API already
    does (the TLS transport's record path, bytes sent straight to the
    socket, the lean accepted TCP connection, the reactor's event
    dispatch).  With C{[edgeproxy] fast_paths = auto} they are used only
    with the releases of Twisted and pyOpenSSL they were tested with
    (L{TESTED_TWISTED}, L{TESTED_PYOPENSSL}); with any other release, or
    with C{fast_paths = off}, the public path is taken instead, which is
    slower but complete: an unknown release costs speed, never
    correctness.  L{decideFastPaths} makes the decision, the service of
    the process applies it at start (L{useFastPaths}), and whoever builds
    listeners and transports reads it (L{fastPaths}) when it builds them,
    never per request.
  - I{The h2 library's}: L{edgeproxy._compat.h2} opens the streams of
    requests without the library's frame parsing.  Like
    L{edgeproxy.http.h2.sending}, it is checked against the release of
    C{h2} it mirrors by itself (its C{TESTED}), whatever C{fast_paths}
    says, and with another release the library's public path is taken.
  - I{Necessities}: what no public API offers (the key exchange groups of
    an OpenSSL context, the sockets systemd passed to the process, the
    exit signal twistd re-raises, an interface Twisted does not
    re-export).  These are used with any release, and each one falls back
    to a documented behaviour when the name it needs is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import OpenSSL
import twisted

__all__ = [
    "TESTED_PYOPENSSL",
    "TESTED_TWISTED",
    "FastPaths",
    "decideFastPaths",
    "fastPaths",
    "useFastPaths",
]

TESTED_TWISTED: tuple[str, ...] = ("26.10.0",)
"""The Twisted releases the fast paths were tested with."""

TESTED_PYOPENSSL: tuple[str, ...] = ("26.4.0",)
"""The pyOpenSSL releases the TLS fast paths were tested with."""

SETTINGS = ("auto", "off")
"""The values of C{[edgeproxy] fast_paths}."""


@dataclass(frozen=True, slots=True)
class FastPaths:
    """Which fast paths a process uses, and why."""

    tcp: bool
    """Accepted TCP connections as L{edgeproxy._compat.twisted.tcp.LeanServer},
    bytes sent straight to the socket when nothing is queued, and the epoll
    reactor's events dispatched without the legacy log context (Twisted's
    private surface alone)."""
    tls: bool
    """TLS listeners' connections as
    L{edgeproxy._compat.twisted.tls.EdgeTLSTransport}, with the memory BIOs
    of their OpenSSL connections released when drained (Twisted's and
    pyOpenSSL's); never without L{tcp}."""
    why: str
    """The reason, for the log line."""

    @property
    def summary(self) -> str:
        """C{"on for TCP and TLS"}, C{"on for TCP only"} or C{"off"}."""
        if self.tls:
            return "on for TCP and TLS"
        if self.tcp:
            return "on for TCP only, TLS takes Twisted's public path"
        return "off, Twisted's public paths throughout"

    @classmethod
    def on(cls, why: str = "forced") -> FastPaths:
        """Every fast path (for tests and benchmarks)."""
        return cls(True, True, why)

    @classmethod
    def off(cls, why: str = "[edgeproxy] fast_paths = off") -> FastPaths:
        """No fast path."""
        return cls(False, False, why)


def decideFastPaths(
    setting: str = "auto",
    twistedVersion: str = twisted.__version__,
    pyOpenSSLVersion: str = OpenSSL.__version__,
) -> FastPaths:
    """
    The fast paths a process with C{[edgeproxy] fast_paths = setting} uses
    with these releases of Twisted and pyOpenSSL.

        >>> decideFastPaths("auto", "26.10.0", "26.4.0").summary
        'on for TCP and TLS'
        >>> decideFastPaths("auto", "26.10.0", "27.0.0").summary
        "on for TCP only, TLS takes Twisted's public path"
        >>> decideFastPaths("auto", "27.1.0", "26.4.0").tls
        False

    @param setting: C{"auto"} or C{"off"}.
    @raise ValueError: another setting (the configuration checks it first).
    """
    if setting == "off":
        return FastPaths.off()
    if setting != "auto":
        raise ValueError(f"fast_paths must be one of {', '.join(SETTINGS)}, not {setting!r}")
    knownTwisted = twistedVersion in TESTED_TWISTED
    knownPyOpenSSL = pyOpenSSLVersion in TESTED_PYOPENSSL
    if knownTwisted and knownPyOpenSSL:
        why = f"Twisted {twistedVersion} and pyOpenSSL {pyOpenSSLVersion} are tested releases"
    else:
        untested = []
        if not knownTwisted:
            untested.append(f"Twisted {twistedVersion} is not a tested release ({', '.join(TESTED_TWISTED)})")
        if not knownPyOpenSSL:
            untested.append(
                f"pyOpenSSL {pyOpenSSLVersion} is not a tested release ({', '.join(TESTED_PYOPENSSL)})"
            )
        why = "; ".join(untested)
    return FastPaths(tcp=knownTwisted, tls=knownTwisted and knownPyOpenSSL, why=why)


_current = decideFastPaths()


def fastPaths() -> FastPaths:
    """
    The fast paths of this process: what L{useFastPaths} set, else what
    C{fast_paths = auto} decides for the installed releases.
    """
    return _current


def useFastPaths(decision: FastPaths) -> FastPaths:
    """
    Make C{decision} the process's, for everything built from now on
    (listeners, connections); what was built before keeps its paths.
    Called by the service of the process at start, before it listens.

    @return: the previous decision (for a test to put back).
    """
    global _current
    previous, _current = _current, decision
    return previous
