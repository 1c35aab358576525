"""
Talking to backends: L{edgeproxy.upstream.pool.UpstreamPool} (keep-alive
connections, backend choice, timeouts, failure classification).
"""
