# -*- test-case-name: tests.test_cli -*-
"""
The C{edgeproxy} console command.

C{edgeproxy check --config edge.ini} reads the configuration (and the files
it includes, with C{${VAR}} substituted) and every file it names exactly as
C{twistd edgeproxy} would at start (certificates served to clients, CA
bundles and client certificates for backends), without binding a port or
starting the reactor, and prints what the proxy would do: the files read and
the values taken from the environment, listeners, certificates with their
expiry (and which one serves a name on several), routes and upstreams.  It
exits 0 when the configuration is valid and 2 when it is not, with every
problem it found on standard error, one per line as C{file:line: [section]
key: message}, so it fits in a deployment script, an C{ExecStartPre=} line
before a restart, or C{ExecReload=} before the reload signal.  When standard
error is the journal (C{$JOURNAL_STREAM}, as under those lines), the
problems are led by a line saying the configuration is refused, and each
line has the error priority C{<3>} (C{sd-daemon(3)}), so that a refused
C{systemctl reload} or start shows in C{journalctl -p warning}.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from edgeproxy import __version__
from edgeproxy.config import load
from edgeproxy.config.model import Config, Listener, Upstream
from edgeproxy.config.syntax import checkEndpoint
from edgeproxy.config.units import formatDuration, formatSize
from edgeproxy.errors import ConfigError, ConfigErrors
from edgeproxy.logs import isJournal
from edgeproxy.routing import Router
from edgeproxy.tls.certs import CertificateSet
from edgeproxy.tls.client import loadUpstreamTLS
from edgeproxy.tls.layout import loadCertificates

__all__ = ["main", "check", "EXIT_OK", "EXIT_INVALID"]

EXIT_OK = 0
"""The configuration is valid."""
EXIT_INVALID = 2
"""The configuration (or a file it names) is not valid; also usage errors."""


def _buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeproxy",
        description="edgeproxy, a TLS-terminating edge reverse proxy. "
        "Run the proxy in the foreground with: "
        "twistd --nodaemon --pidfile= edgeproxy --config edge.ini",
    )
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkParser = commands.add_parser(
        "check",
        help="validate a configuration and the files it names, and summarise it",
        description="Validate a configuration and every certificate it names, "
        "without listening. Exit status: 0 valid, 2 not valid.",
    )
    checkParser.add_argument(
        "-c", "--config", default="edge.ini", help="the configuration file (default: %(default)s)"
    )
    checkParser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print problems only, no summary (for ExecStartPre= and ExecReload=)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line.

    @param argv: the arguments after the program name; C{sys.argv[1:]} when
        L{None}.
    @return: the exit status (console scripts pass it to C{sys.exit}).
    """
    parser = _buildParser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits by itself for --help, --version and usage errors;
        # return the status instead so main() can be called in process.
        return e.code if isinstance(e.code, int) else EXIT_INVALID
    if arguments.command == "check":
        return check(arguments.config, out=io.StringIO() if arguments.quiet else None)
    parser.error(f"unknown command {arguments.command!r}")  # pragma: no cover
    return EXIT_INVALID  # pragma: no cover


