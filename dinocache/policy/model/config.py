"""Configuration of the ACT head: hyperparameters (:class:`ACTConfig`) and input shapes (:class:`ACTInputs`).

The two are kept apart on purpose. :class:`ACTConfig` is what a user tunes and what a preset
overrides; its field names and defaults are LeRobot's ``ACTConfig`` ones, so a LeRobot user can
carry numbers across unchanged. :class:`ACTInputs` is not tuned at all: it is read off a feature
store (which cameras, what grid each one has, how wide state and action are) and only describes
the tensors the head will be fed.

Both serialise to plain JSON-compatible dicts so a training run can write them next to its
checkpoint and the exporter can rebuild the exact same head later.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

# Batch keys shared by the head, the training loop and the live policy (defined in dinocache.keys).
# Camera tensors are keyed per camera name (see :meth:`ACTInputs.feature_key` / :meth:`ACTInputs.cls_key`).
from dinocache.keys import ACTION, ACTION_IS_PAD, CLS_PREFIX, FEATURES_PREFIX, OBS_ENV_STATE, OBS_STATE  # noqa: F401

FEEDFORWARD_ACTIVATIONS = ("relu", "gelu", "glu")


def _positive_int(value: Any, what: str) -> int:
    """``value`` as a plain int, or ValueError naming ``what`` (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer. Got {value!r}.")
    return int(value)


def _field(default: Any, help: str) -> Any:
    """A dataclass field with its ``--help`` text, written where the field is declared."""
    return dataclasses.field(default=default, metadata={"help": help})


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``data``, refusing keys it does not know.

    Missing keys fall back to the field defaults (so a config written by an older version still
    loads); unknown keys are an error rather than silently dropped, because a misspelt
    hyperparameter that is ignored is the kind of bug that costs a week of training.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. "
            f"Known fields: {', '.join(sorted(names))}."
        )
    return cls(**dict(data))


