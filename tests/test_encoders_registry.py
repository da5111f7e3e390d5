"""Registry: names, specs derived from timm, the `dinocache backbones` table, shapes of every backbone.

Shape tests build every registered backbone and run uint8 frames through it at 224, 448 and a
non-square size on the ``meta`` device (no memory, no data; timm's real forward code still runs,
so the shapes are the real ones). The small models (ViT-S/14 with and without registers, ViT-S/16,
ViT-S+/16, ConvNeXt-T, ResNet-18) also run for real on the CPU, at non-square sizes, in
``test_encoders_weights.py`` and ``test_encoders_backbone.py``.
The non-square size is 224x320 for patch 16 and stride 32, and 224x322 for patch 14 (320 is not a
multiple of 14; 322 = 23 * 14).
"""

from __future__ import annotations

import pytest
import timm
import torch

from dinocache.encoders.backbone import build_timm_model, create_backbone
from dinocache.cli.extract import backbone_table
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.registry import list_backbones
from dinocache.errors import BackboneError

EXPECTED_NAMES = {
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
    "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
    "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus",
    "dinov3_vit7b16", "dinov3_vitl16_sat", "dinov3_vit7b16_sat",
    "dinov3_convnext_tiny", "dinov3_convnext_small", "dinov3_convnext_base", "dinov3_convnext_large",
    "resnet18",
}


def _sizes(patch: int) -> list[tuple[int, int]]:
    return [(224, 224), (448, 448), (224, 320) if 320 % patch == 0 else (224, 322)]


def test_registered_names_are_exactly_the_documented_ones():
    assert {spec.name for spec in list_backbones()} == EXPECTED_NAMES


@pytest.mark.parametrize("spec", list_backbones(), ids=lambda s: s.name)
def test_spec_matches_the_timm_model(spec):
    """Registry data (params, width, tokens, patch) agrees with the timm model it names."""
    assert timm.is_model(spec.timm_id.split(".")[0])
    assert spec.timm_id in timm.list_pretrained(spec.timm_id)
    model = build_timm_model(spec, init="meta")  # at the pretraining size, as the table counts
    assert sum(p.numel() for p in model.parameters()) == spec.num_params
    assert model.num_features == spec.embed_dim
    assert tuple(model.pretrained_cfg["mean"]) == spec.mean
    assert tuple(model.pretrained_cfg["std"]) == spec.std
    if spec.kind == "vit":
        assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
        assert model.num_prefix_tokens == spec.num_prefix_tokens
        assert len(model.blocks) == spec.depth
    else:
        assert model.feature_info[-1]["reduction"] == spec.patch_size


def test_dinov3_uses_qkv_bias_variants_where_timm_has_them():
    for spec in list_backbones():
        if spec.family == "dinov3" and spec.kind == "vit":
            qkvb = spec.timm_id.replace("_dinov3.", "_dinov3_qkvb.")
            has_qkvb = timm.is_model(qkvb.split(".")[0])
            assert ("_qkvb" in spec.timm_id) == has_qkvb, spec.name


def test_satellite_models_use_their_own_statistics():
    for name in ("dinov3_vitl16_sat", "dinov3_vit7b16_sat"):
        spec = get_backbone_spec(name)
        assert spec.mean == (0.430, 0.411, 0.296) and spec.std == (0.213, 0.156, 0.143)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(BackboneError, match="dinov2_vits14_reg") as info:
        get_backbone_spec("dinov2_vits14_regs")
    assert "unknown backbone 'dinov2_vits14_regs'" in str(info.value)


def test_timm_prefix_derives_a_spec():
    vit = get_backbone_spec("timm:vit_tiny_patch16_224.augreg_in21k")
    assert (vit.family, vit.kind, vit.patch_size, vit.embed_dim, vit.num_prefix_tokens) == \
        ("timm", "vit", 16, 192, 1)
    assert vit.default_image_size == 224 and vit.depth == 12
    cnn = get_backbone_spec("timm:resnet34")
    assert (cnn.kind, cnn.patch_size, cnn.embed_dim, cnn.num_prefix_tokens) == ("convnet", 32, 512, 0)
    with pytest.raises(BackboneError, match="unknown timm model 'vit_tiny_patch16_2244'"):
        get_backbone_spec("timm:vit_tiny_patch16_2244")


def test_timm_prefix_builds_and_runs():
    backbone = create_backbone("timm:vit_tiny_patch16_224", weights="random", image_size=64)
    grid, cls = backbone(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert grid.shape == (1, 192, 4, 4) and cls.shape == (1, 192)


def test_backbone_table_grid_and_bytes():
    table = backbone_table("224x320").splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:] if line and line.split()[0] in EXPECTED_NAMES}
    assert set(rows) == EXPECTED_NAMES
    # patch 14 does not divide 320: '-' rather than an error
    assert rows["dinov2_vits14"][-2:] == ["-", "-"]
    # 14x20 grid of 384 channels in float16, plus the CLS token
    assert rows["dinov3_vits16"][-2:] == ["14x20", f"{14 * 20 * 384 * 2 + 384 * 2:,}"]
    assert rows["resnet18"][-2] == "7x10"
    square = {line.split()[0]: line.split() for line in backbone_table(448).splitlines()[2:] if line}
    assert square["dinov2_vitg14_reg"][-2:] == ["32x32", f"{32 * 32 * 1536 * 2 + 1536 * 2:,}"]
    assert "0.430,0.411,0.296 / 0.213,0.156,0.143" in " ".join(square["dinov3_vitl16_sat"])


def test_backbone_table_refuses_a_malformed_size():
    with pytest.raises(BackboneError, match="not N or HxW"):
        backbone_table("224by320")


@pytest.mark.parametrize("spec", list_backbones(), ids=lambda s: s.name)
def test_every_backbone_yields_the_grid_of_its_patch_size(spec):
    for height, width in _sizes(spec.patch_size):
        backbone = create_backbone(spec.name, weights="random", image_size=(height, width), device="meta")
        grid, cls = backbone(torch.empty(1, height, width, 3, dtype=torch.uint8, device="meta"))
        h, w = height // spec.patch_size, width // spec.patch_size
        assert backbone.grid_size == (h, w)
        assert grid.shape == (1, spec.embed_dim, h, w), (spec.name, height, width)
        assert cls.shape == (1, spec.embed_dim)
        assert grid.dtype == cls.dtype == torch.float32
