"""
Operating the proxy: the service that runs the process, one module per job.

  - L{service <edgeproxy.serve.service>}: L{EdgeService}, one process
    serving the configuration, composed of:
      - L{listeners <edgeproxy.serve.listeners>}: the listening ports and
        the admin listener;
      - L{sites <edgeproxy.serve.sites>}: the one module that knows the
        HTTP server's classes (a listener's site, a connection of it);
      - L{drain <edgeproxy.serve.drain>}: the drain of connections and
        pools on C{SIGTERM};
      - L{reload <edgeproxy.serve.reload>}: validating and building a
        reload (shared with the supervisor);
      - L{signals <edgeproxy.serve.signals>}: C{SIGHUP}, C{SIGTERM} and
        the exit status (shared with the supervisor).
  - L{supervisor <edgeproxy.serve.supervisor>}: L{Supervisor}, the process
    that runs C{workers} worker processes, with
    L{heldsockets <edgeproxy.serve.heldsockets>} (the sockets they
    inherit), L{slots <edgeproxy.serve.slots>} (the worker processes by
    slot: started, restarted, replaced, retired),
    L{workerprocess <edgeproxy.serve.workerprocess>} (one worker
    seen from the supervisor) and L{aggregate <edgeproxy.serve.aggregate>}
    (the instance's C{/status} and C{/metrics}).
"""
