"""The ``shardkit`` command line and the modules only it uses (bench, demo, doctor, inspect, profiling, synthetic).

Library modules never import from here.
"""

from .main import main

__all__ = ["main"]
