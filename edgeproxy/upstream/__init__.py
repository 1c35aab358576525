"""
Talking to backends: L{edgeproxy.upstream.pool.UpstreamPool} (keep-alive
connections, in-flight accounting, timeouts, failure classification) and
L{edgeproxy.upstream.balance} (which server of an upstream gets a request).
"""
