# -*- test-case-name: tests.test_config -*-
"""
The configuration rules that involve more than one section: there is a
listener, a TLS listener has certificates, no two listeners bind the same
place, a redirect has somewhere to go, a route's upstream exists, no two
routes claim the same host and path.

Each rule reports through L{Problems} and goes on.  A rule is not applied to
a section that could not be read (its problem is already reported): a route
naming an upstream whose section is broken is not told the upstream does not
exist.
"""

from __future__ import annotations

from edgeproxy.config import syntax
from edgeproxy.config.model import Listener, Route, TLSSettings, Upstream
from edgeproxy.config.section import Problems, Section
from edgeproxy.errors import ConfigError

__all__ = ["crossCheck"]


def crossCheck(
    path: str,
    problems: Problems,
    *,
    declared: dict[str, set[str]],
    tls: TLSSettings | None,
    listeners: list[Listener],
    specs: dict[str, syntax.EndpointSpec],
    upstreams: dict[str, Upstream],
    routes: list[Route],
    sections: dict[str, Section],
) -> None:
    """
    @param declared: for each kind of section, the names written in the
        files (read successfully or not); C{declared["tls"]} is C{{"tls"}}
        when there is a C{[tls]} section.
    @param sections: C{"listen:NAME"} (and so on) to the section read.
    """
    if not declared["listen"]:
        problems.add(
            ConfigError(
                "no [listen:NAME] section: at least one listener is needed, for example "
                "[listen:https] with endpoint = tcp:443 and tls = yes",
                path,
            )
        )
    _checkListeners(problems, declared, tls, listeners, specs, sections)
    _checkRoutes(declared, upstreams, routes, sections)


def _checkListeners(
    problems: Problems,
    declared: dict[str, set[str]],
    tls: TLSSettings | None,
    listeners: list[Listener],
    specs: dict[str, syntax.EndpointSpec],
    sections: dict[str, Section],
) -> None:
    bound: dict[tuple[str, int, str], str] = {}
    for listener in listeners:
        section = sections[f"listen:{listener.name}"]
        spec = specs[listener.name]
        if listener.tls and "tls" not in declared.get("tls", set()):
            section.report("tls", "tls = yes needs a [tls] section with certificates")
        if spec.port:
            # Port 0 means "any free port" and never collides.
            interface = spec.interface or ("::" if spec.kind == "tcp6" else "")
            place = (spec.kind, spec.port, interface)
            if place in bound:
                section.report(
                    "endpoint", f"[listen:{bound[place]}] already listens on {listener.endpoint}"
                )
            else:
                bound[place] = listener.name

    # A listener that could not be read may be the TLS one: say nothing
    # about where redirects go until every listener is readable.
    allRead = len(listeners) == len(declared["listen"])
    firstTLS = next((listener for listener in listeners if listener.tls), None)
    for listener in listeners:
        if not listener.redirect_https or listener.redirect_port is not None:
            continue
        section = sections[f"listen:{listener.name}"]
        if not section.ok("redirect_port", "tls"):
            continue
        if firstTLS is None:
            if allRead:
                section.report(
                    "redirect_https", "needs a listener with tls = yes to redirect to, or redirect_port"
                )
        elif firstTLS is listener:
            section.report(
                "redirect_https",
                "this is the first TLS listener: it would redirect to itself; set redirect_port",
            )
        elif specs[firstTLS.name].port is None:
            section.report(
                "redirect_https",
                f"the port of [listen:{firstTLS.name}] is not known from its endpoint; set redirect_port",
            )


def _checkRoutes(
    declared: dict[str, set[str]],
    upstreams: dict[str, Upstream],
    routes: list[Route],
    sections: dict[str, Section],
) -> None:
    claimed: dict[tuple[str, str], str] = {}
    for route in routes:
        section = sections[f"route:{route.name}"]
        if route.upstream is not None and route.upstream not in declared["upstream"]:
            names = ", ".join(sorted(declared["upstream"])) or "none are defined"
            section.report(
                "upstream", f"no [upstream:{route.upstream}] section (upstreams: {names})"
            )
        for host in route.hosts:
            for prefix in route.paths:
                other = claimed.setdefault((host, prefix), route.name)
                if other != route.name:
                    otherSection = sections[f"route:{other}"]
                    where = f"line {otherSection.keyLine('hosts')}"
                    if otherSection.file != section.file:
                        where = f"{otherSection.file}:{otherSection.keyLine('hosts')}"
                    section.report(
                        "hosts",
                        f"host {host!r} with path {prefix!r} is also routed by "
                        f"[route:{other}] ({where}); each host and path may "
                        "have one route",
                    )
