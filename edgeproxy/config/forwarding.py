# -*- test-case-name: tests.test_config_forwarding -*-
"""
Reading a route's own timeouts and retries (L{readRouteForwarding}):
C{connect_timeout}, C{response_timeout} and C{retries} over its upstream's,
and C{request_timeout}, the bound on what a client waits for the response
head across the queue and every attempt.  Part of
L{edgeproxy.config.parse}; what the values do is
L{edgeproxy.upstream.terms}'.
"""

from __future__ import annotations

from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.config.section import Section

__all__ = ["ROUTE_FORWARDING_KEYS", "readRouteForwarding"]

ROUTE_FORWARDING_KEYS = ("connect_timeout", "response_timeout", "retries", "request_timeout")
"""The keys of C{[route:NAME]} read here."""


def readRouteForwarding(section: Section) -> RouteForwarding | None:
    """
    The route's timeouts and retries, or L{None} when it sets none (its
    requests are then sent on the upstream's terms, at no cost of their
    own).
    """
    if not any(section.has(key) for key in ROUTE_FORWARDING_KEYS):
        return None
    return RouteForwarding(
        connect_timeout=_duration(section, "connect_timeout"),
        response_timeout=_duration(section, "response_timeout"),
        # The same bound as the upstream's retries.
        retries=section.integer("retries", None, minimum=0, maximum=10),
        request_timeout=_duration(section, "request_timeout"),
    )


def _duration(section: Section, key: str) -> float | None:
    if not section.has(key):
        return None
    # The default is never used: a key with a bad value is reported, and a
    # configuration with a problem is not used at all.
    return section.duration(key, 0.0)
