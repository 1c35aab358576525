"""
Header rules and the fields the proxy sets of its own accord.

  - L{edgeproxy.headers.rules}: a route's C{request_headers_*} and
    C{response_headers_*} rules as a pure function over fields;
  - L{edgeproxy.headers.stage}: the C{headers} stage kind (after
    authentication, before the cache, in the fixed order of
    L{edgeproxy.pipeline.stages}) that applies them;
  - L{edgeproxy.headers.requestid}: the request ID every request gets
    (C{[edgeproxy] request_id}), or keeps from a trusted proxy.

The client address field (C{[edgeproxy] client_ip_header}) is written with
the other forwarding fields, by L{edgeproxy.pipeline.forwarded}.

Importing this package registers the C{headers} stage kind.
"""

from __future__ import annotations

from edgeproxy.headers import stage as _stage  # noqa: F401
