"""dinocache: run a frozen DINO backbone once, train ACT heads on the cached features, export a live policy."""

__version__ = "0.1.0"
