"""Recognise which architecture a state dict belongs to, from its keys and shapes alone.

A checkpoint of the wrong model should be refused with a message that names both models ("looks
like dinov2_vitb14 but dinov2_vits14 was asked for"), before a model is built and long before
torch reports a size mismatch on some ``blocks.7.mlp.fc1.weight``. The signature below reads the
same facts from the official facebookresearch layout and from timm's layout, so it can be compared
with the registry entry of the backbone that was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dinocache.encoders.registry import BackboneSpec, list_backbones

# blocks.N (ViT), blocks.C.N (chunked DINOv2 training layout), stages.S.N / stages.S.blocks.N
# (ConvNeXt official / timm), layerS.N (ResNet).
_BLOCK_PATTERNS = (
    re.compile(r"^blocks\.(\d+)\.(\d+)\.norm1\."),
    re.compile(r"^blocks\.(\d+)\.norm1\."),
    re.compile(r"^stages\.(\d+)\.(?:blocks\.)?(\d+)\.(?:dwconv|conv_dw)\.weight$"),
    re.compile(r"^layer(\d+)\.(\d+)\.conv1\.weight$"),
)
_REGISTER_KEYS = ("register_tokens", "reg_token", "storage_tokens")
_CONVNET_WIDTH_KEYS = ("head.norm.weight", "norm.weight", "norm_pre.weight")


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


@dataclass(frozen=True)
class ArchSignature:
    """The facts that tell registered architectures apart (patch size and tokens for ViTs only)."""

    kind: str
    embed_dim: int
    depth: int
    patch_size: int | None = None
    num_prefix_tokens: int = 0
    mlp: str = "mlp"

    def describe(self) -> str:
        if self.kind != "vit":
            return f"convnet, embed dim {self.embed_dim}, {self.depth} blocks"
        registers = self.num_prefix_tokens - 1
        parts = [f"embed dim {self.embed_dim}", f"{self.depth} blocks", f"patch {self.patch_size}"]
        if registers > 0:
            parts.append(f"{registers} registers")
        if self.mlp == "swiglu":
            parts.append("SwiGLU")
        return ", ".join(parts)


def spec_signature(spec: BackboneSpec) -> ArchSignature:
    if spec.kind == "vit":
        return ArchSignature("vit", spec.embed_dim, spec.depth, spec.patch_size,
                             spec.num_prefix_tokens, spec.mlp)
    return ArchSignature("convnet", spec.embed_dim, spec.depth)


def state_dict_signature(state_dict: Mapping[str, object]) -> ArchSignature | None:
    """Signature of a state dict in official or timm layout; None when it is not recognisable."""
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    depth = count_blocks(shapes)
    patch = shapes.get("patch_embed.proj.weight")
    if patch is not None and len(patch) == 4:
        prefix = int("cls_token" in shapes)
        prefix += sum(shapes[k][1] for k in _REGISTER_KEYS if k in shapes and len(shapes[k]) == 3)
        return ArchSignature("vit", patch[0], depth, patch[-1], prefix, mlp_kind(shapes))
    for key in _CONVNET_WIDTH_KEYS:
        if key in shapes and depth:
            return ArchSignature("convnet", shapes[key][0], depth)
    last_stage = sorted((k for k in shapes if re.match(r"^layer4\.\d+\.conv\d\.weight$", k)),
                        key=lambda k: [int(t) for t in re.findall(r"\d+", k)])
    if last_stage and depth:
        return ArchSignature("convnet", shapes[last_stage[-1]][0], depth)
    return None


def lookalikes(signature: ArchSignature) -> list[str]:
    """Registered backbone names with exactly this architecture."""
    return [s.name for s in list_backbones() if spec_signature(s) == signature]
