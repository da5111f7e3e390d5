"""Training with the backbone in the step: ACT's own recipe online, and fine-tuning from a cached warm start.

Two entry points, each a :class:`~dinocache.policy.training.run.RunKind` for the one training loop of
:mod:`dinocache.policy.training.train` (same split, normalisation, metrics, checkpoints and exact resume as a
cached run; only the batches, frames instead of features, and the module that trains differ):

* :func:`train_online` (``dinocache train --online --backbone resnet18 DATASET``): a fresh ACT head
  behind a backbone trained with it from the first step, on frames decoded from the dataset: ACT's
  recipe (ResNet18, ``FrozenBatchNorm2d``, ``optimizer_lr_backbone``), the baseline a cached run is
  compared with, trainable and exportable like every other run.
* :func:`finetune` (``dinocache finetune RUN --out RUN2``): a cached run continued end to end. The
  head starts from ``RUN``'s checkpoint, so it is already good and the backbone's features are not
  wrecked by the gradients of a random head (linear probe, then fine-tune); the backbone starts from
  the store's weights (checked against their recorded hashes) and trains at its own learning rate,
  optionally only its last blocks, with gradient checkpointing and layer-wise learning-rate decay
  (:class:`~dinocache.policy.model.trainable.BackboneTraining`).

Every checkpoint holds the trained backbone beside the head (``backbone.safetensors``, with its own
sha256 and the hashes of the base weights it started from); ``dinocache export`` fuses it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from dinocache.datasets import open_dataset
from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.encoders.image_size import parse_image_size
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.preprocess import ImageSize
from dinocache.encoders.record import BackboneRecord
from dinocache.errors import DinocacheError
from dinocache.pipeline.store import SourceRecord, StoreRecord
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.checkpoint import RUN_FILE, PolicySpec, load_head, read_config, resolve_checkpoint
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.model.integrity import read_json
from dinocache.policy.model.provenance import rebuild_backbone
from dinocache.policy.model.trainable import BackboneTraining
from dinocache.policy.training.episodes import open_training_store
from dinocache.policy.training.frames import DecodedFrames
from dinocache.policy.training.loop import TrainResult
from dinocache.policy.training.online import OnlineACT
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.run import RunKind, RunSetup, refuse_resume_changes, resolve_act_config
from dinocache.policy.training.train import TrainConfig, run_training

__all__ = ["train_online", "finetune", "online_record"]


def online_record(data: DecodedFrames, backbone: FrozenBackbone) -> StoreRecord:
    """What an online run's frames are, in the shape of a feature store's record (there is no store):
    the backbone in front of the head (model, base weights, preprocessing), the dataset (format,
    fingerprint, path), cameras, native sizes, fps and low-dim names: what export rebuilds from."""
    source = data.source
    cameras = list(data.camera_keys.values())
    return StoreRecord(
        num_frames=len(data.episode_end), cameras=tuple(cameras), backbone=backbone.record(), dtype="float32",
        source=SourceRecord(source.format, source.fingerprint()), source_path=str(Path(source.path).resolve()),
        fps=float(source.fps), camera_sizes={camera: tuple(data.sizes[camera]) for camera in cameras},
        lowdim_names={key: info.names for key, info in source.lowdim.items()}, extra={"online": True},
    )


def _trained_config(config: ACTConfig, training: BackboneTraining) -> ACTConfig:
    return config if training.lr is None else dataclasses.replace(config, optimizer_lr_backbone=training.lr)


#: BackboneTraining field -> (its option's parameter name, as in ``TrainConfig.given``; the option)
_TRAINING_OPTIONS = {"lr": ("backbone_lr", "--optimizer-lr-backbone"), "unfreeze_last": ("unfreeze_last", "--unfreeze-last"),
                     "layer_decay": ("layer_decay", "--layer-decay"),
                     "gradient_checkpointing": ("gradient_checkpointing", "--gradient-checkpointing")}


def _recorded_training(recorded: dict[str, Any] | None, training: BackboneTraining, cfg: TrainConfig) -> BackboneTraining:
    """A continued run trains its backbone as recorded; each option given again must agree with the record."""
    if recorded is None:
        return training
    was, default = BackboneTraining(**recorded["backbone_training"]), BackboneTraining()
    conflicts = []
    for name, (parameter, option) in _TRAINING_OPTIONS.items():
        asked, recorded_value = getattr(training, name), getattr(was, name)
        if cfg.gave(parameter, asked, getattr(default, name)) and asked != recorded_value:
            conflicts.append(f"{option} {asked} (the run has {recorded_value})")
    refuse_resume_changes(cfg, conflicts)
    return was


def _check_online_backbone(cfg: TrainConfig, recorded: BackboneRecord, backbone: str, image_size: ImageSize | None) -> None:
    """A resumed online run rebuilds the backbone it recorded: a --backbone or --image-size given again must be it."""
    conflicts = []
    if cfg.gave("backbone", backbone, "resnet18") and backbone != recorded.name:
        conflicts.append(f"--backbone {backbone} (the run has {recorded.name})")
    size = tuple(recorded.preprocess.get("image_size") or ())
    if cfg.gave("image_size", image_size, None) and image_size is not None and parse_image_size(image_size) != size:
        conflicts.append(f"--image-size {image_size} (the run has {'x'.join(map(str, size))})")
    refuse_resume_changes(cfg, conflicts)


def train_online(cfg: TrainConfig, backbone: str = "resnet18", weights: str | os.PathLike[str] = "auto",
                 image_size: ImageSize | None = None, training: BackboneTraining = BackboneTraining()) -> TrainResult:
    """Train a fresh ACT head with ``backbone`` trained in every step, on frames of the dataset ``cfg.store``.

    ``cfg`` is :func:`~dinocache.policy.training.train.train`'s, ``cfg.store`` naming the dataset (a folder);
    ``image_size`` defaults, for a convnet, to the (first) camera's native size, as ACT trains its
    ResNet18 (480x640 on ALOHA), and for a ViT to its registry size;
    ``cfg.resume`` continues the run in ``cfg.out`` exactly, as for cached runs (the base weights are
    then rebuilt from the run's record and checked against its hashes; ``weights`` names their file).
    """
    if cfg.preset is not None:
        raise DinocacheError("--preset sets a cached DINO head's options; an online run takes ACT's defaults and the "
                             "head options given")
    cfg.refuse_feature_augmentation("an --online run")
    source = open_dataset(cfg.store)
    fingerprint = source.fingerprint()

    def check_data(recorded: dict[str, Any]) -> None:
        expected = StoreRecord.from_dict(recorded["store"]["provenance"]).source.fingerprint
        if fingerprint != expected:
            raise DinocacheError(f"{cfg.store} is not the dataset the run {cfg.out} was trained on (fingerprint "
                                 f"{fingerprint}, the run has {expected})")

    def build(procs: Processes, config: ACTConfig, recorded: dict[str, Any] | None) -> RunSetup:
        device = procs.device
        options = _recorded_training(recorded, training, cfg)
        if recorded is not None:
            _check_online_backbone(cfg, StoreRecord.from_dict(recorded["store"]["provenance"]).backbone, backbone,
                                   image_size)
        data = DecodedFrames.from_dataset(cfg.store, config.chunk_size, device=device)
        if recorded is None:
            native = next(iter(data.sizes.values())) if get_backbone_spec(backbone).kind == "convnet" else None
            base = create_backbone(backbone, weights=weights, image_size=image_size or native, seed=cfg.seed,
                                   device=device)
        else:
            base = rebuild_backbone(StoreRecord.from_dict(recorded["store"]["provenance"]).backbone,
                                    weights=None if weights == "auto" else weights, device=device)
        encoder = options.encoder(base)
        inputs = ACTInputs(cameras=[(name, encoder.embed_dim, *encoder.grid_size) for name in data.camera_keys],
                           state_dim=data.state_dim, action_dim=data.action_dim, env_state_dim=data.env_state_dim)
        config = _trained_config(config, options)
        stats = {key: {name: value.tolist() for name, value in s.items()} for key, s in data.stats.items()}
        spec = PolicySpec(config, inputs, stats, None, online_record(data, base), data.camera_keys,
                          backbone_training=options.to_dict())
        model = OnlineACT(ACTHead(config, inputs), encoder).to(device)
        return RunSetup(data, model, model.optimizer(options.layer_decay), spec)

    episodes = [(ep.index, ep.start, ep.length, ep.task) for ep in source.episodes]
    return run_training(cfg, RunKind(episodes, lambda: resolve_act_config(None, cfg.act, None), check_data, build))


def finetune(run: str | os.PathLike, cfg: TrainConfig, training: BackboneTraining = BackboneTraining(),
             checkpoint: str | int = "last", dataset: str | os.PathLike | None = None) -> TrainResult:
    """Continue the cached run ``run`` end to end into ``cfg.out``: its head (checkpoint ``checkpoint``)
    and the store's backbone, trained together on frames decoded from the store's source dataset
    (``dataset`` overrides the recorded path; it must have the recorded fingerprint).

    Same store (``cfg.store`` overrides the recorded path), normalisation, split, seed and preset as
    ``run``; its batch size unless ``cfg`` gives one. ``cfg.steps`` counts fine-tuning steps;
    ``cfg.resume`` continues ``cfg.out`` exactly.
    """
    cfg.refuse_feature_augmentation("fine-tuning")
    source = resolve_checkpoint(run, checkpoint)
    head_config = read_config(source)
    spec = PolicySpec.from_dict(head_config)
    if spec.backbone_training is not None:
        raise DinocacheError(f"{run} already trained its backbone: `dinocache finetune` continues a cached run "
                             f"(to train it on, --resume the run that made it)")
    store = open_training_store(cfg.store or spec.store_path)
    store.check_identity(spec.store_record.identity(), hint=f"it is not the store {run} was trained on")
    if not cfg.resume:
        cfg = _inherit(cfg, read_json(Path(run) / RUN_FILE) if (Path(run) / RUN_FILE).is_file() else None)

    def check_data(recorded: dict[str, Any]) -> None:
        store.check_identity(StoreRecord.from_dict(recorded["store"]["provenance"]).identity(),
                             hint=f"the run {cfg.out} was trained on another feature store")

    def build(procs: Processes, config: ACTConfig, recorded: dict[str, Any] | None) -> RunSetup:
        device = procs.device
        options = _recorded_training(recorded, training, cfg)
        data = DecodedFrames.from_store(store, dataset, config.chunk_size, device=device)
        encoder = options.encoder(rebuild_backbone(spec.store_record.backbone, device=device))
        config = _trained_config(config, options)
        tuned = PolicySpec(config, spec.inputs, spec.stats, str(store.path.resolve()), spec.store_record,
                           spec.camera_keys, spec.preset, backbone_training=options.to_dict())
        head = ACTHead(config, spec.inputs)
        head.load_state_dict(load_head(source)[0].state_dict())  # the cached run's head: the warm start
        model = OnlineACT(head, encoder).to(device)
        return RunSetup(data, model, model.optimizer(options.layer_decay), tuned)

    record = {"finetuned_from": {"run": str(Path(run).resolve()), "checkpoint": str(source.resolve()),
                                 "step": head_config["step"]}}
    return run_training(cfg, RunKind(store.episodes(), lambda: spec.config, check_data, build, record))


def _inherit(cfg: TrainConfig, recorded: dict[str, Any] | None) -> TrainConfig:
    """``cfg`` with the options that define the cached run it continues: its seed, split, validation
    frames, preset, and its batch size unless ``cfg`` gives one."""
    if recorded is None:  # a bare checkpoint folder: its own record has what matters
        return cfg
    val = recorded["split"]["val"]
    batch_size = cfg.batch_size if cfg.is_given("batch_size") else recorded["train"]["batch_size"]
    return dataclasses.replace(cfg, seed=recorded["train"]["seed"], val_frames=recorded["train"]["val_frames"],
                               val_episodes=",".join(map(str, val)) if val else "none", preset=recorded["preset"],
                               batch_size=batch_size)
