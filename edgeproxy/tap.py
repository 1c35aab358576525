# -*- test-case-name: tests.test_service -*-
"""
The twistd plugin's options and service maker: C{twistd --nodaemon
--pidfile= edgeproxy --config edge.ini}.

With C{[edgeproxy] workers = 1} the service is the proxy itself
(L{edgeproxy.serve.service.EdgeService}); with more, it is the
L{edgeproxy.serve.supervisor.Supervisor} of that many worker processes.  Either
way the configuration is checked here first, so a bad file stops before any
worker starts.

The whole configuration is validated while the options are parsed:
L{Options.postOptions} runs C{edgeproxy check} (the INI file, the served
certificates, every upstream's TLS files; all problems reported at once, in
the same words), then builds the very L{EdgeService} that will run (which
loads the same files again, a moment later).  A bad file therefore stops
twistd before it daemonizes, writes a pid file or opens a port.

What twistd does with the L{usage.UsageError} raised for a bad file: it
prints its usage text and C{twistd edgeproxy: <message>} to standard output
and exits with status 1.  Standard output is easy to miss next to that usage
text, so the message is also written to standard error first.

With the worker process's C{main} (L{edgeproxy.worker}), this is where
the global reactor is chosen and run; the rest is handed a reactor.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from edgeproxy import logs
from edgeproxy.errors import ConfigError


class Options(usage.Options):
    """Command line of C{twistd edgeproxy}."""

    synopsis = "[--config edge.ini]"
    longdesc = (
        "Run the edgeproxy TLS-terminating reverse proxy described by an "
        "edge.ini file.  SIGHUP reloads the configuration; SIGTERM drains "
        "in-flight requests (up to [edgeproxy] shutdown_timeout) and stops."
    )
    optParameters = [
        ["config", "c", "edge.ini", "Path of the configuration file."],
    ]

    service: Any = None

    def postOptions(self) -> None:
        """Check the configuration and build the service that will run it."""
        from twisted.internet import reactor

        from edgeproxy.cli import EXIT_OK, check
        from edgeproxy.config import load
        from edgeproxy.serve.service import EdgeService

        path = self["config"]
        self._useProcessLog()
        problems = io.StringIO()
        if check(path, out=io.StringIO(), err=problems) != EXIT_OK:
            self._fail(problems.getvalue().strip())
        try:
            config = load(path)
            logs.policy.configure(config.proxy.log_level, config.proxy.log_format)
            if config.proxy.workers > 1:
                from edgeproxy.serve.supervisor import Supervisor

                # The workers build (and so check) the proxy themselves; the
                # supervisor builds what it runs: health checks and admin.
                self.service = Supervisor(config, reactor)
            else:
                self.service = EdgeService(config, reactor)
        except ConfigError as e:
            self._fail(str(e))
        except OSError as e:
            # The access log file (or anything else opened while building)
            # could not be opened: the file named by the OS error.
            self._fail(f"{path}: {e.filename or ''}: {e.strerror or e}")

    def _useProcessLog(self) -> None:
        """
        In the foreground, log through L{edgeproxy.logs} (the level and
        format of the configuration, priorities for the journal) by setting
        twistd's C{--logger}, unless the command line chose where logs go
        (C{--logger}, C{--logfile}, C{--syslog}).  A daemon keeps twistd's
        own log file.
        """
        parent = getattr(self, "parent", None)
        if parent is None or not parent.get("nodaemon"):
            return
        if parent.get("logger") or parent.get("syslog") or parent.get("logfile") not in (None, "", "-"):
            return
        # A string: twistd's own postOptions (which runs after ours) turns
        # it into the factory with namedAny.
        parent["logger"] = "edgeproxy.logs.makeObserver"

    def _fail(self, message: str) -> None:
        sys.stderr.write(f"edgeproxy: configuration not valid:\n{message}\n")
        sys.stderr.flush()
        raise usage.UsageError(message)


def makeService(options: Options) -> IService:
    """
    The L{EdgeService}, or the L{Supervisor} with C{workers > 1}, built
    (and validated) by L{Options.postOptions}.
    """
    if options.service is None:
        options.postOptions()
    return options.service
