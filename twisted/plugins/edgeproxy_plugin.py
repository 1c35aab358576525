# No __init__.py may sit beside this file or above it: Twisted's own
# twisted/plugins package extends its __path__ only with directories that have
# none, and an __init__.py here would shadow Twisted itself.
from twisted.application.service import ServiceMaker

edgeproxy = ServiceMaker(
    "edgeproxy",
    "edgeproxy.tap",
    "TLS-terminating edge reverse proxy (configured by an edge.ini file)",
    "edgeproxy",
)
