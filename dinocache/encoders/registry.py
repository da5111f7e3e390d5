"""The backbone registry: every frozen encoder dinocache knows, described as data.

A :class:`BackboneSpec` is everything the pipeline needs to know about a backbone *without* building
it: the timm model to instantiate, the patch size (which fixes the feature grid), the embedding
width (which fixes the cache size), the normalisation constants, and where the official checkpoint
lives. Stage one sizes its Zarr arrays from the spec, stage three rebuilds the same backbone from
the name recorded in the store, and ``dinocache backbones`` prints the table from it.

The registered names follow the upstream hub names (``dinov2_vits14_reg``, ``dinov3_vitb16``, ...)
so that a user can go from a facebookresearch README to a dinocache flag without a lookup table.
Any other timm model is reachable as ``timm:<model-name>``; :func:`dinocache.encoders.lookup.get_backbone_spec`
derives its spec by building the model. This module stays data and lookups: it imports no other
encoders module (``tests/test_layering.py``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from dinocache.errors import BackboneError

Family = Literal["dinov2", "dinov3", "resnet", "timm"]
Kind = Literal["vit", "convnet"]

TIMM_PREFIX = "timm:"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3 satellite models were trained on SAT-493M with their own statistics (timm `*.sat493m`).
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
DINOV3_BASE_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_ACCESS_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"

# The size dinocache uses when none is asked for: 224 is a multiple of 14, 16 and 32, gives a
# 16x16 / 14x14 / 7x7 grid, and is what ACT-style policies are usually trained at.
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of one backbone (no weights, no model).

    ``patch_size`` is the ViT patch size, or the total stride of a convnet's last stage; image sizes
    must be multiples of it so the feature grid is exactly ``size // patch_size``.
    ``num_prefix_tokens`` counts the CLS and register/storage tokens a ViT prepends (0 for convnets);
    they are stripped from the cached grid. ``depth`` (transformer blocks, or residual blocks of a
    convnet) and ``mlp`` ('mlp' | 'swiglu') identify the architecture of a checkpoint file, so a file
    of the wrong model is refused by name rather than by a shape error deep inside torch.

    ``pretrain_image_size`` is the resolution of the pretrained absolute position table (518 for
    DINOv2); models are built there, loaded, then resized (see ``pos_embed.py``).
    ``pos_interp_offset`` / ``pos_interp_antialias`` are the upstream code's own settings for that
    resize, so that features match the official implementation.

    ``checkpoint_*`` describe the official (non-timm) file: its name, download URL and, where
    published, its sha256 and byte size. Hub-style names end in ``-<first 8 hex of sha256>.pth``.
    """

    name: str
    timm_id: str
    family: Family
    kind: Kind
    patch_size: int
    embed_dim: int
    depth: int
    num_params: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    num_prefix_tokens: int
    mlp: str = "mlp"
    pretrain_image_size: int = DEFAULT_IMAGE_SIZE
    pos_interp_offset: float = 0.0
    pos_interp_antialias: bool = True
    license: str = ""
    checkpoint_file: str | None = None
    checkpoint_url: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_size: int | None = None

    @property
    def checkpoint_sha256_prefix(self) -> str | None:
        """The published hash of the official file: full sha256, or the hub-style name suffix."""
        if self.checkpoint_sha256:
            return self.checkpoint_sha256
        match = re.search(r"-([0-9a-f]{8})\.pth$", self.checkpoint_file or "")
        return match.group(1) if match else None

    @property
    def hf_hub_id(self) -> str | None:
        """Hugging Face repo holding timm's converted weights (None when timm has none)."""
        import timm

        try:
            return timm.models.get_pretrained_cfg(self.timm_id).hf_hub_id or None
        except (RuntimeError, AttributeError):
            return None


# --------------------------------------------------------------------------------------------------
# Pretrained configs as data. One small factory per family keeps the table below one line per model.
# --------------------------------------------------------------------------------------------------


def _dinov2(arch: str, timm_arch: str, dim: int, depth: int, params: int, *, reg: bool,
            sha256: str | None = None, size: int | None = None) -> BackboneSpec:
    suffix = "_reg4" if reg else ""
    file = f"dinov2_{arch}{suffix}_pretrain.pth"
    return BackboneSpec(
        name=f"dinov2_{arch}{'_reg' if reg else ''}",
        timm_id=f"{timm_arch}_patch14{suffix}_dinov2.lvd142m",
        family="dinov2", kind="vit", patch_size=14, embed_dim=dim, depth=depth, num_params=params,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, default_image_size=DEFAULT_IMAGE_SIZE,
        num_prefix_tokens=5 if reg else 1, mlp="swiglu" if arch == "vitg14" else "mlp",
        pretrain_image_size=518,
        # facebookresearch/dinov2 hub/backbones.py: models without registers interpolate with
        # offset 0.1 and no antialias, models with registers with offset 0 and antialias.
        pos_interp_offset=0.0 if reg else 0.1, pos_interp_antialias=reg,
        license="apache-2.0", checkpoint_file=file,
        checkpoint_url=f"{DINOV2_BASE_URL}/dinov2_{arch}/{file}",
        checkpoint_sha256=sha256, checkpoint_size=size,
    )


