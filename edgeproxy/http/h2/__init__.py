"""
HTTP/2 (RFC 9113) for the client side: L{HTTP2Connection} on the C{h2}
library, one L{Stream} per request as the pipeline's client side.

  - L{edgeproxy.http.h2.connection}: the connection (reading, limits,
    timers, GOAWAY);
  - L{edgeproxy.http.h2.writing}: its writing half (what streams hold,
    within flow control and the listener's bounds), and streams ending;
  - L{edgeproxy.http.h2.sending}: a whole response in one pass;
  - L{edgeproxy.http.h2.stream}: a stream, its answer and its body;
  - L{edgeproxy.http.h2.head}: a request's header list to its head;
  - L{edgeproxy.http.h2.guard}: frame headers looked at first (sizes,
    flood budgets);
  - L{edgeproxy.http.h2.hpackcache}: HPACK with repeated blocks remembered;
  - L{edgeproxy.http.h2.notes}: a client's protocol errors in the process
    log (a count per interval).
"""

from edgeproxy.http.h2.connection import HTTP2Connection

__all__ = ["HTTP2Connection"]
