"""Any backbone name to its spec: a registered one, or one derived from a timm model.

``timm:<model-name>`` reaches any timm model: its spec is derived from timm's pretrained config and
the model itself, built on the ``meta`` device (no memory, no data) with :mod:`build`, and its depth
and MLP read from its state dict's shapes (:mod:`arch`). That needs model code, which is why it
lives here and not in the registry, which is plain data.
"""

from __future__ import annotations

import difflib
import functools

from dinocache.encoders.arch import count_blocks, mlp_kind
from dinocache.encoders.registry import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    BackboneSpec,
    registered_spec,
)
from dinocache.errors import BackboneError

__all__ = ["get_backbone_spec"]


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up by its registered name, or derive one for ``timm:<model-name>``."""
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX):])
    return registered_spec(name)


@functools.lru_cache(maxsize=64)
def _timm_spec(model_name: str) -> BackboneSpec:
    """Derive a spec for an arbitrary timm model from its pretrained config and a meta-device build."""
    import timm  # here, not at the top: looking up a registered name must not import torch
    import torch

    from dinocache.encoders.build import create_timm_model

    arch = model_name.split(".", 1)[0]
    if not model_name or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise BackboneError(f"unknown timm model {model_name!r} in timm:{model_name}{hint}")
    try:
        model = create_timm_model(model_name, init="meta")
    except Exception as err:  # timm raises assorted errors for unknown pretrained tags
        raise BackboneError(f"timm cannot build timm:{model_name}: {err}") from None
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[-1])
    probe = torch.empty(1, 3, size, size, device="meta")
    features = model.forward_features(probe)
    patch_embed = getattr(model, "patch_embed", None)
    if features.ndim == 3 and patch_embed is not None:
        kind, patch = "vit", int(patch_embed.patch_size[0])
        prefix = int(getattr(model, "num_prefix_tokens", 0))
    elif features.ndim == 4 and features.shape[-1] * int(model.feature_info[-1]["reduction"]) == size:
        kind, patch, prefix = "convnet", int(model.feature_info[-1]["reduction"]), 0
    else:
        raise BackboneError(
            f"timm:{model_name} is not supported: forward_features gives shape {tuple(features.shape)}, "
            "expected ViT tokens (B, N, C) or a convnet map (B, C, h, w)"
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return BackboneSpec(
        name=f"{TIMM_PREFIX}{model_name}", timm_id=model_name, family="timm", kind=kind,
        patch_size=patch, embed_dim=int(features.shape[-1] if kind == "vit" else features.shape[1]),
        depth=count_blocks(shapes), num_params=sum(p.numel() for p in model.parameters()),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        default_image_size=size if size % patch == 0 else DEFAULT_IMAGE_SIZE,
        num_prefix_tokens=prefix, mlp=mlp_kind(shapes), pretrain_image_size=size,
        license=str(cfg.get("license", "") or ""), checkpoint_file=None,
        checkpoint_url=cfg.get("url") or None,
    )
