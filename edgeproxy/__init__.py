"""
edgeproxy: a TLS-terminating edge reverse proxy built on Twisted.

This module holds only the version; see C{docs/architecture.rst} for the map
of the package.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
