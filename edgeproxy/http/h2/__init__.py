"""
HTTP/2 (RFC 9113) for the client side: L{HTTP2Connection} on the C{h2}
library, one L{Stream} per request as the pipeline's client side.

  - L{edgeproxy.http.h2.connection}: the connection (reading, writing,
    limits, timers, GOAWAY);
  - L{edgeproxy.http.h2.stream}: a stream, its answer and its body;
  - L{edgeproxy.http.h2.head}: a request's header list to its head;
  - L{edgeproxy.http.h2.guard}: frame headers looked at first (sizes,
    flood budgets);
  - L{edgeproxy.http.h2.hpackcache}: HPACK with repeated blocks remembered.
"""

from edgeproxy.http.h2.connection import HTTP2Connection

__all__ = ["HTTP2Connection"]
