"""
The security layer: who gets in, how often, and as whom, decided at the
edge before any backend sees a byte.

Three stage kinds of the pipeline (L{edgeproxy.pipeline.stages}), in the
fixed order C{access}, C{ratelimit}, C{auth}:

  - L{edgeproxy.security.access}: allow/deny networks on the client
    address (after trusted proxies and the PROXY protocol), methods, a
    required client certificate, the client certificate's facts for the
    backend, and C{Strict-Transport-Security} on the way back;
  - L{edgeproxy.security.ratelimit}: token buckets and requests in flight
    per key, in this process (L{edgeproxy.security.buckets}) or shared
    through Redis (L{edgeproxy.security.redisstore}); limits keyed on the
    identity are applied by the C{auth} stage once it knows it;
  - L{edgeproxy.security.auth}: basic, JWT, forward and OpenID Connect
    authentication, each a small module.

Beside the stages: the PROXY protocol (L{edgeproxy.security.proxyprotocol}),
in front of a listener's TLS and towards backends, and the client
certificate facts of a connection (L{edgeproxy.security.clientcerts}).

Decisions are plain functions over frozen values (tested with tables);
the stages are the thin shell that applies them to a call.

Importing this package registers the three stage kinds.
"""

from __future__ import annotations

from edgeproxy.security import access as _access  # noqa: F401
from edgeproxy.security import ratelimit as _ratelimit  # noqa: F401
from edgeproxy.security.auth import stage as _auth  # noqa: F401
