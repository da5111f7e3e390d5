"""The fused live policy: camera frames and raw robot state in, an un-normalised action chunk out.

Training never sees an image: the head learns on features cached by stage one. On the robot there
is no cache, so :class:`FusedPolicy` puts back in front of the head the exact pieces extraction ran,
as modules and not as re-implementations: the store's :class:`~dinocache.encoders.FrozenBackbone`
(its :class:`~dinocache.encoders.ImagePreprocessor` included) rebuilt from the recorded provenance,
then the trained :class:`~dinocache.policy.model.act.ACTHead` between the :class:`Normalizer` that
normalises the state and un-normalises the actions. It has no data-dependent control flow, so it
exports whole with ``torch.export`` and to ONNX.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from dinocache.encoders.backbone import FrozenBackbone
from dinocache.errors import DinocacheError
from dinocache.policy.deployment.formats import COMPUTE_DTYPES
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.checkpoint import LAST, PolicySpec, checkpoint_step, load_head, resolve_checkpoint
from dinocache.policy.model.config import ACTION, OBS_ENV_STATE, OBS_STATE, ACTInputs
from dinocache.policy.model.features import camera_features
from dinocache.policy.model.normalize import Normalizer
from dinocache.policy.model.provenance import rebuild_backbone
from dinocache.policy.model.trainable import load_trained_backbone

__all__ = ["FusedPolicy", "build_fused_policy", "parse_dtype", "DTYPES"]

#: Compute precisions of the fused policy, by the name ``--dtype`` takes.
DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``'float16'`` / ``torch.float16`` -> ``torch.float16``; anything but the three is refused."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise DinocacheError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


class FusedPolicy(nn.Module):
    """Backbone (with its preprocessing) + normaliser + ACT head as one inference-only module.

    ``forward(images, state, env_state=None)``:

    * ``images``: a list (or tuple) with one uint8 ``(B, H, W, 3)`` tensor per camera, in the
      store's camera order (:attr:`cameras`), at the camera's native size; the backbone's own
      preprocessing resizes / crops them exactly as extraction did.
    * ``state``: raw (not normalised) ``observation.state``, float ``(B, state_dim)``.
    * ``env_state``: raw ``observation.environment_state`` ``(B, env_state_dim)``, required when the
      store had one (:attr:`has_env_state`), else not given.

    Returns the un-normalised action chunk, float32 ``(B, chunk_size, action_dim)``.

    ``compute_dtype`` other than float32 runs backbone and head under autocast to that dtype (the
    weights stay float32), which is how extraction's ``--precision`` and training on CUDA run too.
    The module is always in eval mode: the CVAE encoder never runs (:func:`build_fused_policy`
    removes it), the latent is zero.
    """

    def __init__(self, backbone: FrozenBackbone, head: ACTHead, normalizer: Normalizer, spec: PolicySpec,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalizer = normalizer
        self.spec = spec
        self.compute_dtype = compute_dtype
        #: Dataset camera keys (``observation.images.top``) in store order, one image each.
        self.cameras: list[str] = [spec.camera_keys[name] for name in spec.inputs.camera_names]
        self.has_env_state = spec.inputs.env_state_dim is not None
        #: Where the head came from (set by :func:`build_fused_policy`).
        self.checkpoint_path: Path | None = None
        self.step: int | None = None
        self.eval()

    def train(self, mode: bool = True) -> FusedPolicy:
        """Stay in eval mode whatever the caller asks: the live policy never trains."""
        return super().train(False)

    @property
    def inputs(self) -> ACTInputs:
        return self.spec.inputs

    def forward(self, images: Sequence[Tensor], state: Tensor, env_state: Tensor | None = None) -> Tensor:
        if len(images) != len(self.cameras):
            raise ValueError(f"the fused policy takes {len(self.cameras)} images ({', '.join(self.cameras)}), "
                             f"got {len(images)}")
        batch = camera_features(self.backbone, list(images), self.inputs.camera_names,
                                self.spec.config.use_cls_token)
        batch[OBS_STATE] = self.normalizer.normalize(OBS_STATE, state.float())
        if self.has_env_state:
            if env_state is None:
                raise ValueError(f"this policy also takes {OBS_ENV_STATE} ({self.inputs.env_state_dim} values)")
            batch[OBS_ENV_STATE] = self.normalizer.normalize(OBS_ENV_STATE, env_state.float())
        head_dtype = next(self.head.parameters()).dtype
        if head_dtype != torch.float32:  # weights cast by with_weights_in: the inputs follow them
            batch = {key: value.to(head_dtype) for key, value in batch.items()}
        amp = self.compute_dtype != head_dtype  # autocast only over float32 weights
        with torch.no_grad(), torch.autocast(state.device.type, dtype=self.compute_dtype, enabled=amp):
            actions, _ = self.head(batch)
        return self.normalizer.unnormalize(ACTION, actions.float())

    def prepare_export(self, images: Sequence[Tensor]) -> None:
        """Get ready to be traced on camera frames shaped like ``images`` (one batch per camera)."""
        for image in images:
            self.backbone.preprocess.prepare_export(image)

    def with_weights_in(self, dtype: torch.dtype) -> FusedPolicy:
        """A copy whose backbone and head weights are stored in ``dtype`` and compute in it without
        autocast; preprocessing and the normaliser stay float32, as do inputs and output.

        This is the form ONNX wants: torch's exporter writes autocast's mixed-precision regions as graphs
        onnxruntime refuses (a LayerNormalization bound to float16 and float32 at once), and TensorRT
        builds its engine in the types it finds in the graph. Its arithmetic differs from autocast's
        only in rounding (normalisation layers and softmax in half too), which the export's trace check
        bounds with the half-precision tolerance.
        """
        cast = copy.deepcopy(self)
        cast.backbone.model.to(dtype)
        cast.backbone.amp_dtype = None
        cast.head.to(dtype)
        cast.compute_dtype = dtype
        return cast


def _drop_training_only(head: ACTHead) -> None:
    """Remove the CVAE encoder, which only runs in training: an exported program keeps every parameter
    of the module, used or not, and with LeRobot's defaults the CVAE encoder is a third of the head."""
    for name in [n for n, _ in chain(head.named_children(), head.named_buffers(recurse=False))
                 if n.startswith("vae_encoder")]:
        delattr(head, name)


