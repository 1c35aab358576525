"""
Reading C{edge.ini}: L{load} turns a file into a validated, frozen
L{Config}; L{model} holds the value types, L{units} the duration and size
syntax, L{syntax} the other value syntaxes.
"""

from __future__ import annotations

from edgeproxy.config.model import Config
from edgeproxy.config.parse import load

__all__ = ["Config", "load"]
