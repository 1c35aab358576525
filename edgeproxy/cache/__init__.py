"""
The HTTP cache at the edge (RFC 9111, shared cache): the C{cache} stage of
the pipeline and what it keeps.

  - the rules, pure functions over values with an injected clock:
    L{edgeproxy.cache.directives} (reading C{Cache-Control}, the targeted
    field, dates and validators), L{edgeproxy.cache.freshness} (what may be
    stored, for how long, how old it is, whether a request may have it),
    L{edgeproxy.cache.conditional} (validation, 304 merging, client
    conditionals), L{edgeproxy.cache.ranges} (byte ranges from a stored
    response), L{edgeproxy.cache.status} (C{Cache-Status});
  - the key: L{edgeproxy.cache.key};
  - what is stored: L{edgeproxy.cache.entry}, kept in
    L{edgeproxy.cache.memory} (per process) and L{edgeproxy.cache.disk}
    (shared by the workers: its index L{edgeproxy.cache.diskindex}, its
    files L{edgeproxy.cache.diskobjects}, its start-up check
    L{edgeproxy.cache.diskrecover}, what blocks L{edgeproxy.cache.blocking}),
    together in L{edgeproxy.cache.stores} with the
    collapsing of concurrent misses (L{edgeproxy.cache.collapse});
  - the stage: L{edgeproxy.cache.stage}, what it does with the responses
    to what it passes on (L{edgeproxy.cache.responses}), its bodies
    (L{edgeproxy.cache.bodies}), purging (L{edgeproxy.cache.operate}) and
    how it is built per route (L{edgeproxy.cache.kind}).
"""
