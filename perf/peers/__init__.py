"""The peers the engine is measured against: servers started as ``python -m perf.peers.<name>``."""
