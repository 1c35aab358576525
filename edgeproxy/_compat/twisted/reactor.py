# -*- test-case-name: tests.test_tuning,tests.test_signals -*-
"""
What edgeproxy does to the reactor through Twisted's private surface:

  - L{dispatchWithoutLogContext}, a fast path: the epoll reactor's loop
    without the legacy log context per I/O event (C{EPollReactor}'s
    C{_poller}, C{_selectables} and C{_doReadOrWrite}), whose small sends
    go out together after each batch of events
    (L{edgeproxy._compat.twisted.tcp.holdSends});
  - L{forgetExitSignal}, a necessity: the signal the reactor's own handler
    recorded (C{ReactorBase._exitSignal}), which twistd re-raises on itself
    once the reactor stopped (C{twisted.application.app._exitWithSignal}).

C{tests/test_tuning.py} runs a real epoll reactor through the first,
C{tests/test_signals.py} a real reactor's handler for the second.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

from edgeproxy._compat.twisted.tcp import beforeEvent, holdSends, sendHeld

__all__ = ["dispatchWithoutLogContext", "forgetExitSignal"]

log = Logger(namespace="edgeproxy.tuning")


def dispatchWithoutLogContext(reactor: Any) -> bool:
    """
    Make the epoll reactor call each ready connection directly instead of
    through C{twisted.python.log.callWithLogger}: C{EPollReactor.doPoll}'s
    loop without the wrapper replaces C{doIteration} on this instance.  As
    in C{callWithLogger}, an exception escaping a connection's handler is
    logged and the loop goes on to the next event.  The small sends made
    while a batch of events is dispatched are held and sent after it
    (L{holdSends}, L{sendHeld}), in the order they were written, or before
    an event of their own connection or once held too long
    (L{beforeEvent}).  Any reactor but C{EPollReactor} itself is left
    alone.

    @return: whether the reactor was changed.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        try:
            events = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        holdSends()
        try:
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                beforeEvent(selectable)
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.failure("unhandled error dispatching an I/O event")
        finally:
            sendHeld()

    # On this instance, on purpose.
    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


def forgetExitSignal(reactor: Any) -> None:
    """
    Forget the signal C{reactor}'s own handler recorded, so that twistd
    does not kill itself with it once the reactor stopped; nothing when it
    recorded none, or when this release of Twisted keeps it elsewhere
    (twistd then exits with the signal's status).
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
