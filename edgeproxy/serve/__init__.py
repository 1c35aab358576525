"""
Operating the proxy: the process's own service and its life cycle.

  - L{edgeproxy.serve.service}: L{EdgeService}, one process serving the
    configuration (composition of the modules below).
  - L{edgeproxy.serve.supervisor}: L{Supervisor}, the process that runs
    C{workers} worker processes.
"""
