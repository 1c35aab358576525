"""
The admin listener: C{GET /status} (JSON), C{GET /metrics} (Prometheus
text) and the backend actions (C{POST}, bearer token), on the endpoint of
C{[edgeproxy] admin}.

It owns what an operator sees of the live proxy, one module per job:

  - L{status <edgeproxy.admin.status>}: the C{/status} document
    (L{statusDocument}, a documented API: C{docs/operations.rst}, "Admin
    API") and the gauges of L{edgeproxy.metrics} read at scrape time from
    the same objects (L{stateSamples}), so C{/status} and C{/metrics}
    cannot disagree;
  - L{resource <edgeproxy.admin.resource>}: L{AdminResource}, every path:
    the routing, the DNS rebinding guard, the bearer token, the actions;
  - L{site <edgeproxy.admin.site>}: L{AdminSite}, a small plain-HTTP
    C{twisted.web} site of its own (not an
    L{edgeproxy.http.listener.ListenerFactory}: no routing, no access
    log), bounded all the same, and L{listenAdmin}.
"""
