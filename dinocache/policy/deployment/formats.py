"""The names a user types for an exported policy: file formats and compute precisions.

Kept apart from the modules that use them (which import torch) so that the command line can offer
them as choices, and answer ``--help``, without importing torch.
"""

from __future__ import annotations

__all__ = ["FORMATS", "LEROBOT_FORMAT", "COMPUTE_DTYPES"]

#: ``dinocache export --format``: a ``torch.export`` program (optionally with AOTInductor kernels), or ONNX.
FORMATS = ("pt2", "onnx")
#: ``dinocache export --format lerobot``: a LeRobot pretrained-model folder (:mod:`dinocache.policy.deployment.lerobot_export`).
LEROBOT_FORMAT = "lerobot"
#: ``--dtype``: the fused policy's compute precision (autocast for the half precisions).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
