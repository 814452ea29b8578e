"""The ``shardkit`` command line and the modules only it uses (bench, demo, inspect, convert, synthetic).

Library modules never import from here.
"""

from .main import main

__all__ = ["main"]
