"""
Reading C{edge.ini}: L{load} turns a file into a validated, frozen
L{Config}; L{model} holds the value types.
"""
