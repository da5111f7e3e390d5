"""Architecture facts read from a state dict's keys and shapes alone: how many blocks, which MLP.

Both the checkpoint check (``checkpoints.py``: is this file the model that was asked for?) and the
spec of an arbitrary timm model (``lookup.py``) read them; they know nothing of the registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# blocks.N (ViT), blocks.C.N (chunked DINOv2 training layout), stages.S.N / stages.S.blocks.N
# (ConvNeXt official / timm), layerS.N (ResNet).
_BLOCK_PATTERNS = (
    re.compile(r"^blocks\.(\d+)\.(\d+)\.norm1\."),
    re.compile(r"^blocks\.(\d+)\.norm1\."),
    re.compile(r"^stages\.(\d+)\.(?:blocks\.)?(\d+)\.(?:dwconv|conv_dw)\.weight$"),
    re.compile(r"^layer(\d+)\.(\d+)\.conv1\.weight$"),
)


def count_blocks(keys: Iterable[str]) -> int:
    """Number of residual blocks (transformer blocks, ConvNeXt blocks, ResNet blocks)."""
    keys = list(keys)
    for pattern in _BLOCK_PATTERNS:
        found = {m.groups() for m in map(pattern.match, keys) if m}
        if found:
            return len(found)
    return 0


def mlp_kind(shapes: Mapping[str, Sequence[int]]) -> str:
    """'swiglu' for gated MLPs in any layout (split w1/w2/w3, fused w12, timm fc1_g or packed fc1)."""
    for key, shape in shapes.items():
        if re.search(r"\.mlp\.(w1|w12|fc1_g)\.weight$", key):
            return "swiglu"
        # timm packs DINOv2-g's fused SwiGLU as fc1 producing twice fc2's input width.
        match = re.match(r"^(.*\.mlp\.)fc1\.weight$", key)
        fc2 = shapes.get(f"{match.group(1)}fc2.weight") if match else None
        if fc2 is not None and shape[0] == 2 * fc2[1]:
            return "swiglu"
    return "mlp"
