"""Presets: names, backbones, overrides, and the backbone check."""

from __future__ import annotations

import pytest

from dinocache.errors import DinocacheError
from dinocache.policy.model.config import ACTConfig
from dinocache.policy.model.presets import (
    DEFAULT_PRESET,
    PRESETS,
    Preset,
    apply_preset,
    check_preset_backbone,
    get_preset,
)


def test_preset_names_and_backbones():
    assert {name: preset.backbone for name, preset in PRESETS.items()} == {
        "dinov2": "dinov2_vits14",
        "dinov2-reg": "dinov2_vits14_reg",
        "dinov2-reg-large": "dinov2_vitl14_reg",
        "dinov3-small": "dinov3_vits16",
        "dinov3-base": "dinov3_vitb16",
    }
    assert DEFAULT_PRESET == "dinov2-reg"
    assert all(preset.description for preset in PRESETS.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_yields_a_valid_config(name):
    config = apply_preset(get_preset(name))
    assert isinstance(config, ACTConfig)
    config.validate()


def test_unknown_preset_lists_the_names():
    names = "dinov2, dinov2-reg, dinov2-reg-large, dinov3-small, dinov3-base"
    with pytest.raises(DinocacheError, match=f"'dinov5'.*{names}"):
        get_preset("dinov5")


def test_apply_preset_overrides_without_mutating():
    base = ACTConfig(chunk_size=50, n_action_steps=25)
    config = apply_preset(get_preset("dinov2-reg"), base)
    assert config.use_cls_token is True
    assert (config.chunk_size, config.n_action_steps) == (50, 25)  # the caller's settings survive
    assert base.use_cls_token is False
    assert apply_preset(get_preset("dinov2")) == ACTConfig()


def test_apply_preset_validates_the_result():
    preset = Preset("tiny", "dinov2_vits14", {"chunk_size": 10}, "test")
    with pytest.raises(ValueError, match="upper bound"):
        apply_preset(preset)  # default n_action_steps=100 > chunk_size=10


def test_presets_are_read_only_and_checked():
    with pytest.raises(TypeError):
        get_preset("dinov2-reg").config_overrides["use_cls_token"] = False  # type: ignore[index]
    with pytest.raises(ValueError, match="chunksize"):
        Preset("bad", "dinov2_vits14", {"chunksize": 10}, "typo")


def test_backbone_mismatch_names_both_backbones():
    preset = get_preset("dinov2-reg")
    check_preset_backbone(preset, "dinov2_vits14_reg")
    with pytest.raises(DinocacheError, match="'dinov2_vits14_reg'.*'dinov2_vits14'.*--preset dinov2\\b"):
        check_preset_backbone(preset, "dinov2_vits14")
    with pytest.raises(DinocacheError, match="'dinov2_vits14_reg'.*'resnet18'"):
        check_preset_backbone(preset, "resnet18")
