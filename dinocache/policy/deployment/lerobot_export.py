"""``dinocache export RUN --format lerobot --out DIR``: a run as a LeRobot pretrained-model folder.

The folder is what LeRobot's own ``save_pretrained`` writes for a ``dinocache`` policy (the plugin
``lerobot_policy_dinocache``): ``config.json`` with its ``type``, ``model.safetensors`` holding the
backbone that built the cache (or the trained one of a fine-tuned or online run) and the whole
head, CVAE encoder included, and the pre- and post-processor files with the run's normalisation
statistics. ``lerobot-eval --policy.path=DIR``, ``lerobot-rollout --policy.path=DIR`` and
``push_to_hub`` take it as it is; ``dinocache.json`` beside them says where it came from and
what was checked, and records the size and sha256 of every other file of the folder
(:func:`~dinocache.policy.model.integrity.folder_files`; sealed), which the plugin checks whenever it
loads the policy (a flipped byte in a weight or a normalisation statistic would otherwise run).

Order of work, each step able to stop the export before anything is in place:

1. rebuild the fused policy of the run (:func:`~dinocache.policy.deployment.fused.build_fused_policy`: backbone
   weights checked against the recorded hashes) and run the export's parity check against the cache
   (:func:`~dinocache.policy.deployment.parity.check_run`);
2. build the LeRobot policy and processors from the run's spec, load the fused policy's backbone
   and the checkpoint's head into it, and compare its actions (LeRobot's processors, LeRobot's
   float frames) with the fused policy's on the check's frames, within the parity check's tolerance;
3. write the folder under a temporary name with its digests, load it back through LeRobot's loading path
   (``PreTrainedConfig.from_pretrained``, the policy class ``make_policy`` picks,
   ``make_pre_post_processors(pretrained_path=...)``), compare again, and rename it into place.

LeRobot and the plugin are imported only here, when this format is asked for; without them the
export stops with one line saying what to install.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinocache.devices import resolve_device
from dinocache.errors import DinocacheError
from dinocache.keys import ACTION, OBS_ENV_STATE, OBS_STATE
from dinocache.policy.deployment.formats import LEROBOT_FORMAT
from dinocache.policy.deployment.fused import FusedPolicy, build_fused_policy
from dinocache.policy.deployment.metadata import policy_metadata
from dinocache.policy.deployment.parity import ParityError, ParityReport, check_run, rounding_tolerance
from dinocache.policy.model.checkpoint import LAST, PolicySpec, load_head
from dinocache.policy.model.integrity import FILES_KEY, METADATA_NAME, folder_files, write_json

__all__ = ["LEROBOT_FORMAT", "LeRobotExport", "export_lerobot", "INSTALL_HINT"]

#: What to install when LeRobot or the plugin is missing.
INSTALL_HINT = ('pip install "lerobot[training]" -e plugins/lerobot_policy_dinocache (from a dinocache checkout; '
                "see docs/lerobot.md)")
#: The provenance file written beside LeRobot's files, with their digests.
METADATA_FILE = METADATA_NAME


@dataclass
class LeRobotExport:
    """What :func:`export_lerobot` wrote and measured (differences in normalised action units)."""

    path: Path
    parity: ParityReport | None
    lerobot_max_abs_diff: float  # LeRobot's loading path on the written folder vs the fused policy
    tolerance: float
    seconds: float

    def format_text(self) -> str:
        lines = [f"policy      {self.path} (LeRobot pretrained model, type dinocache)",
                 self.parity.format() if self.parity else "parity      NOT VERIFIED (--skip-verify)",
                 f"lerobot     max |LeRobot's loading of the folder - fused policy| = {self.lerobot_max_abs_diff:.3g} "
                 f"action std (allowed {self.tolerance:.3g}); {self.seconds:.1f} s",
                 f"use         lerobot-eval --policy.path={self.path} ...  (or lerobot-rollout)"]
        return "\n".join(lines)


def _plugin() -> tuple[Any, Any, Any]:
    """The plugin's config and policy classes and processor factory, or one line saying what to install."""
    try:
        from lerobot_policy_dinocache.configuration_dinocache import DinocacheConfig
        from lerobot_policy_dinocache.modeling_dinocache import DinocachePolicy
        from lerobot_policy_dinocache.processor_dinocache import make_dinocache_pre_post_processors
    except ImportError as err:
        raise DinocacheError(f"--format lerobot needs LeRobot and the dinocache policy plugin ({err.name or err} "
                             f"is not installed): {INSTALL_HINT}") from None
    return DinocacheConfig, DinocachePolicy, make_dinocache_pre_post_processors