def check(
    path: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Validate C{path} and everything it names; print a summary to C{out} and
    problems to C{err}.

    @param now: POSIX time certificates are checked against (the current
        time when L{None}).
    @param environ: where C{${NAME}} comes from (the process environment
        when L{None}).
    @return: L{EXIT_OK} or L{EXIT_INVALID}.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    now = time.time() if now is None else now
    try:
        config = load(path, environ)
    except ConfigError as e:
        _refused(err, path, e, os.environ if environ is None else environ)
        return EXIT_INVALID

    problems: list[ConfigError] = []
    try:
        # The router is built from the routes at start; anything it refuses
        # would stop twistd, so check refuses it too.
        Router(config.routes)
    except ConfigError as e:
        problems.append(e)
    certificates: CertificateSet | None = None
    if config.tls is not None:
        try:
            certificates = loadCertificates(config.tls, now)
        except ConfigError as e:
            problems.append(e)
        except OSError as e:  # the TLS module should not let these out; never crash
            problems.append(ConfigError(str(e.strerror or e), e.filename, "tls", "certificates"))
    for upstream in config.upstreams.values():
        try:
            loadUpstreamTLS(upstream)
        except ConfigError as e:
            problems.append(e)
        except OSError as e:
            problems.append(ConfigError(str(e.strerror or e), e.filename, f"upstream:{upstream.name}"))
    if problems:
        refusal = ConfigErrors([placed(config, error) for error in problems])
        _refused(err, path, refusal, os.environ if environ is None else environ)
        return EXIT_INVALID

    _Summary(config, certificates, now, out).write()
    return EXIT_OK


def _refused(err: TextIO, path: str, error: ConfigError, environ: Mapping[str, str]) -> None:
    """
    Write the problems of C{error} to C{err}, one per line; to the journal
    led by a line saying C{path} is refused, each line with the error
    priority (see the module docstring).
    """
    text = str(error)
    if not isJournal(err, environ):
        err.write(f"{text}\n")
        return
    count = len(error.errors) if isinstance(error, ConfigErrors) else 1
    lines = [f"edgeproxy check: configuration refused: {path} ({count} problem{'s' if count > 1 else ''})"]
    lines += text.split("\n")
    err.write("".join(f"<3>{line}\n" for line in lines))


def placed(config: Config, error: ConfigError) -> ConfigError:
    """
    C{error} (or each of a L{ConfigErrors}) pointing at the configuration
    line of its section and key, the file it is about (a certificate, a key)
    moved into the message: C{edge.ini:31: [tls] certificates:
    /etc/letsencrypt/live/a/privkey.pem: ...}.
    """
    if isinstance(error, ConfigErrors):
        return ConfigErrors([placed(config, one) for one in error.errors])
    if config.source is None or error.section is None:
        return error
    file, line = config.source.where(error.section, error.key)
    # The configuration's files, however their paths are spelled.
    inConfiguration = error.file is not None and os.path.abspath(error.file) in config.source.files
    if file is None or (inConfiguration and error.line is not None):
        return error
    message = error.message
    if error.file is not None and not inConfiguration and error.file not in message:
        message = f"{error.file}: {message}"
    return type(error)(message, file, error.section, error.key, line)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, the last one unpadded."""
    if not rows:
        return [f"{indent}(none)"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


class _Summary:
    """What C{edgeproxy check} prints for a valid configuration."""

    def __init__(
        self, config: Config, certificates: CertificateSet | None, now: float, out: TextIO
    ) -> None:
        self.config = config
        self.certificates = certificates
        self.now = now
        self.out = out
        self.base = os.path.dirname(config.path)

    def show(self, path: str) -> str:
        """A path relative to the configuration's directory when inside it."""
        relative = os.path.relpath(path, self.base)
        return path if relative.startswith("..") else relative

    def write(self) -> None:
        lines = [f"{self.config.path}: configuration is valid", ""]
        lines += self.sourceLines()
        lines += self.process() + [""]
        lines += self.listeners() + [""]
        lines += self.certificateLines() + [""]
        acme = self.acmeLines()
        if acme:
            lines += acme + [""]
        lines += self.routes() + [""]
        cache = self.cacheLines()
        if cache:
            lines += cache + [""]
        lines += self.upstreams()
        warnings = self.warnings()
        if warnings:
            lines += ["", "Warnings:"] + [f"  {warning}" for warning in warnings]
        self.out.write("\n".join(lines) + "\n")

    def sourceLines(self) -> list[str]:
        """The included files and the values taken from the environment."""
        source = self.config.source
        if source is None:
            return []
        lines: list[str] = []
        if len(source.files) > 1:
            lines += ["Files:"] + [f"  {self.show(name)}" for name in source.files] + [""]
        if source.substitutions:
            rows = [
                [
                    f"{self.show(one.file)}:{one.line}",
                    f"[{one.section}] {one.key}",
                    f"= {one.value}" + ("" if one.value == "(secret)" else f"  (from {one.written})"),
                ]
                for one in source.substitutions
            ]
            lines += ["From the environment:"] + _table(rows) + [""]
        return lines

    def process(self) -> list[str]:
        proxy = self.config.proxy
        workers = (
            "1 process" if proxy.workers == 1
            else f"{proxy.workers} workers under a supervisor"
        )
        if proxy.admin is None:
            admin = "no admin listener"
        else:
            actions = "actions need a bearer token" if proxy.admin_token else "actions off (no token)"
            admin = f"admin on {proxy.admin} (/status, /metrics; {actions})"
        return [f"Process: {workers}, {admin}, drain {formatDuration(proxy.shutdown_timeout)}"]

    def listeners(self) -> list[str]:
        rows = []
        for listener in self.config.listeners:
            rows.append([listener.name, listener.endpoint, self.describeListener(listener)])
        return ["Listeners:"] + _table(rows)

    def describeListener(self, listener: Listener) -> str:
        parts = []
        if listener.tls:
            parts.append("TLS, HTTP/2 and HTTP/1.1" if listener.http2 else "TLS, HTTP/1.1 only")
        else:
            parts.append("plain HTTP/1.1")
        if listener.redirect_https:
            if listener.redirect_port is not None:
                target = f"port {listener.redirect_port}"
            else:
                first = self.firstTLS()
                port = checkEndpoint(first.endpoint, self.base).port
                target = f"port {port} of [listen:{first.name}]"
            parts.append(f"redirects to https ({target})")
        limits = listener.limits
        if limits != self.config.proxy.limits:
            body = "no limit" if limits.max_body_size == 0 else formatSize(limits.max_body_size)
            parts.append(
                f"limits: header {formatDuration(limits.client_header_timeout)}/"
                f"{formatSize(limits.max_header_size)}/{limits.max_headers} fields, "
                f"idle {formatDuration(limits.client_idle_timeout)}, body {body}"
            )
        return ", ".join(parts)

    def firstTLS(self) -> Listener:
        return next(listener for listener in self.config.listeners if listener.tls)

    def certificateLines(self) -> list[str]:
        tls = self.config.tls
        if tls is None or self.certificates is None:
            return ["Certificates: none (no [tls] section)"]
        heading = (
            f"Certificates (TLS {tls.min_version.value} and up, warning "
            f"{formatDuration(tls.expiry_warning)} before expiry):"
        )
        rows = []
        for entry in self.certificates.entries:
            daysLeft = int(entry.secondsLeft(self.now) // 86400)
            expiry = entry.notAfter.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            rows.append(
                [
                    ", ".join(entry.names) or "(no names)",
                    f"expires {expiry} ({daysLeft} days left)",
                    self.show(entry.path) + ("  [default]" if entry.isDefault else ""),
                ]
            )
        return [heading] + _table(rows) + self.overlaps()

    def overlaps(self) -> list[str]:
        """
        Names on more than one certificate, and which one is served: the
        one that expires last (see L{edgeproxy.tls.layout}).
        """
        assert self.certificates is not None
        served = self.certificates.byName()
        rows = []
        for name, entry in served.items():
            others = [e for e in self.certificates.entries if name in e.names and e is not entry]
            if others:
                rows.append(
                    [
                        name,
                        f"served from {self.show(entry.path)} (expires last);",
                        "also on " + ", ".join(self.show(other.path) for other in others),
                    ]
                )
        if not rows:
            return []
        return ["  Names on several certificates (the one expiring last is served):"] + _table(
            rows, indent="    "
        )

    def acmeNames(self) -> tuple[str, ...]:
        from edgeproxy.acme.policy import wantedNames

        served = self.certificates.byName() if self.certificates is not None else {}
        return wantedNames(self.config, served)

    def acmeLines(self) -> list[str]:
        """What ACME would request, from which directory, stored where."""
        acme = self.config.acme
        if acme is None:
            return []
        names = self.acmeNames()
        how = "names = auto: route hosts no certificate file covers" if acme.names is None else "names listed"
        lines = [
            f"ACME: from {acme.directory}",
            f"  challenges {', '.join(c.value for c in acme.challenges)}, {acme.key_type.value} keys, "
            f"renew {formatDuration(acme.renew_before)} before expiry, storage {acme.storage}",
            f"  would request ({how}): " + (", ".join(names) if names else "(no name)"),
        ]
        if acme.on_demand:
            lines.append(
                f"  on demand: names seen in SNI, when {acme.ask} allows them "
                f"({acme.on_demand_burst} orders, then one every {formatDuration(acme.on_demand_interval)})"
            )
        return lines

    def routes(self) -> list[str]:
        rows = []
        for route in self.config.routes:
            extras = []
            if route.strip_prefix:
                extras.append("strip prefix")
            if not route.websocket and route.redirect is None:
                extras.append("no websocket")
            if route.max_body_size is not None:
                extras.append(
                    "body: no limit" if route.max_body_size == 0 else f"body {formatSize(route.max_body_size)}"
                )
            if route.cache is not None:
                extras.append("cached")
            if route.request_headers is not None or route.response_headers is not None:
                extras.append("header rules")
            target = f"-> {route.upstream}"
            if route.redirect is not None:
                target = f"{route.redirect.status} {route.redirect.location}"
            rows.append(
                [
                    route.name,
                    ", ".join(route.hosts),
                    " ".join(route.paths),
                    target + (f" ({', '.join(extras)})" if extras else ""),
                ]
            )
        return ["Routes:"] + _table(rows)

    def cacheLines(self) -> list[str]:
        """The cache's stores, when a route caches."""
        if not any(route.cache is not None for route in self.config.routes):
            return []
        from edgeproxy.config.stagemodel import CacheSettings

        cache = self.config.cache or CacheSettings()
        memory = "off" if not cache.memory else f"{formatSize(cache.memory)} per process"
        disk = "none" if cache.disk is None else f"{self.show(cache.disk)} ({formatSize(cache.disk_size)}, shared)"
        return [f"Cache: memory {memory}, disk {disk}, objects up to {formatSize(cache.max_object_size)}"]

    def upstreams(self) -> list[str]:
        rows = []
        for upstream in self.config.upstreams.values():
            servers = ", ".join(
                server.address
                + (f" weight={server.weight}" if server.weight != 1 else "")
                + (f" max_conns={server.max_conns}" if server.max_conns else "")
                + (" backup" if server.backup else "")
                + (" down" if server.down else "")
                for server in upstream.servers
            )
            rows.append([upstream.name, servers])
            rows.append(["", self.describeUpstream(upstream)])
            rows.append(["", self.describeResilience(upstream)])
        return ["Upstreams:"] + _table(rows)

    def describeResilience(self, upstream: Upstream) -> str:
        parts = [
            "balance " + upstream.balance
            + (f" on {upstream.hash_key}" if upstream.balance == "hash" else "")
        ]
        if upstream.health_path is not None:
            parts.append(
                f"checks GET {upstream.health_path} every {formatDuration(upstream.health_interval)}"
                f" (rise {upstream.rise}, fall {upstream.fall})"
            )
        else:
            parts.append("no active checks")
        if upstream.max_fails:
            parts.append(
                f"ejects after {upstream.max_fails} failures in {formatDuration(upstream.fail_window)}"
            )
        parts.append(
            f"{upstream.retries} retries" if upstream.retries else "no retries"
        )
        return ", ".join(parts)

    def describeUpstream(self, upstream: Upstream) -> str:
        if not upstream.tls:
            mode = "plain HTTP"
        elif upstream.insecure:
            mode = "TLS, NOT VERIFIED (insecure = yes)"
        else:
            name = upstream.server_name or "each server's host"
            anchors = self.show(upstream.ca) if upstream.ca else "the system trust store"
            mode = f"TLS, verifies {name} against {anchors}"
        if upstream.client_certificate:
            mode += f", client certificate {self.show(upstream.client_certificate)}"
        return mode

    def warnings(self) -> list[str]:
        warnings = []
        tls = self.config.tls
        if tls is not None and self.certificates is not None:
            for entry in self.certificates.expiringWithin(tls.expiry_warning, self.now):
                days = int(entry.secondsLeft(self.now) // 86400)
                warnings.append(f"{self.show(entry.path)} expires in {days} days")
            if any(listener.tls for listener in self.config.listeners):
                served: dict[str, object] = dict(self.certificates.byName())
                served.update((name, None) for name in self.acmeNames())
                for route in self.config.routes:
                    for host in route.hosts:
                        if host != "*" and not _covered(host, served):
                            warnings.append(
                                f"[route:{route.name}] host {host} is on no certificate; "
                                "TLS clients get the default certificate and a name mismatch"
                            )
        admin = self.config.proxy.admin
        if admin is not None:
            interface = checkEndpoint(admin, self.base).interface
            if interface is None or not (interface.startswith("127.") or interface == "::1"):
                warnings.append(
                    f"[edgeproxy] admin = {admin} is not bound to loopback: /status and "
                    "/metrics are readable by anyone who can reach it"
                )
        for upstream in self.config.upstreams.values():
            if upstream.insecure:
                warnings.append(
                    f"[upstream:{upstream.name}] insecure = yes: backend certificates are not verified"
                )
        return warnings


def _covered(host: str, served: dict[str, object]) -> bool:
    """Whether a route host is on a certificate (exact, or one-label wildcard, RFC 6125 §6.4.3)."""
    if host in served:
        return True
    if host.startswith("*."):
        return False
    _, dot, parent = host.partition(".")
    return bool(dot) and f"*.{parent}" in served