def build_fused_policy(run_or_checkpoint: str | os.PathLike, checkpoint: str | int = LAST,
                       weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       dtype: str | torch.dtype = torch.float32, check_weights: bool = True) -> FusedPolicy:
    """The fused policy of a run folder's checkpoint (``last``, ``best`` or a step) or of a checkpoint folder.

    The backbone is rebuilt from the provenance the run recorded for its feature store, with
    ``weights`` (default: the recorded file if it still exists, else the Hugging Face cache, or the
    recorded seed for random weights); weights whose sha256 / tensor hash differ from the recorded
    ones are refused unless ``check_weights`` is False (meant for tests of the parity check). A run
    that trained its backbone (online, or ``dinocache finetune``) gets its trained backbone: the base
    weights rebuilt and checked as above, then the checkpoint's trained tensors, their own sha256
    checked (:func:`~dinocache.policy.model.trainable.load_trained_backbone`).
    """
    compute_dtype = parse_dtype(dtype)
    path = resolve_checkpoint(run_or_checkpoint, checkpoint)
    head, normalizer, spec = load_head(path, device=device)
    _drop_training_only(head)
    amp = None if compute_dtype == torch.float32 else compute_dtype
    if spec.backbone_training is None:
        backbone = rebuild_backbone(spec.store_record.backbone, weights=weights, device=device, amp_dtype=amp,
                                    check=check_weights)
    else:
        trained = load_trained_backbone(path, spec, weights=weights, device=device, check=check_weights)
        backbone = trained.frozen(amp_dtype=amp)
    policy = FusedPolicy(backbone, head, normalizer, spec, compute_dtype).to(device)
    policy.checkpoint_path = Path(path)
    policy.step = checkpoint_step(path)
    return policy