def lerobot_config(spec: PolicySpec, image_sizes: dict[str, list[int]], device: torch.device) -> Any:
    """The plugin config of a run: its ACT hyperparameters, backbone, preprocessing and input/output features
    (``image_sizes``: each camera's native ``(H, W)``, as the policy metadata gives them).

    The preset is not carried over: its overrides are already in the ACT fields (and a user's
    changes to them must not be overridden again); ``dinocache.json`` records it.
    """
    from lerobot.configs.types import FeatureType, PolicyFeature

    config_cls = _plugin()[0]
    record = spec.store_record.backbone
    preprocess = record.preprocess_config()
    inputs = {spec.camera_keys[name]: PolicyFeature(FeatureType.VISUAL, (3, *image_sizes[spec.camera_keys[name]]))
              for name in spec.inputs.camera_names}
    inputs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (spec.inputs.state_dim,))
    if spec.inputs.env_state_dim is not None:
        inputs[OBS_ENV_STATE] = PolicyFeature(FeatureType.ENV, (spec.inputs.env_state_dim,))
    weights = record.weights
    return config_cls(
        **spec.config.to_dict(), input_features=inputs,
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (spec.inputs.action_dim,))},
        device=device.type, vision_backbone=record.name,
        pretrained_backbone_weights="random" if weights.is_random else (weights.path or "auto"),
        backbone_seed=int(weights.seed or 0), freeze_backbone=spec.backbone_training is None,
        image_size="x".join(map(str, preprocess.image_size)), center_crop=preprocess.center_crop)


def _lerobot_policy(fused: FusedPolicy, image_sizes: dict[str, list[int]]) -> tuple[Any, Any, Any]:
    """The LeRobot policy and processors of ``fused``'s run, holding its backbone and its checkpoint's whole head."""
    _, policy_cls, make_processors = _plugin()
    device = next(fused.parameters()).device
    config = lerobot_config(fused.spec, image_sizes, device)
    policy = policy_cls(config, backbone_from_checkpoint=True)
    head, _, _ = load_head(fused.checkpoint_path)  # with its CVAE encoder, which the fused policy drops
    policy.model.head.load_state_dict(head.state_dict())
    policy.model.encoder.model.load_state_dict(fused.backbone.model.state_dict())
    stats = {key: {name: torch.tensor(values, dtype=torch.float32) for name, values in entry.items()}
             for key, entry in fused.spec.stats.items()}
    preprocessor, postprocessor = make_processors(config, dataset_stats=stats)
    return policy.to(device).eval(), preprocessor, postprocessor


def _lerobot_actions(policy: Any, preprocessor: Any, postprocessor: Any, cameras: list[str],
                     images: list[Tensor], state: Tensor, env: Tensor | None) -> Tensor:
    """Action chunks of the LeRobot policy on uint8 HWC frames, fed as LeRobot feeds them: float ``[0, 1]``
    CHW frames and raw state through the preprocessor, the chunk through the postprocessor."""
    observation = {key: image.permute(0, 3, 1, 2).to(torch.float32) / 255.0 for key, image in zip(cameras, images)}
    observation[OBS_STATE] = state
    if env is not None:
        observation[OBS_ENV_STATE] = env
    with torch.no_grad():
        return postprocessor(policy.predict_action_chunk(preprocessor(observation))).float()


