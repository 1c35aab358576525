# -*- test-case-name: tests.test_config_redirects -*-
"""
Reading a route's C{redirect} and C{redirect_status} (L{readRouteRedirect}):
a route that answers every request with a redirect instead of forwarding
it.  Part of L{edgeproxy.config.parse}; the answer is
L{edgeproxy.pipeline.redirect}'s, the expansion L{edgeproxy.locations}'.

The template is checked here, so that no request can make it point
elsewhere (L{parseTemplate}):

  - it is an C{http://} or C{https://} URL (C{$scheme://} too) whose host
    is written out or is C{$host}, or a path that starts with C{/} and a
    written character other than C{/} and C{\\} (C{/$path} could expand to
    C{//evil.example}, which a browser reads as another host);
  - its written text is printable ASCII without space (no control, no
    CR or LF: nothing a field value may not hold);
  - C{$NAME} is one of L{VARIABLES} (a name runs to the first character
    that is not a letter, a digit or C{_}); an unknown one is an error.
"""

from __future__ import annotations

import re

from edgeproxy.config.stagemodel import RouteRedirect
from edgeproxy.config.section import Section

__all__ = [
    "REDIRECT_KEYS",
    "REDIRECT_ROUTE_KEYS",
    "REDIRECT_STATUSES",
    "VARIABLES",
    "parseTemplate",
    "readRouteRedirect",
]

REDIRECT_KEYS = ("redirect", "redirect_status")
"""The keys of C{[route:NAME]} read here."""

REDIRECT_ROUTE_KEYS = frozenset({"hosts", "paths", "strip_prefix", "error_pages", *REDIRECT_KEYS})
"""The keys a redirect route may have: it answers before any other stage,
so keys of forwarding, caching, access or content would do nothing."""

REDIRECT_STATUSES = (301, 302, 303, 307, 308)

VARIABLES = ("request_uri", "scheme", "host", "path", "query", "args", "is_args")
"""The variables of a template (see L{edgeproxy.locations})."""

_PATH_VARIABLES = ("request_uri", "path")
"""The variables that always expand to something starting with C{/}: the
only ones that may follow the host."""

_VARIABLE = re.compile(r"\$([A-Za-z0-9_]*)")
_TEXT = re.compile(r"[\x21-\x7e]*\Z")
_AUTHORITY = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?|[0-9.]+|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?\Z"
)


def parseTemplate(text: str) -> tuple[tuple[str, str], ...]:
    """
    The parts of a redirect template: C{("text", TEXT)} and C{("var", NAME)}
    in order.

    @raise ValueError: saying what is wrong (see the module docstring).
    """
    parts: list[tuple[str, str]] = []
    position = 0
    for match in _VARIABLE.finditer(text):
        if match.start() > position:
            parts.append(("text", text[position : match.start()]))
        name = match.group(1)
        if not name:
            raise ValueError(
                "a '$' must start a variable ($request_uri, $host...); write a literal '$' as %24"
            )
        if name not in VARIABLES:
            raise ValueError(
                f"unknown variable ${name} (variables are: "
                + ", ".join("$" + known for known in VARIABLES)
                + ")"
            )
        parts.append(("var", name))
        position = match.end()
    if position < len(text):
        parts.append(("text", text[position:]))
    for kind, value in parts:
        if kind == "text" and not _TEXT.match(value):
            raise ValueError(
                f"{value!r}: a redirect may hold printable ASCII only, without spaces "
                "(percent-encode anything else)"
            )
    _checkTarget(parts)
    return tuple(parts)


def _checkTarget(parts: list[tuple[str, str]]) -> None:
    """The template names its host, or is a path on the request's own."""
    first = parts[0] if parts else ("text", "")
    if first == ("var", "scheme"):
        rest = parts[1:]
        if not rest or rest[0][0] != "text" or not rest[0][1].startswith("://"):
            raise ValueError("$scheme must be followed by :// and the host")
        afterScheme = [("text", rest[0][1][3:])] + rest[1:]
    elif first[0] == "text" and first[1].lower().startswith(("http://", "https://")):
        afterScheme = [("text", first[1].split("://", 1)[1])] + parts[1:]
    elif first[0] == "text" and first[1].startswith("/"):
        if first[1][1:2] in ("/", "\\") or (first[1] == "/" and len(parts) > 1):
            raise ValueError(
                "a path must start with / and a written character other than / "
                "(for example /new$request_uri): //... would name another host"
            )
        return
    else:
        raise ValueError(
            "expected an http:// or https:// URL (for example https://example.com$request_uri) "
            "or a path starting with /"
        )
    _checkAuthority(afterScheme)


def _checkAuthority(parts: list[tuple[str, str]]) -> None:
    """
    C{parts} start with the authority: written out, or C{$host}; what
    follows it starts with C{/}, C{?} or C{#} (a variable there must be
    one that does: L{_PATH_VARIABLES}).
    """
    if parts and parts[0] == ("text", ""):
        parts = parts[1:]
    if not parts:
        raise ValueError("expected a host after ://")
    kind, value = parts[0]
    rest = parts[1:]
    if kind == "var":
        if value != "host":
            raise ValueError(f"the host of a redirect must be written out or be $host, not ${value}")
        if rest and rest[0][0] == "text":
            port = re.match(r":[0-9]{1,5}", rest[0][1])
            tail = rest[0][1][port.end() :] if port else rest[0][1]
            if tail:
                _checkAfterAuthority(("text", tail))
                return
            rest = rest[1:]
        if rest:
            _checkAfterAuthority(rest[0])
        return
    delimiter = re.search(r"[/?#]", value)
    authority = value if delimiter is None else value[: delimiter.start()]
    if not _AUTHORITY.match(authority):
        raise ValueError(f"{authority!r} is not a host name or an IP address (with an optional :PORT)")
    if delimiter is None and rest:
        _checkAfterAuthority(rest[0])


def _checkAfterAuthority(part: tuple[str, str]) -> None:
    kind, value = part
    if kind == "text" and value[:1] in ("/", "?", "#"):
        return
    if kind == "var" and value in _PATH_VARIABLES:
        return
    shown = value if kind == "text" else "$" + value
    raise ValueError(
        f"the host must be followed by /, ?, #, the end, $request_uri or $path, not {shown!r}"
    )


def readRouteRedirect(section: Section) -> RouteRedirect | None:
    """
    The route's C{redirect} and C{redirect_status}, or L{None} when it has
    no C{redirect} (or a bad one, which is reported).  The keys a redirect
    route cannot use are reported too.
    """
    if not section.has("redirect"):
        if section.has("redirect_status"):
            section.report("redirect_status", "only used with redirect = URL")
        return None
    if section.has("upstream"):
        section.report(
            "upstream", "a route has either upstream (it forwards) or redirect (it answers), not both"
        )
    for key in section.values:
        if key not in REDIRECT_ROUTE_KEYS and key != "upstream":
            section.report(
                key,
                "not used on a redirect route (it answers every request itself, before any other "
                "stage; it may have: " + ", ".join(sorted(REDIRECT_ROUTE_KEYS)) + ")",
            )
    parts = section.convert("redirect", None, parseTemplate)
    status = section.choice(
        "redirect_status", 301, {str(code): code for code in REDIRECT_STATUSES}
    )
    if parts is None:
        return None
    return RouteRedirect(location=section.values["redirect"].strip(), parts=parts, status=status)