def _dinov3_vit(arch: str, timm_arch: str, dim: int, depth: int, params: int, hash8: str, *,
                sat: bool = False, swiglu: bool = False) -> BackboneSpec:
    data = "sat493m" if sat else "lvd1689m"
    file = f"dinov3_{arch}_pretrain_{data}-{hash8}.pth"
    return BackboneSpec(
        name=f"dinov3_{arch}{'_sat' if sat else ''}",
        timm_id=f"{timm_arch}.{data}",
        family="dinov3", kind="vit", patch_size=16, embed_dim=dim, depth=depth, num_params=params,
        mean=SAT493M_MEAN if sat else IMAGENET_MEAN, std=SAT493M_STD if sat else IMAGENET_STD,
        default_image_size=DEFAULT_IMAGE_SIZE, num_prefix_tokens=5, mlp="swiglu" if swiglu else "mlp",
        pretrain_image_size=256, license="dinov3-license", checkpoint_file=file,
        checkpoint_url=f"{DINOV3_BASE_URL}/dinov3_{arch}/{file}",
    )


def _dinov3_convnext(size: str, dim: int, depth: int, params: int, hash8: str) -> BackboneSpec:
    file = f"dinov3_convnext_{size}_pretrain_lvd1689m-{hash8}.pth"
    return BackboneSpec(
        name=f"dinov3_convnext_{size}", timm_id=f"convnext_{size}.dinov3_lvd1689m",
        family="dinov3", kind="convnet", patch_size=32, embed_dim=dim, depth=depth,
        num_params=params, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_image_size=DEFAULT_IMAGE_SIZE, num_prefix_tokens=0, license="dinov3-license",
        checkpoint_file=file, checkpoint_url=f"{DINOV3_BASE_URL}/dinov3_convnext_{size}/{file}",
    )


# `_qkvb` variants keep DINOv3's q/v biases (the official checkpoints carry them; the plain timm
# variants drop them on load). ViT-7B has no qkv bias upstream, hence no `_qkvb` variant.
_REGISTRY: tuple[BackboneSpec, ...] = (
    _dinov2("vits14", "vit_small", 384, 12, 22_056_192, reg=False,
            sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9", size=88_283_115),
    _dinov2("vitb14", "vit_base", 768, 12, 86_579_712, reg=False,
            sha256="0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73"),
    _dinov2("vitl14", "vit_large", 1024, 24, 304_367_616, reg=False),
    _dinov2("vitg14", "vit_giant", 1536, 40, 1_136_479_232, reg=False),
    _dinov2("vits14", "vit_small", 384, 12, 22_057_344, reg=True,
            sha256="f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb", size=88_291_785),
    _dinov2("vitb14", "vit_base", 768, 12, 86_582_016, reg=True),
    _dinov2("vitl14", "vit_large", 1024, 24, 304_370_688, reg=True),
    _dinov2("vitg14", "vit_giant", 1536, 40, 1_136_483_840, reg=True),
    _dinov3_vit("vits16", "vit_small_patch16_dinov3_qkvb", 384, 12, 21_596_160, "08c60483"),
    _dinov3_vit("vits16plus", "vit_small_plus_patch16_dinov3_qkvb", 384, 12, 28_692_480, "4057cbaa",
                swiglu=True),
    _dinov3_vit("vitb16", "vit_base_patch16_dinov3_qkvb", 768, 12, 85_659_648, "73cec8be"),
    _dinov3_vit("vitl16", "vit_large_patch16_dinov3_qkvb", 1024, 24, 303_128_576, "8aa4cbdd"),
    _dinov3_vit("vith16plus", "vit_huge_plus_patch16_dinov3_qkvb", 1280, 32, 840_591_360, "7c1da9a5",
                swiglu=True),
    _dinov3_vit("vit7b16", "vit_7b_patch16_dinov3", 4096, 40, 6_716_030_976, "a955f4ea", swiglu=True),
    _dinov3_vit("vitl16", "vit_large_patch16_dinov3_qkvb", 1024, 24, 303_128_576, "eadcf0ff",
                sat=True),
    _dinov3_vit("vit7b16", "vit_7b_patch16_dinov3", 4096, 40, 6_716_030_976, "a6675841",
                sat=True, swiglu=True),
    _dinov3_convnext("tiny", 768, 18, 27_820_128, "21b726bb"),
    _dinov3_convnext("small", 768, 36, 49_454_688, "296db49d"),
    _dinov3_convnext("base", 1024, 36, 87_566_464, "801f2ba9"),
    _dinov3_convnext("large", 1536, 36, 196_230_336, "61fa432d"),
    # ACT's default backbone: torchvision's ImageNet ResNet-18 (timm `resnet18.tv_in1k` is that file).
    BackboneSpec(
        name="resnet18", timm_id="resnet18.tv_in1k", family="resnet", kind="convnet",
        patch_size=32, embed_dim=512, depth=8, num_params=11_176_512, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, default_image_size=DEFAULT_IMAGE_SIZE, num_prefix_tokens=0,
        license="bsd-3-clause", checkpoint_file="resnet18-f37072fd.pth",
        checkpoint_url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
)

_BY_NAME: dict[str, BackboneSpec] = {spec.name: spec for spec in _REGISTRY}


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in table order (``timm:`` models are not listed)."""
    return list(_REGISTRY)


def registered_spec(name: str) -> BackboneSpec:
    """Look a backbone up by its registered name; an unknown one is refused naming the closest."""
    try:
        return _BY_NAME[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"registered: {', '.join(_BY_NAME)}"
        raise BackboneError(
            f"unknown backbone {name!r} ({hint}; any other timm model as timm:<model-name>; "
            "see `dinocache backbones`)"
        ) from None
