# -*- test-case-name: tests.test_service -*-
"""
The twistd plugin's options and service maker: C{twistd edgeproxy --config
edge.ini}.

The whole configuration is validated while the options are parsed, the way
C{edgeproxy check} validates it (the INI file, the certificates, the upstream
TLS settings): L{Options.postOptions} builds the very L{EdgeService} that
will run, so nothing is validated twice or differently, and a bad file stops
twistd before it daemonizes, writes a pid file or opens a port.

What twistd does with the L{usage.UsageError} raised for a bad file: it
prints its usage text and C{twistd edgeproxy: <message>} to standard output
and exits with status 1.  Standard output is easy to miss next to that usage
text, so the message is also written to standard error first.

This is the only module (with C{edgeproxy.cli}) that touches the global
reactor.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from edgeproxy.errors import ConfigError


class Options(usage.Options):
    """Command line of C{twistd edgeproxy}."""

    synopsis = "[--config edge.ini]"
    longdesc = (
        "Run the edgeproxy TLS-terminating reverse proxy described by an "
        "edge.ini file.  SIGHUP reloads the certificates; SIGTERM drains "
        "in-flight requests (up to [edgeproxy] shutdown_timeout) and stops."
    )
    optParameters = [
        ["config", "c", "edge.ini", "Path of the configuration file."],
    ]

    service: Any = None

    def postOptions(self) -> None:
        from twisted.internet import reactor

        from edgeproxy.config import load
        from edgeproxy.service import EdgeService

        path = self["config"]
        try:
            config = load(path)
            self.service = EdgeService(config, reactor)
        except ConfigError as e:
            self._fail(str(e))
        except OSError as e:
            # The access log file (or anything else opened while building)
            # could not be opened: the file named by the OS error.
            self._fail(f"{path}: {e.filename or ''}: {e.strerror or e}")

    def _fail(self, message: str) -> None:
        sys.stderr.write(f"edgeproxy: configuration error: {message}\n")
        sys.stderr.flush()
        raise usage.UsageError(message)


def makeService(options: Options) -> IService:
    """The L{EdgeService} built (and validated) by L{Options.postOptions}."""
    if options.service is None:
        options.postOptions()
    return options.service
