"""
Automatic certificates through ACME (RFC 8555): C{[acme]} in C{edge.ini}.

The package is split as the rest of edgeproxy is, a pure core and a thin
Twisted shell:

  - L{edgeproxy.acme.policy}: which names to order, when to renew (the
    C{renew_before} margin, or the CA's ARI window, RFC 9773), how long to
    back off after a failure (C{Retry-After} honoured), the on-demand rate
    limit; pure functions with an injected clock;
  - L{edgeproxy.acme.challenges}: the pending HTTP-01 and TLS-ALPN-01
    challenges (RFC 8555 §8.3, RFC 8737) and their answers; pure;
  - L{edgeproxy.acme.storage}: the account, certificates and locks on disk
    (atomic writes, private keys 0600, one lock per name);
  - L{edgeproxy.acme.client}: the protocol, through the C{acme} library
    (blocking; only ever called in a thread);
  - L{edgeproxy.acme.manager}: L{ACMEManager}, the service that schedules
    orders and renewals and hands new certificates to the
    L{edgeproxy.tls.store.CertificateStore};
  - L{edgeproxy.acme.ondemand}: the C{ask} service and rate limit of
    on-demand certificates.
"""
