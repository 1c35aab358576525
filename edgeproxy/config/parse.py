# -*- test-case-name: tests.test_config -*-
"""
Reading C{edge.ini}: L{load} turns the file into a validated, frozen
L{Config} or raises one L{ConfigError}.

The rules a careful operator wants from a parser:

  - Every key is known.  A typo (C{conect_timeout}) or an unknown section is
    an error, never a silently ignored line.
  - Every error names the file, the line, the section and the key, and says
    what was expected: C{edge.ini:12: [upstream:app] keepalive: expected a
    whole number of 0 or more, got 'lots'}.  configparser does not keep line
    numbers, so L{_scanLines} reads the text once more with configparser's
    own rules to find the line of each section header and key.
  - Relative paths resolve against the directory of the configuration file,
    and files it names must exist (their contents are the TLS module's job).
  - Cross-section rules (a route names an existing upstream, a TLS listener
    has certificates to serve, no two routes claim the same host and path)
    are checked here, so a L{Config} that exists is consistent.

Nothing here imports Twisted or loads certificates.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from edgeproxy.config import syntax
from edgeproxy.config.model import (
    BALANCE_POLICIES,
    AccessLogFormat,
    Config,
    IPNetwork,
    Limits,
    Listener,
    ProxySettings,
    Route,
    TLSSettings,
    TLSVersion,
    Upstream,
)
from edgeproxy.config.units import parseDuration, parseSize
from edgeproxy.errors import ConfigError

__all__ = ["load", "SECTION_KEYS"]

T = TypeVar("T")

_LIMIT_KEYS = (
    "client_header_timeout",
    "client_idle_timeout",
    "max_header_size",
    "max_headers",
    "max_body_size",
)

_HEALTH_KEYS = (
    "health_path",
    "health_interval",
    "health_timeout",
    "health_status",
    "health_host",
    "health_initial",
    "rise",
    "fall",
)

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "edgeproxy": (
        "access_log",
        "access_log_format",
        "trusted_proxies",
        *_LIMIT_KEYS,
        "shutdown_timeout",
        "via",
        "admin",
        "admin_token",
        "admin_token_file",
        "workers",
    ),
    "tls": (
        "certificates",
        "default",
        "min_version",
        "expiry_warning",
        "session_ticket_rotation",
    ),
    "listen": ("endpoint", "tls", "http2", "redirect_https", "redirect_port", *_LIMIT_KEYS),
    "upstream": (
        "servers",
        "tls",
        "ca",
        "server_name",
        "client_certificate",
        "insecure",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "keepalive",
        "keepalive_timeout",
        "host_header",
        "balance",
        "hash_key",
        "queue_size",
        "queue_timeout",
        "resolve_interval",
        "retries",
        "retry_budget",
        "max_fails",
        "fail_window",
        "eject_time",
        "eject_max_time",
        "fail_status",
        "slow_start",
        *_HEALTH_KEYS,
    ),
    "route": ("hosts", "paths", "upstream", "max_body_size", "strip_prefix", "websocket"),
}
"""The keys each kind of section accepts (C{listen}, C{upstream} and
C{route} stand for C{[listen:NAME]} and so on)."""

_NAMED_KINDS = ("listen", "upstream", "route")
_SECTION_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")

_BOOLEANS = {
    "yes": True,
    "true": True,
    "on": True,
    "1": True,
    "no": False,
    "false": False,
    "off": False,
    "0": False,
}

# configparser's own settings; _scanLines must agree with them.
_COMMENT_PREFIXES = ("#", ";")
_SECTION_HEADER = re.compile(r"\[(?P<header>.+)\]")
# There is no [DEFAULT] magic: a section of that name is just unknown, rather
# than silently copied into every other section.
_NO_DEFAULT_SECTION = "\0no default section"


@dataclasses.dataclass
class _Lines:
    """Where each section header and key sits in the file (1-based)."""

    sections: dict[str, int] = dataclasses.field(default_factory=dict)
    keys: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)


def _scanLines(text: str) -> _Lines:
    """
    Find the line of every section header and key, following the same rules
    as configparser's C{_read} with the settings of L{_makeParser}: full-line
    and whitespace-preceded inline C{#}/C{;} comments, C{=} as the only
    delimiter, deeper-indented lines continuing the previous value, and
    blank lines ending it.
    """
    lines = _Lines()
    section: str | None = None
    key: str | None = None
    indentLevel = 0
    for number, line in enumerate(text.splitlines(), start=1):
        commentStart = len(line)
        for prefix in _COMMENT_PREFIXES:
            index = line.find(prefix)
            while index != -1:
                if index == 0 or line[index - 1].isspace():
                    commentStart = min(commentStart, index)
                    break
                index = line.find(prefix, index + 1)
        if line.strip().startswith(_COMMENT_PREFIXES):
            commentStart = 0
        value = line[:commentStart].strip()
        if not value:
            indentLevel = sys.maxsize
            continue
        indent = len(line) - len(line.lstrip())
        if section is not None and key is not None and indent > indentLevel:
            continue
        indentLevel = indent
        header = _SECTION_HEADER.match(value)
        if header:
            section = header.group("header")
            lines.sections.setdefault(section, number)
            key = None
        elif section is not None and "=" in value:
            key = value.split("=", 1)[0].rstrip()
            lines.keys.setdefault((section, key), number)
    return lines


def _makeParser() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        delimiters=("=",),
        comment_prefixes=_COMMENT_PREFIXES,
        inline_comment_prefixes=_COMMENT_PREFIXES,
        strict=True,
        empty_lines_in_values=False,
        default_section=_NO_DEFAULT_SECTION,
        interpolation=None,
    )
    # Keys are case-sensitive: "Endpoint" is reported as unknown rather than
    # quietly meaning "endpoint".
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


class _Section:
    """
    One section's raw values, read with typed getters that raise
    L{ConfigError}s pointing at the right line.
    """

    def __init__(
        self, file: str, base: str, lines: _Lines, name: str, kind: str, values: dict[str, str]
    ) -> None:
        self.file = file
        self.base = base
        self.lines = lines
        self.name = name
        self.kind = kind
        self.values = values

    @property
    def line(self) -> int | None:
        return self.lines.sections.get(self.name)

    def keyLine(self, key: str) -> int | None:
        return self.lines.keys.get((self.name, key), self.line)

    def error(self, key: str | None, message: str) -> ConfigError:
        line = self.line if key is None else self.keyLine(key)
        return ConfigError(message, self.file, self.name, key, line)

    def checkKeys(self) -> None:
        known = SECTION_KEYS[self.kind]
        for key in self.values:
            if key in known:
                continue
            hint = ""
            close = difflib.get_close_matches(key.lower(), known, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            elif key.lower() in known:
                hint = f"; keys are lower case: {key.lower()!r}"
            raise self.error(
                key, f"unknown key (this section accepts: {', '.join(known)}){hint}"
            )

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str) -> str:
        value = self.values[key].strip()
        if not value:
            raise self.error(key, "expected a value, got nothing (remove the key to use the default)")
        return value

    def require(self, key: str, what: str) -> str:
        if key not in self.values:
            # Point at the section header: the key has no line of its own.
            raise ConfigError(
                f"missing required key {key!r} ({what})", self.file, self.name, key, self.line
            )
        return self.raw(key)

    def convert(self, key: str, default: T, converter: Callable[[str], T]) -> T:
        if key not in self.values:
            return default
        text = self.raw(key)
        try:
            return converter(text)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def boolean(self, key: str, default: bool) -> bool:
        def convert(text: str) -> bool:
            try:
                return _BOOLEANS[text.lower()]
            except KeyError:
                raise ValueError(f"expected yes or no (or true/false, on/off, 1/0), got {text!r}")

        return self.convert(key, default, convert)

    def duration(self, key: str, default: float, allowZero: bool = False) -> float:
        def convert(text: str) -> float:
            seconds = parseDuration(text)
            if seconds == 0 and not allowZero:
                raise ValueError(f"expected a duration greater than zero, got {text!r}")
            return seconds

        return self.convert(key, default, convert)

    def size(self, key: str, default: int, minimum: int = 0) -> int:
        def convert(text: str) -> int:
            size = parseSize(text)
            if size < minimum:
                raise ValueError(f"expected a size of at least {minimum} bytes, got {text!r}")
            return size

        return self.convert(key, default, convert)

    def integer(self, key: str, default: T, minimum: int, maximum: int | None = None) -> int | T:
        def convert(text: str) -> int:
            if not re.fullmatch(r"[0-9]+", text):
                raise ValueError(f"expected a whole number of {minimum} or more, got {text!r}")
            number = int(text)
            if number < minimum or (maximum is not None and number > maximum):
                top = "" if maximum is None else f" and at most {maximum}"
                raise ValueError(f"expected a whole number of at least {minimum}{top}, got {text!r}")
            return number

        return self.convert(key, default, convert)

    def choice(self, key: str, default: T, choices: dict[str, T]) -> T:
        def convert(text: str) -> T:
            try:
                return choices[text.lower()]
            except KeyError:
                raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")

        return self.convert(key, default, convert)

    def resolve(self, text: str) -> str:
        return os.path.normpath(os.path.join(self.base, text))

    def existingPath(self, key: str, text: str, kind: str) -> str:
        """
        Resolve C{text} and check it is an existing readable C{"file"},
        C{"directory"} or C{"either"}.
        """
        path = self.resolve(text)
        shown = path if path == text else f"{text} ({path})"
        if not os.path.exists(path):
            raise self.error(key, f"{shown} does not exist")
        if kind == "file" and not os.path.isfile(path):
            raise self.error(key, f"expected a file, but {shown} is not a regular file")
        if kind == "directory" and not os.path.isdir(path):
            raise self.error(key, f"expected a directory, but {shown} is not one")
        if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
            raise self.error(key, f"{shown} is not readable by this user")
        return path

    def optionalFile(self, key: str) -> str | None:
        if key not in self.values:
            return None
        return self.existingPath(key, self.raw(key), "file")


def _readLimits(section: _Section, base: Limits) -> Limits:
    return Limits(
        client_header_timeout=section.duration("client_header_timeout", base.client_header_timeout),
        client_idle_timeout=section.duration("client_idle_timeout", base.client_idle_timeout),
        max_header_size=section.size("max_header_size", base.max_header_size, minimum=1),
        max_headers=section.integer("max_headers", base.max_headers, minimum=1),
        max_body_size=section.size("max_body_size", base.max_body_size),
    )


def _readAccessLog(section: _Section) -> str | None:
    default = ProxySettings().access_log
    if not section.has("access_log"):
        return default
    text = section.raw("access_log")
    if text == "-":
        return "-"
    if text.lower() == "off":
        return None
    path = section.resolve(text)
    if os.path.isdir(path):
        raise section.error("access_log", f"expected a file, '-' or off, but {path} is a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise section.error("access_log", f"the directory of {path} does not exist")
    return path


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"expected IP addresses or CIDR networks such as 10.0.0.0/8 or ::1, got {text!r}"
            ) from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None


def _readTrustedProxies(section: _Section) -> tuple[IPNetwork, ...]:
    if not section.values.get("trusted_proxies", "").strip():
        # Empty means "trust nobody", the default, so it is not an error.
        return ()
    return section.convert(
        "trusted_proxies",
        (),
        lambda text: tuple(_network(entry) for entry in syntax.splitList(text)),
    )


def _readProxy(section: _Section | None) -> ProxySettings:
    defaults = ProxySettings()
    if section is None:
        return defaults
    return ProxySettings(
        access_log=_readAccessLog(section),
        access_log_format=section.choice(
            "access_log_format", defaults.access_log_format, {f.value: f for f in AccessLogFormat}
        ),
        trusted_proxies=_readTrustedProxies(section),
        limits=_readLimits(section, defaults.limits),
        shutdown_timeout=section.duration("shutdown_timeout", defaults.shutdown_timeout),
        via=section.convert("via", defaults.via, syntax.checkToken),
        admin=_readAdminEndpoint(section),
        admin_token=_readAdminToken(section),
        workers=section.convert("workers", defaults.workers, _parseWorkers),
    )


def _parseWorkers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise ValueError(f"expected a number of processes from 1 to 256, or auto, got {text!r}")
    return int(value)


def _readAdminEndpoint(section: _Section) -> str | None:
    if not section.has("admin"):
        return None
    try:
        spec = syntax.checkEndpoint(section.raw("admin"), section.base)
    except ValueError as e:
        raise section.error("admin", str(e)) from None
    return spec.description


def _readAdminToken(section: _Section) -> str | None:
    for key in ("admin_token", "admin_token_file"):
        if section.has(key) and not section.has("admin"):
            raise section.error(key, "only used with admin = ENDPOINT (there is no admin listener)")
    if section.has("admin_token") and section.has("admin_token_file"):
        raise section.error("admin_token_file", "give admin_token or admin_token_file, not both")
    if section.has("admin_token"):
        token = section.raw("admin_token").strip()
        where = "admin_token"
    elif section.has("admin_token_file"):
        where = "admin_token_file"
        path = section.existingPath(where, section.raw(where), "file")
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise section.error(where, f"cannot read {path}: {e}") from None
    else:
        return None
    # RFC 6750 §2.1 b64token; a short token is guessable.
    if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token):
        raise section.error(
            where,
            "expected a bearer token of at least 16 characters from A-Z a-z 0-9 . _ ~ + / - "
            "(for example the output of: openssl rand -hex 32)",
        )
    return token


def _readTLS(section: _Section | None) -> TLSSettings | None:
    if section is None:
        return None
    text = section.require("certificates", "PEM files and/or directories to serve")
    certificates = tuple(
        section.existingPath("certificates", entry, "either") for entry in syntax.splitList(text)
    )
    defaults = TLSSettings(certificates=(), default=None)
    return TLSSettings(
        certificates=certificates,
        default=section.optionalFile("default"),
        min_version=section.choice(
            "min_version", defaults.min_version, {v.value: v for v in TLSVersion}
        ),
        expiry_warning=section.duration("expiry_warning", defaults.expiry_warning, allowZero=True),
        session_ticket_rotation=section.duration(
            "session_ticket_rotation", defaults.session_ticket_rotation
        ),
    )


def _readListener(
    section: _Section, name: str, limits: Limits
) -> tuple[Listener, syntax.EndpointSpec]:
    text = section.require("endpoint", "for example tcp:443 or systemd:domain=INET6:name=https")
    try:
        spec = syntax.checkEndpoint(text, section.base)
    except ValueError as e:
        raise section.error("endpoint", str(e)) from None
    tls = section.boolean("tls", False)
    if section.has("http2") and section.boolean("http2", True) and not tls:
        # RFC 9113 §3.2/§3.3: edgeproxy offers h2 through TLS ALPN only;
        # cleartext listeners speak HTTP/1.1.
        raise section.error(
            "http2", "HTTP/2 is offered over TLS (ALPN) only; set tls = yes or remove http2"
        )
    redirect = section.boolean("redirect_https", False)
    redirectPort = section.integer("redirect_port", None, minimum=1, maximum=65535)
    if redirectPort is not None and not redirect:
        raise section.error("redirect_port", "only used with redirect_https = yes")
    listener = Listener(
        name=name,
        endpoint=spec.description,
        tls=tls,
        http2=section.boolean("http2", True) if tls else False,
        redirect_https=redirect,
        redirect_port=redirectPort,
        limits=_readLimits(section, limits),
    )
    return listener, spec


def _readUpstream(section: _Section, name: str) -> Upstream:
    section.require("servers", "host:port entries, at least one")
    servers = section.convert("servers", (), syntax.parseServers)
    defaults = Upstream(name=name, servers=servers)
    tls = section.boolean("tls", defaults.tls)
    insecure = section.boolean("insecure", defaults.insecure)
    if not tls:
        for key in ("ca", "server_name", "client_certificate", "insecure"):
            if section.has(key):
                # A backend setting that does nothing usually means the
                # operator believes this hop is encrypted when it is not.
                raise section.error(key, "only used with tls = yes (this upstream speaks plain HTTP)")
    balance = section.choice(
        "balance", defaults.balance, {policy: policy for policy in BALANCE_POLICIES}
    )
    hashKey = section.convert("hash_key", defaults.hash_key, syntax.checkHashKey)
    if section.has("hash_key") and balance != "hash":
        raise section.error("hash_key", "only used with balance = hash")
    if section.has("health_path"):
        health = _readHealth(section, defaults)
    else:
        for key in _HEALTH_KEYS[1:]:
            if section.has(key):
                raise section.error(key, "only used with health_path (active health checks are off)")
        health = {}
    ca = section.optionalFile("ca")
    if insecure and ca is not None:
        raise section.error(
            "insecure", "insecure = yes turns verification off, which contradicts ca; remove one"
        )
    return Upstream(
        name=name,
        servers=servers,
        tls=tls,
        ca=ca,
        server_name=section.convert("server_name", defaults.server_name, _checkServerName),
        client_certificate=section.optionalFile("client_certificate"),
        insecure=insecure,
        connect_timeout=section.duration("connect_timeout", defaults.connect_timeout),
        response_timeout=section.duration("response_timeout", defaults.response_timeout),
        idle_timeout=section.duration("idle_timeout", defaults.idle_timeout),
        keepalive=section.integer("keepalive", defaults.keepalive, minimum=0),
        keepalive_timeout=section.duration("keepalive_timeout", defaults.keepalive_timeout),
        host_header=section.convert("host_header", defaults.host_header, syntax.checkHostHeader),
        balance=balance,
        hash_key=hashKey,
        queue_size=section.integer("queue_size", defaults.queue_size, minimum=0),
        queue_timeout=section.duration("queue_timeout", defaults.queue_timeout),
        resolve_interval=section.duration("resolve_interval", defaults.resolve_interval),
        retries=section.integer("retries", defaults.retries, minimum=0, maximum=10),
        retry_budget=section.convert("retry_budget", defaults.retry_budget, syntax.parsePercent),
        max_fails=section.integer("max_fails", defaults.max_fails, minimum=0),
        fail_window=section.duration("fail_window", defaults.fail_window),
        eject_time=section.duration("eject_time", defaults.eject_time),
        eject_max_time=_ejectMax(section, defaults),
        fail_status=section.convert("fail_status", defaults.fail_status, _failStatus),
        slow_start=section.duration("slow_start", defaults.slow_start, allowZero=True),
        **health,
    )


def _failStatus(text: str) -> tuple[int, ...]:
    codes: list[int] = []
    for low, high in syntax.parseStatusRanges(text):
        codes.extend(code for code in range(low, high + 1) if code not in codes)
    return tuple(codes)


def _ejectMax(section: _Section, defaults: Upstream) -> float:
    first = section.duration("eject_time", defaults.eject_time)
    cap = section.duration("eject_max_time", max(defaults.eject_max_time, first))
    if cap < first:
        raise section.error("eject_max_time", "must be at least eject_time")
    return cap


def _readHealth(section: _Section, defaults: Upstream) -> dict[str, Any]:
    interval = section.duration("health_interval", defaults.health_interval)
    timeout = section.duration("health_timeout", min(defaults.health_timeout, interval))
    if timeout > interval:
        raise section.error(
            "health_timeout", "must not exceed health_interval (checks of one backend would overlap)"
        )
    return {
        "health_path": section.convert("health_path", None, syntax.checkOriginPath),
        "health_interval": interval,
        "health_timeout": timeout,
        "health_status": section.convert(
            "health_status", defaults.health_status, syntax.parseStatusRanges
        ),
        "health_host": section.convert("health_host", None, syntax.checkHostHeader),
        "health_initial": section.choice(
            "health_initial", defaults.health_initial, {"unknown": "unknown", "up": "up"}
        ),
        "rise": section.integer("rise", defaults.rise, minimum=1, maximum=100),
        "fall": section.integer("fall", defaults.fall, minimum=1, maximum=100),
    }


def _checkServerName(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return syntax.checkHostname(text)


def _uniqueList(text: str, check: Callable[[str], str], what: str) -> tuple[str, ...]:
    entries: list[str] = []
    for raw in syntax.splitList(text):
        entry = check(raw)
        if entry in entries:
            raise ValueError(f"{what} {entry!r} is listed twice")
        entries.append(entry)
    if not entries:
        raise ValueError(f"expected at least one {what}")
    return tuple(entries)


def _readRoute(section: _Section, name: str) -> Route:
    section.require("hosts", "host names, *.wildcards, IP addresses, or * for any host")
    hosts = section.convert(
        "hosts", (), lambda text: _uniqueList(text, syntax.checkRouteHost, "host")
    )
    paths = section.convert(
        "paths", ("/",), lambda text: _uniqueList(text, syntax.checkRoutePath, "path")
    )
    upstream = section.require("upstream", "the name of an [upstream:NAME] section")
    return Route(
        name=name,
        hosts=hosts,
        paths=paths,
        upstream=upstream,
        max_body_size=section.size("max_body_size", 0) if section.has("max_body_size") else None,
        strip_prefix=section.boolean("strip_prefix", False),
        websocket=section.boolean("websocket", True),
    )


def _read(path: str) -> tuple[str, configparser.RawConfigParser]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except IsADirectoryError:
        raise ConfigError("expected a configuration file, got a directory", path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
    parser = _makeParser()
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(
            "duplicate section (each section may appear once)", path, e.section, None, e.lineno
        ) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(
            "duplicate key (each key may appear once per section)", path, e.section, e.option, e.lineno
        ) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(
            f"expected a [section] header before {e.line.strip()!r}", path, None, None, e.lineno
        ) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise ConfigError(
            f"expected 'key = value' or a [section] header, got {line.strip()!r}",
            path,
            None,
            None,
            lineno,
        ) from None
    return text, parser


def load(path: str) -> Config:
    """
    Read and validate a configuration file.

    @param path: the C{edge.ini} to read; relative paths inside it resolve
        against its directory.
    @return: the frozen configuration; C{Config.path} is absolute.
    @raise ConfigError: on the first problem found, naming file, line,
        section and key.
    """
    absolute = os.path.abspath(path)
    text, parser = _read(path)
    lines = _scanLines(text)
    base = os.path.dirname(absolute)

    singles: dict[str, _Section] = {}
    named: dict[str, list[tuple[str, _Section]]] = {kind: [] for kind in _NAMED_KINDS}
    for name in parser.sections():
        kind, colon, label = name.partition(":")
        section = _Section(path, base, lines, name, kind, dict(parser.items(name)))
        if not colon and kind in ("edgeproxy", "tls"):
            singles[kind] = section
        elif colon and kind in _NAMED_KINDS:
            if not _SECTION_NAME.match(label):
                raise section.error(
                    None,
                    f"expected [{kind}:NAME] with a NAME of letters, digits, '_', '.' or '-', got {name!r}",
                )
            named[kind].append((label, section))
        else:
            known = "[edgeproxy], [tls], [listen:NAME], [upstream:NAME], [route:NAME]"
            raise section.error(None, f"unknown section (sections are {known})")
        section.checkKeys()

    proxy = _readProxy(singles.get("edgeproxy"))
    tls = _readTLS(singles.get("tls"))

    listeners: list[Listener] = []
    specs: dict[str, syntax.EndpointSpec] = {}
    for label, section in named["listen"]:
        listener, spec = _readListener(section, label, proxy.limits)
        listeners.append(listener)
        specs[label] = spec
    upstreams = {label: _readUpstream(section, label) for label, section in named["upstream"]}
    routes = [_readRoute(section, label) for label, section in named["route"]]

    sections = {f"{kind}:{label}": section for kind in _NAMED_KINDS for label, section in named[kind]}
    _crossCheck(path, tls, listeners, specs, upstreams, routes, sections)

    return Config(
        path=absolute,
        proxy=proxy,
        tls=tls,
        listeners=tuple(listeners),
        upstreams=upstreams,
        routes=tuple(routes),
    )


def _crossCheck(
    path: str,
    tls: TLSSettings | None,
    listeners: list[Listener],
    specs: dict[str, syntax.EndpointSpec],
    upstreams: dict[str, Upstream],
    routes: list[Route],
    sections: dict[str, _Section],
) -> None:
    """The rules that involve more than one section."""
    if not listeners:
        raise ConfigError(
            "no [listen:NAME] section: at least one listener is needed, for example "
            "[listen:https] with endpoint = tcp:443 and tls = yes",
            path,
        )

    bound: dict[tuple[str, int, str], str] = {}
    for listener in listeners:
        section = sections[f"listen:{listener.name}"]
        spec = specs[listener.name]
        if listener.tls and tls is None:
            raise section.error("tls", "tls = yes needs a [tls] section with certificates")
        if spec.port:
            # Port 0 means "any free port" and never collides.
            interface = spec.interface or ("::" if spec.kind == "tcp6" else "")
            place = (spec.kind, spec.port, interface)
            if place in bound:
                raise section.error(
                    "endpoint", f"[listen:{bound[place]}] already listens on {listener.endpoint}"
                )
            bound[place] = listener.name

    firstTLS = next((listener for listener in listeners if listener.tls), None)
    for listener in listeners:
        if not listener.redirect_https or listener.redirect_port is not None:
            continue
        section = sections[f"listen:{listener.name}"]
        if firstTLS is None:
            raise section.error(
                "redirect_https", "needs a listener with tls = yes to redirect to, or redirect_port"
            )
        if firstTLS is listener:
            raise section.error(
                "redirect_https", "this is the first TLS listener: it would redirect to itself; set redirect_port"
            )
        if specs[firstTLS.name].port is None:
            raise section.error(
                "redirect_https",
                f"the port of [listen:{firstTLS.name}] is not known from its endpoint; set redirect_port",
            )

    claimed: dict[tuple[str, str], str] = {}
    for route in routes:
        section = sections[f"route:{route.name}"]
        if route.upstream not in upstreams:
            names = ", ".join(upstreams) or "none are defined"
            raise section.error(
                "upstream", f"no [upstream:{route.upstream}] section (upstreams: {names})"
            )
        for host in route.hosts:
            for prefix in route.paths:
                other = claimed.setdefault((host, prefix), route.name)
                if other != route.name:
                    otherLine = sections[f"route:{other}"].keyLine("hosts")
                    raise section.error(
                        "hosts",
                        f"host {host!r} with path {prefix!r} is also routed by "
                        f"[route:{other}] (line {otherLine}); each host and path may "
                        "have one route",
                    )
