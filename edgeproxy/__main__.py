"""
C{python -m edgeproxy}: the same as the C{edgeproxy} console command.
"""

from __future__ import annotations

import sys

from edgeproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
