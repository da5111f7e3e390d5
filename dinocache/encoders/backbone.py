"""The frozen backbone: uint8 frames in, final-norm patch grid and CLS token out.

:class:`FrozenBackbone` fuses preprocessing and the timm model into one module, so that stage one
(extraction) and stage three (the exported live policy) run literally the same graph. It never
trains: it stays in eval mode whatever its parent does, its parameters do not require grad, and
its forward runs under ``torch.no_grad``.

Outputs follow DINO's ``x_norm_patchtokens`` / ``x_norm_clstoken``:

* ViTs: ``forward_features`` (the final LayerNorm applied to all tokens); the CLS token is token 0,
  register / storage tokens are dropped, the remaining ``h*w`` patch tokens are reshaped to
  ``(B, C, h, w)``. A timm ViT without a class token reports the mean patch token as its CLS.
* convnets: the last stage's map is the grid and its global average pool the CLS. Where the model
  has a final norm (DINOv3 ConvNeXt: timm's ``head.norm``), it is applied to both, as upstream
  applies ``norm`` to the pooled token and to every patch token.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn

from dinocache.encoders.build import Init, create_timm_model
from dinocache.encoders.checkpoints import load_into
from dinocache.encoders.image_size import ImageSize
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.pos_embed import resample_pos_embed
from dinocache.encoders.preprocess import ImagePreprocessor, PreprocessConfig
from dinocache.encoders.record import BackboneRecord, WeightsRecord
from dinocache.encoders.registry import BackboneSpec
from dinocache.encoders.weights import fetch_weights, weights_record
from dinocache.errors import BackboneError

AMP_DTYPES = (None, torch.float16, torch.bfloat16)


class FrozenBackbone(nn.Module):
    """Preprocessing + frozen timm model; ``forward(uint8 images) -> (grid, cls)`` in float32."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, preprocess: ImagePreprocessor,
                 weights: WeightsRecord, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_amp_dtype(amp_dtype)
        self.spec = spec
        self.preprocess = preprocess
        self.model = model.requires_grad_(False)
        self.weights = weights
        self.amp_dtype = amp_dtype
        self._has_cls = getattr(model, "cls_token", None) is not None
        head_norm = getattr(getattr(model, "head", None), "norm", None)
        self._head_norm = isinstance(head_norm, nn.Module) and not isinstance(head_norm, nn.Identity)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stay in eval mode: a frozen backbone must never switch BatchNorm / dropout to training."""
        return super().train(False)

    @property
    def grid_size(self) -> tuple[int, int]:
        height, width = self.preprocess.config.image_size
        return height // self.spec.patch_size, width // self.spec.patch_size

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the model's weights are stored in (float32 unless cast, see ``FusedPolicy.with_weights_in``)."""
        return next(self.model.parameters()).dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B,H,W,3)`` / ``(B,3,H,W)`` / single image -> grid ``(B,C,h,w)``, CLS ``(B,C)``."""
        with torch.no_grad():
            x = self.preprocess(images)
            if self.amp_dtype is None:  # in the weights' own dtype: float32, or half where cast for ONNX
                grid, cls = self._encode(x.to(self.weights_dtype))
            else:
                with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                    grid, cls = self._encode(x)
        return grid.float().contiguous(), cls.float()

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        if self.spec.kind == "vit":
            height, width = self.grid_size
            patches = features[:, self.spec.num_prefix_tokens:]
            grid = patches.transpose(1, 2).reshape(x.shape[0], patches.shape[-1], height, width)
            cls = features[:, 0] if self._has_cls else patches.mean(dim=1)
            return grid, cls
        pooled = features.mean(dim=(2, 3), keepdim=True)
        if self._head_norm:
            norm = self.model.head.norm
            features, pooled = norm(features), norm(pooled)
        return features, pooled.flatten(1)

    def record(self) -> BackboneRecord:
        """Exactly what produces the features (stored next to them; stage three rebuilds from it)."""
        return BackboneRecord(
            name=self.spec.name,
            timm_id=self.spec.timm_id,
            family=self.spec.family,
            kind=self.spec.kind,
            patch_size=self.spec.patch_size,
            embed_dim=self.spec.embed_dim,
            num_prefix_tokens=self.spec.num_prefix_tokens,
            grid_size=self.grid_size,
            weights=self.weights,
            preprocess=self.preprocess.config.to_dict(),
            amp_dtype=str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None,
            timm_version=timm.__version__,
            torch_version=torch.__version__,
        )


def create_backbone(
    name: str,
    weights: str | os.PathLike[str] = "auto",
    image_size: ImageSize | None = None,
    center_crop: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> FrozenBackbone:
    """Build a :class:`FrozenBackbone` by registry name (or ``timm:<model>``).

    Order matters: the name, image size and weights are all validated (and a weights file read and
    checked) before the model is built, so a bad flag costs milliseconds, not a model build.
    ``device='meta'`` builds a data-less model for shape inference; it takes ``weights='random'``.
    """
    spec = get_backbone_spec(name)
    config = PreprocessConfig.for_backbone(spec, image_size, center_crop)
    device = torch.device(device)
    _check_amp_dtype(amp_dtype)
    meta = device.type == "meta"
    if meta and weights != "random":
        raise BackboneError(f"the meta device holds no data: build {name} with weights='random' there")
    fetched = fetch_weights(spec, weights)
    init: Init = "meta" if meta else "random" if fetched.state_dict is None else "skip"
    model = build_timm_model(spec, seed, init)
    if fetched.state_dict is not None:
        load_into(model, fetched.state_dict, spec, fetched.path)
    info = weights_record(fetched, seed, None if meta else model)
    _set_image_size(model, spec, config.image_size)
    backbone = FrozenBackbone(spec, model, ImagePreprocessor(config), info, amp_dtype)
    return backbone.to(device)


def _check_amp_dtype(amp_dtype: torch.dtype | None) -> None:
    if amp_dtype not in AMP_DTYPES:
        raise BackboneError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, not {amp_dtype}")


def build_timm_model(spec: BackboneSpec, seed: int = 0, init: Init = "random") -> nn.Module:
    """timm model for ``spec`` at its pretraining resolution (see :func:`create_timm_model`).

    Built at the native resolution so that a checkpoint's position table loads as it is;
    :func:`_set_image_size` then resizes it with the upstream method.
    """
    kwargs: dict[str, Any] = {}
    if spec.kind == "vit":
        kwargs.update(img_size=spec.pretrain_image_size, dynamic_img_size=False)
    try:
        return create_timm_model(spec.timm_id, seed, init, **kwargs)
    except TypeError as err:
        raise BackboneError(f"timm cannot build {spec.timm_id} at a fixed image size: {err}") from None


def _set_image_size(model: nn.Module, spec: BackboneSpec, image_size: tuple[int, int]) -> None:
    """Fix a ViT's input size (static graph), resizing an absolute position table the upstream way."""
    if spec.kind != "vit":
        return
    if not hasattr(model, "set_input_size"):
        raise BackboneError(f"timm model {spec.timm_id} cannot be set to a fixed input size")
    old_grid = tuple(model.patch_embed.grid_size)
    old_pos = getattr(model, "pos_embed", None)
    model.set_input_size(img_size=image_size)  # patch embed, RoPE grid, and timm's own pos resize
    new_grid = tuple(model.patch_embed.grid_size)
    if old_pos is not None and new_grid != old_grid:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        table = resample_pos_embed(old_pos.detach(), old_grid, new_grid, prefix,
                                   spec.pos_interp_offset, spec.pos_interp_antialias)
        model.pos_embed = nn.Parameter(table, requires_grad=False)
