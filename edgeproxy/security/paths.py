# -*- test-case-name: tests.test_security_bypass -*-
"""
Paths a backend may read as another path than routing did.

L{edgeproxy.targets.normaliseTarget} keeps empty segments (C{//}) and
C{;} parameters, as RFC 3986 says they are: C{/a//b} is not C{/a/b}, and
C{/admin;x=1} is a segment of its own.  But many backends merge slashes
(nginx, Go's C{http.ServeMux} redirects) or drop C{;} parameters (Java
servlet containers, Spring), and then C{//admin} or C{/admin;x} reach the
resource C{/admin} through a route that is not C{/admin}'s: its access
rules, limits and authentication are bypassed.

L{backendView} is the path such a backend would see; the listener
(L{edgeproxy.http.listener.ListenerFactory.prepare}) refuses with C{400} a
request whose path has either, when its backend view routes to another
route or prefix than its path did.  A path whose two views route alike
passes unchanged.
"""

from __future__ import annotations

import re

__all__ = ["backendView", "mayDiffer"]

_SLASHES = re.compile(rb"/{2,}")


def mayDiffer(path: bytes) -> bool:
    """Whether C{path} has an empty segment or a C{;} parameter (cheap)."""
    return b"//" in path or b";" in path


def backendView(path: bytes) -> bytes:
    """C{path} with slashes merged and each segment's C{;} parameters dropped."""
    merged = _SLASHES.sub(b"/", path)
    if b";" not in merged:
        return merged
    return b"/".join(segment.partition(b";")[0] for segment in merged.split(b"/"))