def _compare(fused: FusedPolicy, lerobot: tuple[Any, Any, Any], inputs: tuple, tolerance: float, what: str) -> float:
    """Largest difference (normalised action units) of the LeRobot policy from the fused one; refused above tolerance."""
    images, state, env = inputs
    with torch.no_grad():
        expected = fused(images, state, env).cpu()
    actions = _lerobot_actions(*lerobot, fused.cameras, images, state, env)
    device, normalize = fused.normalizer.device, fused.normalizer.normalize  # the stats stay where they are
    diff = (normalize(ACTION, actions.to(device)) - normalize(ACTION, expected.to(device))).abs().max().item()
    if not diff <= tolerance:
        raise ParityError(f"{what} differs from the fused policy by {diff:.3g} action std (allowed {tolerance:.3g}); "
                          "nothing was written")
    return diff


def _load_folder(path: Path) -> tuple[Any, Any, Any]:
    """The folder loaded as ``lerobot-eval --policy.path`` loads it."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    config = PreTrainedConfig.from_pretrained(path)
    config.pretrained_path = path
    policy = get_policy_class(config.type).from_pretrained(path, config=config)
    preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=str(path))
    return policy, preprocessor, postprocessor


def export_lerobot(run: str | os.PathLike, out: str | os.PathLike, checkpoint: str | int = LAST,
                   device: str = "cpu", weights: str | os.PathLike | None = None,
                   dataset: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
                   verify: bool = True, check_weights: bool = True) -> LeRobotExport:
    """Write run ``run``'s checkpoint as the LeRobot pretrained-model folder ``out`` (see the module docstring).

    The arguments mean what they mean for :func:`~dinocache.policy.deployment.export.export_policy`; ``out`` is a
    folder that must not exist yet (or be empty).
    """
    t_begin = time.perf_counter()
    _plugin()  # before any work: one line if LeRobot or the plugin is missing
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DinocacheError(f"--out {out} already exists and is not an empty folder: a LeRobot policy is written "
                             "as a new folder")
    target = resolve_device(device)
    fused = build_fused_policy(run, checkpoint, weights=weights, device=target, check_weights=check_weights)
    metadata = policy_metadata(fused.spec, fused.checkpoint_path, fused.step, torch.float32)
    metadata["backbone_weights"] = fused.backbone.weights.to_dict()
    report = None
    if verify:
        report, checked, state, env = check_run(fused, store, dataset)
        if not report.passed:
            raise ParityError(f"{report.format()}: the fused policy does not act as the run's head does on its "
                              "features; nothing was written")
        images = [torch.from_numpy(np.ascontiguousarray(frames)).to(target) for frames in checked.images]
        inputs = (images, state.to(target), None if env is None else env.to(target))
        tolerance = report.tolerance
    else:
        sizes = metadata["image_size"]
        images = [torch.zeros((2, *sizes[camera], 3), dtype=torch.uint8, device=target) for camera in fused.cameras]
        env_dim = fused.inputs.env_state_dim
        inputs = (images, torch.zeros(2, fused.inputs.state_dim, device=target),
                  None if env_dim is None else torch.zeros(2, env_dim, device=target))
        tolerance = rounding_tolerance(fused, *inputs)
    lerobot = _lerobot_policy(fused, metadata["image_size"])
    _compare(fused, lerobot, inputs, tolerance, "the LeRobot policy")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy, preprocessor, postprocessor = lerobot
        policy.save_pretrained(tmp)
        preprocessor.save_pretrained(tmp)
        postprocessor.save_pretrained(tmp)
        metadata[FILES_KEY] = folder_files(tmp, METADATA_FILE)
        write_json(tmp / METADATA_FILE, metadata)  # now, so that the load below checks the digests too
        diff = _compare(fused, _load_folder(tmp), inputs, tolerance, "the written folder, loaded by LeRobot,")
        metadata["parity"] = report.to_dict() if report else {"verified": False}
        metadata["export"] = {"format": LEROBOT_FORMAT, "device": str(target), "weights_checked": check_weights,
                              "lerobot_max_abs_diff": diff, "lerobot_tolerance": tolerance}
        write_json(tmp / METADATA_FILE, metadata)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LeRobotExport(path=out, parity=report, lerobot_max_abs_diff=diff, tolerance=tolerance,
                         seconds=time.perf_counter() - t_begin)