@dataclass
class ACTConfig:
    """Hyperparameters of the ACT head, with LeRobot's names and defaults.

    LeRobot's defaults are tuned for the bimanual ALOHA tasks (ResNet18 features, 50 Hz control).
    Vision-backbone fields are absent (the backbone is frozen and was run when the store was built,
    so the head only sees its cached patch grids), except ``optimizer_lr_backbone``, which only the
    online baseline of :mod:`dinocache.policy.training.online` uses when it fine-tunes ACT's ResNet18.

    Each field's help is written in its declaration (``metadata["help"]``); ``dinocache train``
    makes one option of every field from it.
    """

    # Input / output structure.
    n_obs_steps: int = _field(1, "Observation steps given to the policy. Only 1 is supported (as in LeRobot).")
    chunk_size: int = _field(100, "Length of the predicted action chunk, in environment steps.")
    n_action_steps: int = _field(100, "Actions executed from each predicted chunk before the model is queried "
                                      "again. At most chunk_size; must be 1 with temporal ensembling.")

    # Transformer.
    dim_model: int = _field(512, "Hidden width of every transformer block. Must be divisible by n_heads and by 4 "
                                 "(the 2D sinusoidal embedding splits it into sin/cos halves for rows and columns).")
    n_heads: int = _field(8, "Attention heads per multi-head attention.")
    dim_feedforward: int = _field(3200, "Width of the transformer feed-forward layers.")
    feedforward_activation: str = _field("relu", '"relu" (ACT), "gelu" or "glu".')
    pre_norm: bool = _field(False, "LayerNorm before (True) or after (False, ACT/DETR) each residual block.")
    n_encoder_layers: int = _field(4, "Layers of the transformer encoder over the observation tokens.")
    # The original ACT repository configures 7 decoder layers but, through a bug, only ever uses
    # the output of the first one; LeRobot therefore defaults to 1. dinocache runs every layer.
    n_decoder_layers: int = _field(1, "Layers of the transformer decoder. All of them are used; see the note on "
                                      "the original ACT code in docs/act.md.")

    # CVAE.
    use_vae: bool = _field(True, "Train with the CVAE objective (a second transformer encodes the target action "
                                 "chunk into a style latent). At inference the latent is always zero.")
    latent_dim: int = _field(32, "Size of the CVAE latent.")
    n_vae_encoder_layers: int = _field(4, "Layers of the CVAE encoder.")

    # Inference. The ACT paper uses 0.01 when temporal ensembling is on.
    temporal_ensemble_coeff: float | None = _field(None, "None disables temporal ensembling; the ACT paper uses "
                                                         "0.01. Requires n_action_steps == 1 since the model must be "
                                                         "queried at every step.")

    # Training and loss.
    dropout: float = _field(0.1, "Dropout in every transformer block.")
    kl_weight: float = _field(10.0, "Weight of the KL term: loss = l1 + kl_weight * kld.")
    optimizer_lr: float = _field(1e-5, "AdamW learning rate.")
    optimizer_lr_backbone: float = _field(1e-5, "AdamW learning rate of a vision backbone trained online (ACT's "
                                                "ResNet18 in dinocache.policy.training.online); unused when training on "
                                                "cached features.")
    optimizer_weight_decay: float = _field(1e-4, "AdamW weight decay.")
    grad_clip_norm: float = _field(10.0, "Gradient-norm clip applied by the training loop (LeRobot's train default); "
                                         "0 turns clipping off, as in LeRobot.")

    # dinocache addition: the backbone's CLS vector as an extra token per camera.
    use_cls_token: bool = _field(False, "Also feed each camera's cached CLS vector as one extra encoder token.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings (LeRobot's checks plus shape sanity)."""
        positive = (
            "chunk_size", "n_action_steps", "dim_model", "n_heads", "dim_feedforward",
            "n_encoder_layers", "n_decoder_layers", "latent_dim",
        )
        for name in positive:
            _positive_int(getattr(self, name), f"`{name}`")
        if self.use_vae:
            _positive_int(self.n_vae_encoder_layers, "`n_vae_encoder_layers` (with `use_vae`)")
        if self.n_obs_steps != 1:
            raise ValueError(
                f"Multiple observation steps are not supported: `n_obs_steps` must be 1. "
                f"Got {self.n_obs_steps}."
            )
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"The chunk size is the upper bound for the number of action steps per model "
                f"invocation. Got {self.n_action_steps} for `n_action_steps` and {self.chunk_size} "
                f"for `chunk_size`."
            )
        if self.temporal_ensemble_coeff is not None and self.n_action_steps != 1:
            raise ValueError(
                f"`n_action_steps` must be 1 when using temporal ensembling "
                f"(`temporal_ensemble_coeff={self.temporal_ensemble_coeff}`), because the policy has "
                f"to be queried every step to compute the ensembled action. Got "
                f"`n_action_steps={self.n_action_steps}`."
            )
        if self.dim_model % self.n_heads != 0:
            raise ValueError(
                f"`dim_model` ({self.dim_model}) must be divisible by `n_heads` ({self.n_heads})."
            )
        if self.dim_model % 4 != 0:
            raise ValueError(
                f"`dim_model` must be divisible by 4 for the 2D sinusoidal position embedding "
                f"(sin/cos for rows and for columns). Got {self.dim_model}."
            )
        if self.feedforward_activation not in FEEDFORWARD_ACTIVATIONS:
            raise ValueError(
                f"`feedforward_activation` must be one of {', '.join(FEEDFORWARD_ACTIVATIONS)}. "
                f"Got {self.feedforward_activation!r}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Got {self.dropout}.")
        if not self.kl_weight >= 0 or not math.isfinite(self.kl_weight):  # NaN fails every comparison
            raise ValueError(f"`kl_weight` must be non-negative. Got {self.kl_weight}.")
        if not 0 < self.optimizer_lr < math.inf:
            raise ValueError(f"`optimizer_lr` must be positive. Got {self.optimizer_lr}.")
        for name in ("optimizer_lr_backbone", "optimizer_weight_decay", "grad_clip_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"`{name}` must be non-negative{' (0: no clipping)' if name == 'grad_clip_norm' else ''}. "
                                 f"Got {getattr(self, name)}.")
        if self.temporal_ensemble_coeff is not None and not math.isfinite(self.temporal_ensemble_coeff):
            raise ValueError(f"`temporal_ensemble_coeff` must be a finite number or None. Got {self.temporal_ensemble_coeff}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ACTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing ones take defaults."""
        return _from_dict(cls, data)


@dataclass
class ACTInputs:
    """Shapes of the tensors the head is fed, as read from a feature store.

    Args:
        cameras: ``(name, C, h, w)`` for each camera's cached patch grid, in store order. The order
            fixes the token order and the per-camera embedding index, so it must not change between
            training and inference.
        state_dim: Width of ``observation.state``.
        action_dim: Width of ``action``.
        env_state_dim: Width of ``observation.environment_state``, or None when there is none.
    """

    cameras: list[tuple[str, int, int, int]]
    state_dim: int
    action_dim: int
    env_state_dim: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the shapes and normalise them to plain ints and ``(name, C, h, w)`` tuples.

        Shapes often come from numpy arrays (numpy integers are accepted and converted, so the
        result stays JSON-serialisable), and a JSON round trip turns the camera tuples into lists.
        Raises ValueError unless every dimension is positive and camera names are unique.
        """
        if not self.cameras and self.env_state_dim is None:
            raise ValueError(
                "The ACT head needs at least one camera or an environment state among its inputs."
            )
        cameras: list[tuple[str, int, int, int]] = []
        for camera in self.cameras:
            if len(camera) != 4:
                raise ValueError(f"Each camera must be (name, C, h, w). Got {camera!r}.")
            name, channels, height, width = camera
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Camera names must be non-empty strings without '.'. Got {name!r}.")
            what = f"Camera {name!r} (C, h, w) = {(channels, height, width)}:"
            cameras.append((name, *(_positive_int(d, what) for d in (channels, height, width))))
        names = [camera[0] for camera in cameras]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Camera names must be unique. Repeated: {', '.join(duplicates)}.")
        self.cameras = cameras
        self.state_dim = _positive_int(self.state_dim, "`state_dim`")
        self.action_dim = _positive_int(self.action_dim, "`action_dim`")
        if self.env_state_dim is not None:
            self.env_state_dim = _positive_int(self.env_state_dim, "`env_state_dim` (or None)")

    @property
    def camera_names(self) -> list[str]:
        """Camera names in store order."""
        return [camera[0] for camera in self.cameras]

    @staticmethod
    def feature_key(camera: str) -> str:
        """Batch key of a camera's patch grid, ``features.<camera>``."""
        return FEATURES_PREFIX + camera

    @staticmethod
    def cls_key(camera: str) -> str:
        """Batch key of a camera's CLS vector, ``cls.<camera>``."""
        return CLS_PREFIX + camera

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (cameras become lists)."""
        data = dataclasses.asdict(self)
        data["cameras"] = [list(camera) for camera in self.cameras]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ACTInputs:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        return _from_dict(cls, data)
