# -*- test-case-name: tests.test_signals -*-
"""
The process signals of the service that runs the process (the
single-process L{edgeproxy.serve.service.EdgeService} or the
L{edgeproxy.serve.supervisor.Supervisor} of workers), handled one way for
both: L{ProcessSignals}.

  - C{SIGHUP} reloads.  Its default action ends the process, so it is
    installed before C{READY=1}: a service manager may send it as soon as
    it sees that.
  - The first C{SIGTERM} (or C{SIGINT}, where the reactor took it) stops
    the reactor, which stops the service: it drains.  The reactor's own
    handler would record the signal, and twistd, once the reactor stopped,
    kills itself with it (C{twisted.application.app._exitWithSignal}), so a
    complete drain would end with status 143.  This handler records
    nothing, and L{ProcessSignals.exitCleanly} forgets a signal the
    reactor's handler recorded before this one took over: a drain that went
    as planned exits 0.
  - A second one forces the stop (L{ProcessSignals.forced}: what is still
    in flight is aborted now rather than at the deadline).  After it, the
    signals either get their default action back, so a third ends the
    process at once, or (a supervisor) every further one forces again.

A signal handler may run between any two bytecodes of the reactor thread:
each hands its work to the loop through C{callFromThread}.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from edgeproxy._compat.twisted.reactor import forgetExitSignal

__all__ = ["ProcessSignals"]


class ProcessSignals:
    """
    C{SIGHUP}, C{SIGTERM} and C{SIGINT} for the service of the process.

    Nothing is installed until the owner asks (L{installHangup},
    L{installTermination}): a service built in a test, or inside another
    process's signal set-up, installs nothing, and L{force} still works.

    @ivar terminations: how many C{SIGTERM}/C{SIGINT} arrived.
    @ivar forced: whether a forced stop was asked for (L{force}).
    """

    def __init__(
        self,
        reactor: Any,
        log: Logger,
        *,
        reload: Callable[[], object],
        stopping: Callable[[], bool],
        draining: str,
        forcing: str,
        onForce: Callable[[], None] = lambda: None,
        keepCatching: bool = False,
    ) -> None:
        """
        @param reactor: provides C{IReactorCore} and C{IReactorFromThreads}.
        @param log: where the lines go, in the owner's namespace.
        @param reload: what C{SIGHUP} runs, on the reactor thread.
        @param stopping: whether the owner's stop has begun (a signal taken
            over then would count the next one as the first).
        @param draining: what the first signal starts, for its log line
            (C{"Received SIGTERM, draining"}).
        @param forcing: what a forced stop does, for its log line
            (C{"Received SIGTERM again: aborting what is still in flight"}).
        @param onForce: called by every L{force}, after L{forced} is set.
        @param keepCatching: C{True}: every signal after the first forces
            again (a supervisor passes each on to its workers); C{False}:
            the second one gives C{SIGTERM} and C{SIGINT} back to their
            default action, and only the first L{force} counts.
        """
        self._reactor = reactor
        self._log = log
        self._reload = reload
        self._stopping = stopping
        self._draining = draining
        self._forcing = forcing
        self._onForce = onForce
        self._keepCatching = keepCatching
        self._previousHangup: Any = None
        self._hangupInstalled = False
        self._terminationScheduled = False
        self.terminations = 0
        self.forced = False

    # SIGHUP ------------------------------------------------------------------

    def installHangup(self) -> None:
        """Make C{SIGHUP} reload (once; again after L{restoreHangup})."""
        if not self._hangupInstalled:
            self._previousHangup = signal.signal(signal.SIGHUP, self.onHangup)
            self._hangupInstalled = True

    def restoreHangup(self) -> None:
        """Give C{SIGHUP} back the handler it had before L{installHangup}."""
        if self._hangupInstalled:
            # None: the previous handler was not set from Python; the
            # default is the closest we can restore.
            previous = self._previousHangup
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            self._hangupInstalled = False

    def onHangup(self, signum: int, frame: FrameType | None) -> None:
        # Until the reactor runs, callFromThread just queues the reload.
        self._reactor.callFromThread(self._reload)

    # SIGTERM and SIGINT --------------------------------------------------------

    def installTermination(self) -> None:
        """
        Take C{SIGTERM} (and C{SIGINT}) over once the reactor runs: it
        installs its own handlers while it starts (the "during startup"
        phase), after the service started.
        """
        if not self._terminationScheduled:
            self._terminationScheduled = True
            self._reactor.callWhenRunning(self.takeOverTermination)

    def takeOverTermination(self) -> None:
        """Handle C{SIGTERM}, and C{SIGINT} where the reactor took it, here."""
        if self._stopping():
            return
        signal.signal(signal.SIGTERM, self.onTerminate)
        sigInt = getattr(self._reactor, "sigInt", None)
        if sigInt is not None and signal.getsignal(signal.SIGINT) == sigInt:
            # Only where the reactor took SIGINT (not under a debugger).
            signal.signal(signal.SIGINT, self.onTerminate)

    def onTerminate(self, signum: int, frame: FrameType | None) -> None:
        self.terminations += 1
        if self.terminations == 1:
            self._reactor.callFromThread(self.terminate, signum)
            return
        if not self._keepCatching:
            # The next one gets the default action: the kernel ends us.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        self._reactor.callFromThread(self.force, signum)

    def terminate(self, signum: int) -> None:
        """The first signal: stop the reactor, which stops the service."""
        self._log.info(
            "Received {signal}, {draining}", signal=signal.Signals(signum).name, draining=self._draining
        )
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def force(self, signum: int) -> None:
        """A further signal: what is still in flight is aborted now."""
        if self.forced and not self._keepCatching:
            return
        self.forced = True
        self._log.warn(
            "Received {signal} again: {forcing}", signal=signal.Signals(signum).name, forcing=self._forcing
        )
        self._onForce()

    # The exit status -------------------------------------------------------------

    def exitCleanly(self) -> None:
        """
        The drain went as planned: the process exits 0, even if the
        reactor's own handler recorded the signal that stopped it (one that
        arrived before L{takeOverTermination}, or a C{SIGINT} left to the
        reactor).
        """
        forgetExitSignal(self._reactor)
