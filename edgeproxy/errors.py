# -*- test-case-name: tests.test_errors -*-
"""
The one exception hierarchy of edgeproxy.

Configuration problems are L{ConfigError}s that name the file, the section,
the key and (where it is known) the line.  Problems met while proxying a
request are L{ProxyError}s that carry the status the client gets; the mapping
from exception to response lives in L{edgeproxy.http.errorpages} and nowhere
else.  Nothing here imports Twisted.
"""

from __future__ import annotations

import os


class EdgeProxyError(Exception):
    """
    Base class of every error edgeproxy raises on purpose.
    """


class ConfigError(EdgeProxyError):
    """
    A configuration file, or a file it names, is not acceptable.

    C{str(error)} reads like C{edge.ini:12: [upstream:app] keepalive: expected
    a whole number, got 'lots'} so that an operator can go straight to it.
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        """What was wrong and what was expected."""
        self.file = file
        """The configuration file (or certificate file) at fault."""
        self.section = section
        """The INI section, without brackets, or L{None}."""
        self.key = key
        """The key inside C{section}, or L{None} for the section as a whole."""
        self.line = line
        """1-based line number in C{file}, when it is known."""

    def where(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        place = ""
        if self.section is not None:
            place = f"[{self.section}]"
        if self.key is not None:
            place = f"{place} {self.key}" if place else self.key
        if place:
            parts.append(place)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class ConfigErrors(ConfigError):
    """
    Several configuration problems found in one reading, so that an operator
    fixes them all in one round.  Its place (C{file}, C{line}...) is the
    first problem's; C{str(error)} is one problem per line, in file and line
    order.
    """

    def __init__(self, errors: list[ConfigError], files: tuple[str, ...] = ()) -> None:
        """
        @param files: the order of files in the result (the main file, then
            its includes, in the order they were read); other files follow
            in order of appearance.  A file is the same however its path is
            spelled (C{edge.ini}, C{/etc/edgeproxy/edge.ini}).
        """
        flat: list[ConfigError] = []
        for error in errors:
            flat.extend(error.errors if isinstance(error, ConfigErrors) else [error])
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        rank: dict[str, int] = {}
        for name in files:
            rank.setdefault(_fileKey(name), len(rank))
        for error in flat:
            rank.setdefault(_fileKey(error.file), len(rank))
        ordered = sorted(flat, key=lambda error: (rank[_fileKey(error.file)], error.line or 0))
        self.errors: tuple[ConfigError, ...] = tuple(ordered)
        """Each problem, in file and line order."""
        first = self.errors[0]
        super().__init__(first.message, first.file, first.section, first.key, first.line)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(error) for error in self.errors)

    @classmethod
    def of(cls, errors: list[ConfigError], files: tuple[str, ...] = ()) -> ConfigError:
        """One error as itself, several as a L{ConfigErrors}."""
        if len(errors) == 1:
            return errors[0]
        return cls(errors, files)


def _fileKey(name: str | None) -> str:
    return os.path.abspath(name) if name else ""


class CertificateError(ConfigError):
    """
    A certificate or key file cannot be loaded or does not validate (key does
    not match, expired, broken chain, unreadable PEM).
    """


class ProxyError(EdgeProxyError):
    """
    A request could not be proxied.  C{status} is what the client is told;
    C{str(error)} is for the log only and may name backends, addresses and
    exception text, so it must never be written to a client.
    """

    status: int = 502
    retryAfter: int | None = None
    """Seconds for a C{Retry-After} field (RFC 9110 §10.2.3), or L{None}."""
    fields: tuple[tuple[bytes, bytes], ...] = ()
    """More fields of the error response (C{WWW-Authenticate}, the
    C{RateLimit} fields), as (lower-case name, value)."""
    backend: str | None = None
    """C{host:port} of the backend last tried for the request, when the
    failure came from the upstream side (a 502, a 504): for the access log,
    never for the client."""


class BadRequest(ProxyError):
    """The request is malformed or ambiguous (RFC 9112 §2.2, §6.3)."""

    status = 400


class HeaderFieldsTooLarge(ProxyError):
    status = 431


class RequestHeadRefused(ProxyError):
    """
    A request head a protocol's reader refused before routing (HTTP/2's
    field checks; HTTP/1.1's parser answers its own refusals): its status
    is the instance's (400, 431, 501...).
    """

    def __init__(self, why: str, status: int) -> None:
        ProxyError.__init__(self, why)
        self.status = status


class ContentTooLarge(ProxyError):
    status = 413


class MisdirectedRequest(ProxyError):
    """The Host names a site that is not served under the TLS name used."""

    status = 421


class NoRoute(ProxyError):
    status = 404


class Unauthorized(ProxyError):
    """No valid credentials (RFC 9110 §15.5.2); C{fields} holds the
    C{WWW-Authenticate} challenge."""

    status = 401


class Forbidden(ProxyError):
    """Refused by an access rule (RFC 9110 §15.5.4); the client is told no
    more than the status, the access log names the rule."""

    status = 403


class TooManyRequests(ProxyError):
    """Over a rate limit (RFC 6585 §4)."""

    status = 429


class BackendUnavailable(ProxyError):
    """No backend could be reached (connect refused, DNS, TLS failure)."""

    status = 502


class UpstreamProtocolError(ProxyError):
    """The backend answered something that is not acceptable HTTP."""

    status = 502


class UpstreamTimeout(ProxyError):
    """The backend did not connect, answer or keep sending in time."""

    status = 504


class ServiceUnavailable(ProxyError):
    """No backend of the upstream is available right now."""

    status = 503
    # Short: a backend can come back (or be re-enabled) within seconds, and a
    # longer hint would keep well-behaved clients away after it did.
    retryAfter = 5


class StartupError(EdgeProxyError):
    """
    The proxy cannot start: a listener or the admin listener cannot listen,
    or (with workers) a worker process cannot start.
    """
