"""The ``dinocache`` policy type's configuration: LeRobot's ACT options, any backbone dinocache registers.

LeRobot's own ``ACTConfig`` refuses every ``vision_backbone`` that does not start with ``resnet``;
this one takes every name ``dinocache backbones`` lists (``dinov3_vitb16``, ``dinov2_vits14_reg``,
``resnet18``, ``timm:<model>``). The ACT fields are not restated here: the class inherits them,
with their LeRobot names and defaults, from :class:`dinocache.policy.model.config.ACTConfig`, the one
definition the cached head, ``dinocache train`` and the exported policy also use. What is added
is what LeRobot's ACT config has beside them (``vision_backbone``, ``pretrained_backbone_weights``,
the normalisation mapping) and what dinocache adds (``freeze_backbone``, ``image_size``,
``feature_cache``, ``preset``).

Registered with ``PreTrainedConfig.register_subclass("dinocache")``, so ``--policy.type=dinocache``
selects it, and by LeRobot's naming rules the policy is ``DinocachePolicy`` in the sibling
``modeling_dinocache`` module and the processors come from ``make_dinocache_pre_post_processors``
in ``processor_dinocache``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dinocache.encoders.image_size import parse_image_size
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.preprocess import PreprocessConfig
from dinocache.errors import DinocacheError
from dinocache.policy.model.config import ACTConfig
from dinocache.policy.model.presets import DEFAULT_PRESET, get_preset
from lerobot.configs import NormalizationMode, PreTrainedConfig
from lerobot.optim import AdamWConfig
from lerobot.utils.constants import OBS_STATE

__all__ = ["DinocacheConfig", "POLICY_TYPE"]

#: ``--policy.type`` of this plugin.
POLICY_TYPE = "dinocache"

_ACT_DEFAULTS = ACTConfig()


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class DinocacheConfig(PreTrainedConfig, ACTConfig):
    """ACT on a dinocache backbone, trained in LeRobot's loop (``lerobot-train --policy.type=dinocache``).

    Every :class:`dinocache.policy.model.config.ACTConfig` field is a field here (``chunk_size``,
    ``n_action_steps``, ``dim_model``, ``n_heads``, ``kl_weight``, ``optimizer_lr``,
    ``optimizer_lr_backbone``, ``temporal_ensemble_coeff``, ``use_cls_token``, ...). Besides them:

    * ``vision_backbone``: a name ``dinocache backbones`` lists. Unset: the ``preset``'s backbone.
    * ``preset``: one of dinocache's presets (``dinov2``, ``dinov2-reg``, ``dinov3-base``, ...): its
      backbone, and its ACT overrides for the fields left at LeRobot's defaults (as ``dinocache
      train --preset`` does). With neither preset nor backbone given, ``dinov2-reg``.
    * ``pretrained_backbone_weights``: ``auto`` (dinocache's lookup: ``$DINOCACHE_WEIGHTS``, the
      Hugging Face cache, else one line saying which file to get), a checkpoint path, or ``random``
      (seeded by ``backbone_seed``; for tests, and recorded as such). A policy loaded from a
      pretrained folder takes its backbone from that folder's ``model.safetensors`` instead.
    * ``freeze_backbone``: True keeps the backbone frozen (eval mode, no gradients); False trains it
      at ``optimizer_lr_backbone`` (ACT's recipe for ResNet18: FrozenBatchNorm, every conv trains).
    * ``image_size``: what frames are resized to before the backbone, ``224`` or ``224x320``
      (unset: the backbone's default); ``center_crop``: scale to cover it and crop the centre
      instead (``dinocache extract --center-crop``).
    * ``feature_cache``: a feature store of the training dataset made by ``dinocache extract`` with
      this backbone, weights and image size. Training then looks each frame's features up by the
      batch's ``index`` instead of running the frozen backbone; a store of another dataset,
      backbone, weights or image size is refused, naming the difference.

    Images are not normalised by the processors (``VISUAL: IDENTITY``): the backbone's own
    preprocessing, the one extraction and the exported policy run, does it.
    """

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )
    preset: str | None = None
    vision_backbone: str | None = None
    pretrained_backbone_weights: str = "auto"
    backbone_seed: int = 0
    freeze_backbone: bool = True
    image_size: str | None = None
    center_crop: bool = False
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        PreTrainedConfig.__post_init__(self)
        try:
            self._resolve_preset()
            spec = get_backbone_spec(self.vision_backbone)
            size = PreprocessConfig.for_backbone(spec, self.image_size, self.center_crop).image_size
        except DinocacheError as err:
            raise ValueError(f"dinocache policy: {err}") from None
        self.image_size = f"{size[0]}x{size[1]}"  # one spelling, whatever was given (224, "224", (224, 224))
        if self.feature_cache is not None and not self.freeze_backbone:
            raise ValueError(f"dinocache policy: feature_cache={self.feature_cache!r} holds the frozen backbone's "
                             "features, and a backbone that trains (freeze_backbone=false) must run on every batch: "
                             "drop feature_cache or set freeze_backbone=true")
        ACTConfig.validate(self)

    def _resolve_preset(self) -> None:
        """The preset's backbone and overrides, as ``dinocache train --preset`` applies them: a field the
        user left at LeRobot's default takes the preset's value; a different backbone is refused."""
        if self.preset is None and self.vision_backbone is None:
            self.preset = DEFAULT_PRESET
        if self.preset is None:
            return
        preset = get_preset(self.preset)
        if self.vision_backbone is None:
            self.vision_backbone = preset.backbone
        elif self.vision_backbone != preset.backbone:
            raise DinocacheError(f"preset {preset.name!r} is for vision_backbone {preset.backbone!r}, not "
                                 f"{self.vision_backbone!r}: drop one of the two")
        for name, value in preset.config_overrides.items():
            if getattr(self, name) == getattr(_ACT_DEFAULTS, name):
                setattr(self, name, value)

    @property
    def image_hw(self) -> tuple[int, int]:
        """``image_size`` as ``(height, width)``."""
        return parse_image_size(self.image_size)

    def act_config(self) -> ACTConfig:
        """The head's hyperparameters, as dinocache's own :class:`ACTConfig` (what the head is built from)."""
        return ACTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ACTConfig)})

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=self.optimizer_lr, weight_decay=self.optimizer_weight_decay,
                           grad_clip_norm=self.grad_clip_norm)

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        """The head reads the robot state, and at least one camera or the environment state."""
        if not self.robot_state_feature:
            raise ValueError(f"dinocache policy: the ACT head reads {OBS_STATE!r}, which is not among the input "
                             f"features ({', '.join(self.input_features or {}) or 'none'})")
        if not self.image_features and not self.env_state_feature:
            raise ValueError("dinocache policy: give at least one image or the environment state among the inputs")

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None
