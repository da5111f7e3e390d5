"""Named ACT head presets, one per backbone configuration dinocache is designed around.

A preset pins the backbone the feature store must have been built with and the head
hyperparameters that differ from LeRobot's ACT defaults for it. ``dinocache train --preset NAME``
applies the overrides on top of :class:`~dinocache.policy.model.config.ACTConfig` and refuses a store
whose backbone is a different one (a head's hyperparameters, and above all a trained head, only
make sense for the features it was designed for). The reasoning behind each choice is in
``docs/act.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from dinocache.errors import DinocacheError
from dinocache.policy.model.config import ACTConfig

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "get_preset", "apply_preset", "check_preset_backbone"]


@dataclass(frozen=True)
class Preset:
    """A backbone plus the ACT head overrides that go with it.

    Args:
        name: Preset name as given on the command line.
        backbone: Registered backbone name the store must have been extracted with.
        config_overrides: :class:`ACTConfig` fields to change from LeRobot's defaults.
        description: One line for ``--help`` and listings.
    """

    name: str
    backbone: str
    config_overrides: Mapping[str, Any]
    description: str

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(ACTConfig)}
        unknown = sorted(set(self.config_overrides) - known)
        if unknown:
            raise ValueError(
                f"Preset {self.name!r} overrides unknown ACTConfig field(s): {', '.join(unknown)}."
            )
        # Read-only, so a caller cannot change a shared preset for everyone else.
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides)))


def _presets(*presets: Preset) -> Mapping[str, Preset]:
    return MappingProxyType({preset.name: preset for preset in presets})


# Register variants add the CLS token. Registers take over the global information that plain
# DINOv2 dumps into a few high-norm background patches (Darcet et al. 2024, "Vision Transformers Need
# Registers"), so their patch grid is cleaner and more local, and the global summary lives outside
# the grid: the CLS token gives it back to the head for one extra token per camera. Plain `dinov2`
# stays exactly LeRobot's ACT on a feature map, as the reference point.
PRESETS: Mapping[str, Preset] = _presets(
    Preset(
        name="dinov2",
        backbone="dinov2_vits14",
        config_overrides={},
        description="DINOv2 ViT-S/14 (384-d), LeRobot's ACT defaults.",
    ),
    Preset(
        name="dinov2-reg",
        backbone="dinov2_vits14_reg",
        config_overrides={"use_cls_token": True},
        description="DINOv2 ViT-S/14 with registers (384-d) plus the CLS token. Recommended.",
    ),
    Preset(
        name="dinov2-reg-large",
        backbone="dinov2_vitl14_reg",
        config_overrides={"use_cls_token": True},
        description="DINOv2 ViT-L/14 with registers (1024-d) plus the CLS token; 2.7x the cache of ViT-S.",
    ),
    Preset(
        name="dinov3-small",
        backbone="dinov3_vits16",
        config_overrides={"use_cls_token": True},
        description="DINOv3 ViT-S/16 (384-d, has registers) plus the CLS token.",
    ),
    Preset(
        name="dinov3-base",
        backbone="dinov3_vitb16",
        config_overrides={"use_cls_token": True},
        description="DINOv3 ViT-B/16 (768-d, has registers) plus the CLS token.",
    ),
)

DEFAULT_PRESET = "dinov2-reg"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`DinocacheError` listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DinocacheError(
            f"Unknown preset {name!r}. Available presets: {', '.join(PRESETS)}."
        ) from None


def apply_preset(preset: Preset, config: ACTConfig | None = None) -> ACTConfig:
    """A new :class:`ACTConfig`: ``config`` (default: LeRobot's defaults) with the preset's overrides.

    The input config is not modified. The result is validated, so a preset that clashes with the
    caller's settings fails here rather than at the first forward pass.
    """
    return dataclasses.replace(config if config is not None else ACTConfig(), **preset.config_overrides)


def check_preset_backbone(preset: Preset, store_backbone_name: str) -> None:
    """Raise :class:`DinocacheError` if the store was extracted with another backbone than the preset's."""
    if store_backbone_name != preset.backbone:
        matching = [p.name for p in PRESETS.values() if p.backbone == store_backbone_name]
        hint = (
            f" Use --preset {' or '.join(matching)}, or re-extract with --backbone {preset.backbone}."
            if matching
            else f" Re-extract the dataset with --backbone {preset.backbone}, "
            "or train this store without --preset."
        )
        raise DinocacheError(
            f"Preset {preset.name!r} is for backbone {preset.backbone!r}, but the feature store was built "
            f"with {store_backbone_name!r}.{hint}"
        )
