"""
Reading C{edge.ini}: L{load} turns a file into a validated, frozen
L{Config}.  L{model} holds the value types; L{ini} the file syntax,
L{source} includes and C{${VAR}} substitution, L{files} the bounded reading
of named files, L{section} the typed getters, L{parse} the sections and
L{checks} the rules across them; L{units} the duration and size syntax and
L{syntax} the other value syntaxes.
"""

from __future__ import annotations

from edgeproxy.config.model import Config
from edgeproxy.config.parse import load

__all__ = ["Config", "load"]
