"""dinocache: run a frozen DINO backbone once, train ACT heads on the cached features, export a live policy.

``dinocache.load_policy(path, device=...)`` opens an exported policy for a robot loop (see
``docs/export.md``). It is imported on first use, so ``import dinocache`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public names loaded on first access: name -> module that defines it.
_LAZY = {"load_policy": "dinocache.policy.deployment.runtime", "PolicyRuntime": "dinocache.policy.deployment.runtime"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
