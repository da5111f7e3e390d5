"""Stage two: train an ACT head on a feature store (``dinocache train``).

The backbone ran once, at extraction; here every step is a gather from cached features plus the
head's forward and backward, so a step costs what the head costs. The loop, :func:`train`, is
deliberately plain: one process per device, DDP when launched by ``torchrun``, bfloat16 autocast on
CUDA, AdamW at a constant learning rate with gradient clipping (LeRobot's ACT recipe), periodic
validation on held-out episodes, checkpoints that resume bit-exactly.

A step never waits for the host (:class:`TrainStep`): its loss terms and gradient norm are summed on
the device and read when a record is written, a non-finite step is skipped on the device, and on
CUDA the whole step is one CUDA graph replayed per step. Features sit on the GPU when they fit.

What the run folder holds and how checkpoints are laid out is in :mod:`dinocache.policy.checkpoint`;
how batches are made in :mod:`dinocache.policy.data`; the user guide is ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinocache.atomic import sweep_temporaries, temporary_name
from dinocache.devices import check_batch_fits, resolve_device
from dinocache.errors import DinocacheError, TrainingError, os_error_line
from dinocache.pipeline.store import FeatureStore, StoreRecord
from dinocache.policy.act import ACTHead, act_optimizer
from dinocache.policy.checkpoint import (
    BEST, CHECKPOINTS, LAST, METRICS_FILE, MODEL_FILE, PLOT_FILE, RUN_FILE, PolicySpec, capture_rng, checkpoint_dir,
    checkpoint_step, load_training_state, restore_rng, save_checkpoint,
)
from dinocache.policy.config import ACTION, ACTION_IS_PAD, ACTConfig, ACTInputs
from dinocache.policy.data import (
    Batch, CachedFeatures, EpisodeSplit, action_windows, available_device_memory, episode_rows, open_training_store,
    parse_memory_budget, split_episodes,
)
from dinocache.policy.presets import apply_preset, check_preset_backbone, get_preset
from dinocache.policy.frames import DecodedFrames
from dinocache.policy.integrity import read_json, write_json
from dinocache.policy.tracking import Tracker, open_trackers
from dinocache.policy.train_config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "TrainStep", "RunKind", "RunSetup", "Processes", "train", "run_training",
           "resolve_act_config", "mean_action_l1"]

#: Data loading should stay below this share of the step time; above it the run says so once.
DATA_FRACTION_TARGET = 0.05

#: Eager calls before a step is captured as a CUDA graph (on a side stream, as capture requires:
#: lazy initialisations, the optimiser's state and cuBLAS workspaces happen outside the graph).
GRAPH_WARMUP = 3


@dataclass
class TrainResult:
    """What a run ended with (rank 0's view; other ranks get the same numbers)."""

    run_dir: Path
    step: int
    metrics: dict[str, Any] | None
    best_val_l1: float | None
    baseline_val_l1: float | None
    batches: str  # where batches came from: features in memory or streamed, or decoded frames
    seconds: float

    def format(self) -> str:
        lines = [f"run         {self.run_dir}", f"steps       {self.step} in {self.seconds:.1f} s "
                 f"({self.batches})"]
        if self.metrics:
            m = self.metrics
            lines.append(f"last        loss {m['loss']:.4f}  l1 {m['l1']:.4f}  {m['steps_per_s']:.1f} steps/s  "
                         f"data {100 * m['data_fraction']:.1f}% of step time")
        if self.best_val_l1 is not None:
            lines.append(f"validation  best L1 {self.best_val_l1:.4f} vs {self.baseline_val_l1:.4f} "
                         f"predicting the mean action")
        lines.append(f"checkpoints {checkpoint_dir(self.run_dir, LAST)}" +
                     (f", {checkpoint_dir(self.run_dir, BEST)}" if self.best_val_l1 is not None else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def resolve_act_config(preset: str | None, overrides: dict[str, Any], store: FeatureStore | None) -> ACTConfig:
    """LeRobot's defaults, then the preset's overrides (after checking the store's backbone), then ``overrides``.

    ``store`` is needed only with a ``preset`` (an online run has none, and no preset).

    Setting ``chunk_size`` alone also lowers ``n_action_steps`` to it (LeRobot would refuse the pair,
    though ``n_action_steps`` only matters when the policy runs).
    """
    config = ACTConfig()
    if preset is not None:
        chosen = get_preset(preset)
        check_preset_backbone(chosen, store.record.backbone.name)
        config = apply_preset(chosen, config)
    overrides = dict(overrides)
    if "chunk_size" in overrides and "n_action_steps" not in overrides:
        overrides["n_action_steps"] = min(config.n_action_steps, overrides["chunk_size"])
    try:
        return dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as err:
        raise DinocacheError(f"ACT configuration: {err}") from None


def _check_resume(recorded: dict[str, Any], cfg: TrainConfig, split: list[int]) -> None:
    """Refuse to resume with a changed option that defines the run."""
    conflicts = []
    for name in _RUN_OPTIONS:
        given, was = getattr(cfg, name), recorded["train"][name]
        if cfg.is_given(name) and given != was:
            conflicts.append(f"--{name.replace('_', '-')} {given} (the run has {was})")
    if cfg.is_given("val_episodes") and split != recorded["split"]["val"]:
        conflicts.append(f"--val-episodes selects {split} (the run validates on {recorded['split']['val']})")
    if cfg.is_given("preset") and cfg.preset != recorded["preset"]:
        conflicts.append(f"--preset {cfg.preset} (the run has {recorded['preset']})")
    for name, value in cfg.act.items():
        if recorded["act_config"].get(name) != value:
            conflicts.append(f"--{name.replace('_', '-')} {value} (the run has {recorded['act_config'].get(name)})")
    refuse_resume_changes(cfg, conflicts)


def refuse_resume_changes(cfg: TrainConfig, conflicts: list[str]) -> None:
    """Refuse, in one line naming each, options given on ``--resume`` that contradict the recorded run."""
    if conflicts:
        raise TrainingError(f"{cfg.out}: cannot resume with changed settings: {'; '.join(conflicts)}. "
                            f"Drop them, or start a new run with another --out")


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place among the ``torchrun`` workers (one process alone without torchrun)."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @classmethod
    def setup(cls, device: str | None) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        target = resolve_device(device)
        if world_size > 1:
            if target.type == "cuda":
                target = torch.device("cuda", local_rank)
                torch.cuda.set_device(target)
            torch_dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        return cls(rank, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), target)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(objects, obj)
        return objects

    def teardown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()


class _LossModule(nn.Module):
    """``compute_loss`` as ``forward``, so that DDP (which hooks ``forward``) synchronises its gradients."""

    def __init__(self, head: ACTHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.head.compute_loss(batch)


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


class _Replayed:
    """``fn()`` run eagerly, or, with ``graph``, captured once as a CUDA graph and replayed.

    ``fn`` reads and writes only tensors that live as long as this object (static shapes and
    addresses), which is what a replay needs. Its first :data:`GRAPH_WARMUP` calls run eagerly on
    a side stream (as ``torch.cuda.graphs`` requires), the next one captures it, and every call
    from then on is one replay: one launch instead of hundreds, and no Python. ``eager_after``
    runs after each eager call (and never in the graph): what ``fn`` must not capture;
    ``before_capture`` once, before the capture.
    """

    def __init__(self, fn: Any, graph: bool, eager_after: Any = None, before_capture: Any = None) -> None:
        self.fn, self.graph, self.eager_after, self.before_capture = fn, graph, eager_after, before_capture
        self.calls = 0
        self._cuda_graph: Any = None

    def __call__(self) -> None:
        self.calls += 1
        if not self.graph:
            self._eager()
        elif self._cuda_graph is not None:
            self._cuda_graph.replay()
        elif self.calls <= GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.before_capture is not None:
                self.before_capture()
            self._cuda_graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self._cuda_graph):
                    self.fn()
            except RuntimeError as err:  # an op the capture cannot record (a host sync, an allocation ...)
                cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise TrainingError(f"the training step could not be captured as a CUDA graph ({cause}); "
                                    "--no-cuda-graph runs it without") from err
            self._cuda_graph.replay()

    def _eager(self) -> None:
        self.fn()
        if self.eager_after is not None:
            self.eager_after()


class TrainStep:
    """One optimiser step of the head on ``inputs``, device buffers the batches are written into.

    ``model`` is the module whose ``forward`` is the head's loss (default: the head's
    ``compute_loss``; DDP's wrapper of it under ``torchrun``), ``optimizer`` an :func:`act_optimizer`.

    Forward (bfloat16 autocast on CUDA), backward, gradient clipping (foreach) and the fused AdamW
    step, without a single wait for the host: loss, L1, KL and gradient norm are summed on the
    device, and read by :meth:`take` when a record is written. A step whose gradient norm is not
    finite (a NaN loss, an overflow) is not applied: the optimiser reads a device flag
    (``found_inf``, as with a GradScaler) that stays set, so that step and every later one are
    skipped, the weights stay those before it, and :meth:`take` names it; the loop then stops.

    With ``graph`` (on CUDA) the whole step is captured once as a CUDA graph and replayed
    (:class:`_Replayed`); the optimiser is made ``capturable`` for it. Calling the step with the
    same inputs gives the same result either way, within float tolerance.
    """

    def __init__(self, head: ACTHead, optimizer: torch.optim.Optimizer, inputs: Batch, graph: bool = False,
                 model: nn.Module | None = None) -> None:
        device = inputs[ACTION].device
        self.model = _LossModule(head) if model is None else model  # DDP wraps the loss module
        self.optimizer, self.inputs = optimizer, inputs
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # 0 turns clipping off, as in LeRobot (which then takes the norm with max_norm=inf, for the log)
        self.max_norm = head.config.grad_clip_norm or math.inf
        self.autocast = _autocast(device)
        self.sums = torch.zeros(4, device=device)  # loss, l1, kld, grad_norm
        self.count = torch.zeros((), device=device)  # steps since the last take
        self.first_bad = torch.zeros(3, device=device)  # count, loss and grad_norm at the first step not applied
        self.found_inf = torch.zeros((), device=device)
        optimizer.found_inf = self.found_inf  # read by the fused AdamW: 1 skips the update
        self._run = _Replayed(self._step, graph, eager_after=lambda: optimizer.zero_grad(set_to_none=True),
                              before_capture=self._capturable)

    def _capturable(self) -> None:
        """Let the optimiser step be captured (set only then: eager, ``capturable`` warns that it costs)."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True

    def _step(self) -> None:
        with self.autocast:
            loss, info = self.model(self.inputs)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.count.add_(1)
        bad = torch.isfinite(grad_norm).logical_not().float()
        values = torch.stack([info["loss"].float(), info["l1_loss"].float(), info["kld_loss"].float(), grad_norm])
        self.first_bad.copy_(torch.where(bad > self.found_inf, torch.stack([self.count, values[0], grad_norm]),
                                         self.first_bad))
        torch.maximum(self.found_inf, bad, out=self.found_inf)
        self.sums.add_(values)
        self.optimizer.step()  # in the graph, backward writes the same .grad tensors again: no zero_grad

    def __call__(self) -> None:
        """Run one step on what ``inputs`` hold now (queued on the device; returns at once on CUDA)."""
        self._run()

    def take(self) -> tuple[list[float], tuple[int, float, float] | None]:
        """The sums (loss, l1, kld, grad_norm) since the last call, and ``(steps since the last call, loss,
        grad_norm)`` of the first step that was not applied, or None; then starts new sums.

        Reading them waits for the device to finish the queued steps: call it once per record.
        """
        values = torch.cat([self.sums, self.first_bad, self.found_inf.view(1)]).tolist()
        self.sums.zero_()
        self.count.zero_()
        bad = (int(values[4]), values[5], values[6]) if values[7] else None
        return values[:4], bad


def _autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (no loss scaling needed), off elsewhere; no cast cache, which a graph cannot keep."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def mean_action_l1(data: CachedFeatures, train_rows: np.ndarray, val_rows: np.ndarray) -> float:
    """Validation L1 of always predicting the training set's mean action: what "learning nothing" scores.

    Measured like the head's L1: normalised actions, over the non-padded steps of each chunk.
    """
    action = data.lowdim[ACTION]
    mean = action.index_select(0, torch.from_numpy(train_rows)).mean(0)
    windows, is_pad = action_windows(torch.from_numpy(val_rows), data.episode_end, data.chunk_size)
    return (action[windows] - mean).abs()[~is_pad].mean().item()


class _Validation:
    """Validation L1 (normalised action units, non-padded steps) with the zero latent the live policy uses.

    Batches of one size (the last padded, its padding masked) into fixed buffers, so that the forward
    can be a CUDA graph like the training step; L1 and the count of real elements are summed on the
    device and read once, at the end. Under DDP each process takes every ``world_size``-th frame.
    """

    def __init__(self, model: nn.Module, data: CachedFeatures | DecodedFrames, rows: np.ndarray, batch_size: int,
                 procs: Processes, graph: bool) -> None:
        self.model, self.data, self.procs = model, data, procs
        self.rows = rows[procs.rank::procs.world_size]
        self.inputs = data.batch_buffers(max(1, min(batch_size, len(self.rows))), procs.device)
        self.sums = torch.zeros(2, device=procs.device)
        self.autocast = _autocast(procs.device)
        self._run = _Replayed(self._forward, graph)

    @torch.no_grad()
    def _forward(self) -> None:
        with self.autocast:
            _, info = self.model(self.inputs)
        count = (~self.inputs[ACTION_IS_PAD]).sum() * self.inputs[ACTION].shape[-1]
        self.sums.add_(torch.stack([info["l1_loss"].float() * count, count.float()]))

    def __call__(self) -> float:
        self.model.eval()
        for _ in self.data.validation_batches(self.rows, self.inputs):
            self._run()
        self.model.train()
        total, count = self.procs.sum(self.sums.tolist())
        self.sums.zero_()
        return total / max(count, 1.0)


class _Meter:
    """Wall clock, data wait and steps since the last record; :meth:`record` turns them into one metrics line.

    Steps per second are steps over the wall time between records, taken after :meth:`TrainStep.take`
    has waited for the device: honest on CUDA, where launching a step returns before it ran.
    Validation and checkpoint time are left out (the clock restarts after them).
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.began, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def record(self, step: int, sums: list[float], wall_s: float, val_l1: float | None, samples: int,
               procs: Processes) -> dict[str, Any]:
        loss, l1, kld, grad_norm, steps, data_s, wall_s = procs.sum([*sums, self.steps, self.data_s, wall_s])
        n = max(steps, 1.0)
        return {
            "step": step,
            "loss": loss / n,
            "l1": l1 / n,
            "kld": kld / n,
            "grad_norm": grad_norm / n,
            "val_l1": val_l1,
            "steps_per_s": n / max(wall_s, 1e-9),
            "data_fraction": data_s / max(wall_s, 1e-9),
            "samples": samples,
        }


def _metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that does not parse (the half line of a run killed while
    appending, or damage) is left out: metrics are a log, the checkpoints are the run's state."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a crashed run wrote after its last checkpoint, so the resumed file reads as one run."""
    if path.is_file():
        records = [record for record in _metric_records(path) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))


def plot_metrics(metrics_path: Path, out: Path, baseline: float | None) -> None:
    """Loss curves (train loss, train L1, validation L1, the mean-action baseline) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no display needed

    records = _metric_records(metrics_path)
    if not records:
        return
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="train loss (L1 + kl_weight * KL)")
    ax.plot(steps, [r["l1"] for r in records], label="train L1")
    val = [(r["step"], r["val_l1"]) for r in records if r["val_l1"] is not None]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation L1")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="validation L1 of the mean action")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("normalised action units")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    tmp = temporary_name(out)  # whole or not at all
    try:
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """What a kind of run hands the loop: batches, the module that trains, its optimiser and its spec.

    ``data`` is :class:`CachedFeatures` or :class:`~dinocache.policy.frames.DecodedFrames` (frames for
    a backbone in the step); ``model(batch)`` returns the loss as :meth:`ACTHead.compute_loss` does,
    ``model.head`` is the head, and ``model.encoder``, when it has parameters that train, the backbone
    saved beside it in every checkpoint.
    """

    data: CachedFeatures | DecodedFrames
    model: nn.Module
    optimizer: torch.optim.Optimizer
    spec: PolicySpec


@dataclass
class RunKind:
    """What differs between a cached run (:func:`train`), an online one and a fine-tuning one
    (:mod:`dinocache.policy.finetune`); the loop, the split, resuming and checkpoints are shared.

    ``episodes`` are ``(index, start row, length, task)`` of the rows sampled; ``config()`` is a new
    run's head configuration; ``check_data(recorded)`` refuses to resume a run (its ``run.json``)
    on other data; ``build(procs, config, recorded)`` makes the :class:`RunSetup` (``recorded`` is the
    run's record when it continues one, else None); ``record`` is added to ``run.json``.
    """

    episodes: list[tuple[int, int, int, str]]
    config: Callable[[], ACTConfig]
    check_data: Callable[[dict[str, Any]], None]
    build: Callable[[Processes, ACTConfig, dict[str, Any] | None], RunSetup]
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or, with ``cfg.resume``, continue training) an ACT head on the feature store ``cfg.store``.

    Launched by ``torchrun``, every process runs this; they share the work by DDP and only rank 0
    writes to the run folder.
    """
    store = open_training_store(cfg.store)

    def check_data(recorded: dict[str, Any]) -> None:
        store.check_identity(StoreRecord.from_dict(recorded["store"]["provenance"]).identity(),
                             hint=f"the run {cfg.out} was trained on another feature store")

    def build(procs: Processes, config: ACTConfig, recorded: dict[str, Any] | None) -> RunSetup:
        device = procs.device
        data = CachedFeatures(store, config.chunk_size, config.use_cls_token,
                              parse_memory_budget(cfg.memory_budget, procs.local_world_size), device=device,
                              device_budget=parse_memory_budget(cfg.device_memory_budget,
                                                                available=lambda: available_device_memory(device),
                                                                option="--device-memory-budget"),
                              window_frames=cfg.window_frames, progress=cfg.progress and procs.main)
        stats = {k: {n: v.tolist() for n, v in s.items()} for k, s in data.stats.items()}
        spec = PolicySpec(config, data.inputs, stats, str(store.path.resolve()), store.record, data.camera_keys,
                          cfg.preset if recorded is None else recorded["preset"])
        model = _LossModule(ACTHead(config, data.inputs).to(device))
        return RunSetup(data, model, act_optimizer(list(model.parameters()), config), spec)

    return run_training(cfg, RunKind(store.episodes(), lambda: resolve_act_config(cfg.preset, cfg.act, store),
                                     check_data, build))


def run_training(cfg: TrainConfig, kind: RunKind) -> TrainResult:
    """Run (or continue) a run of any kind: the part :func:`train`, ``train --online`` and ``finetune`` share."""
    procs = Processes.setup(cfg.device)
    try:
        return _train(cfg, procs, kind)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: one line saying what is kept
        reason = os_error_line(err) if isinstance(err, OSError) else str(err).removeprefix("Error while serializing: ")
        last = checkpoint_dir(Path(cfg.out), LAST)
        kept = (f"the last checkpoint (step {int(last.resolve().name)}) is kept: fix this and continue with --resume"
                if last.exists() else "no checkpoint was written")
        raise TrainingError(f"{cfg.out}: training stopped: {reason}; {kept}") from err
    finally:
        procs.teardown()


def _open_run(cfg: TrainConfig, kind: RunKind,
              procs: Processes) -> tuple[ACTConfig, dict[str, Any], bool, dict[str, Any] | None]:
    """What the run is: a new one built from ``cfg``, or the recorded one that ``cfg.resume`` continues.

    Returns the head configuration, the options that define the run (``preset``, ``batch_size``,
    ``seed``, ``val_frames``, ``split``), whether a checkpoint is to be loaded, and the run's record
    when it continues one: a recorded run with no checkpoint yet (its process was killed before the
    first one) starts again from step 0 with its recorded options. Every process decides the same
    before rank 0 writes anything (hence the barrier).
    """
    run_dir = Path(cfg.out)
    split = split_episodes([index for index, *_ in kind.episodes], cfg.val_episodes)
    has_checkpoint = (checkpoint_dir(run_dir, LAST) / MODEL_FILE).is_file()
    recorded = None
    if cfg.resume:
        if not (run_dir / RUN_FILE).is_file():
            raise TrainingError(f"{run_dir}: nothing to resume (no {RUN_FILE}); start the run without --resume")
        recorded = read_json(run_dir / RUN_FILE)
        _check_resume(recorded, cfg, split.val)
        kind.check_data(recorded)
        config = ACTConfig.from_dict(recorded["act_config"])
        options = {**recorded["train"], "preset": recorded["preset"], "split": EpisodeSplit(**recorded["split"])}
    else:
        if (run_dir / RUN_FILE).exists():
            how = ("continue it" if has_checkpoint else
                   "start it again with its recorded options (it stopped before its first checkpoint)")
            raise TrainingError(f"{run_dir} already holds a training run; pass --resume to {how}, "
                                f"or choose another --out")
        config = kind.config()
        options = {"batch_size": cfg.batch_size, "seed": cfg.seed, "val_frames": cfg.val_frames,
                   "preset": cfg.preset, "split": split}
    procs.barrier()
    return config, options, cfg.resume and has_checkpoint, recorded


def _claim_run(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` only if no other run has: two ``train --out`` racing for one folder get one winner.

    The record is written whole beside it and hard-linked into place, which fails if the name exists.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(run_dir / RUN_FILE)  # a claim killed between its write and its link
    tmp = temporary_name(run_dir / RUN_FILE)
    try:
        write_json(tmp, record)
    except OSError:  # a full disk: the folder made for the run goes again
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    try:
        os.link(tmp, run_dir / RUN_FILE)
    except FileExistsError:
        raise TrainingError(f"{run_dir} already holds a training run (another process just started it); "
                            f"choose another --out") from None
    finally:
        tmp.unlink()


def _release_run(run_dir: Path) -> None:
    """Undo :func:`_claim_run` for a run that died before its first checkpoint: with nothing to resume,
    its record would only lock the folder. The folder goes too when nothing else is left in it."""
    for name in (RUN_FILE, METRICS_FILE, PLOT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _padding_warning(data: CachedFeatures, rows: np.ndarray, episodes: list[tuple[int, int, int, str]]) -> str | None:
    """A warning when the action chunk is longer than every episode: most of each window is then padding."""
    longest = max(length for _, _, length, _ in episodes)
    if data.chunk_size <= longest or not len(rows):
        return None
    _, is_pad = action_windows(torch.from_numpy(rows), data.episode_end, data.chunk_size)
    return (f"dinocache: warning: --chunk-size {data.chunk_size} is longer than every episode (the longest has "
            f"{longest} frames): {100 * is_pad.float().mean().item():.0f}% of the training action windows is "
            f"padding, which the loss ignores; a chunk shorter than the episodes trains on more real actions")


def _check_batch_fits(batch_size: int, config: ACTConfig, inputs: ACTInputs, device: torch.device) -> None:
    """Refuse a batch that cannot fit before any of it is allocated (the kernel would kill the process
    without a word). A lower bound per sample: its cached features, and the feed-forward activations
    each transformer layer keeps for the backward pass (the encoder's over the observation tokens, the
    decoder's over the chunk, the CVAE encoder's over the chunk and two more), at two bytes a value."""
    tokens = sum(h * w for _, _, h, w in inputs.cameras) + 2 + (inputs.env_state_dim is not None)
    features = 2 * sum(c * h * w for _, c, h, w in inputs.cameras)
    rows = (config.n_encoder_layers * tokens + config.n_decoder_layers * config.chunk_size
            + config.use_vae * config.n_vae_encoder_layers * (config.chunk_size + 2))
    activations = 2 * rows * config.dim_feedforward
    check_batch_fits("--batch-size", batch_size, features + activations, device,
                     "the cached features and the transformer activations of one training step")


def _train(cfg: TrainConfig, procs: Processes, kind: RunKind) -> TrainResult:
    t_begin = time.perf_counter()
    run_dir = Path(cfg.out)
    config, options, resuming, recorded = _open_run(cfg, kind, procs)
    seed, split = options["seed"], options["split"]

    # Data (normalised low-dim arrays; features in RAM or streamed, or frames), model and optimiser.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    setup = kind.build(procs, config, recorded)
    data, model, optimizer, spec = setup.data, setup.model, setup.optimizer, setup.spec
    _check_batch_fits(options["batch_size"], model.head.config, spec.inputs, procs.device)
    encoder = _trained_encoder(model)
    train_rows, val_rows = (episode_rows(kind.episodes, part) for part in (split.train, split.val))
    if len(val_rows) > options["val_frames"]:  # a fixed, evenly spread subset keeps evaluation cheap
        val_rows = val_rows[np.linspace(0, len(val_rows) - 1, options["val_frames"]).round().astype(np.int64)]
    baseline = mean_action_l1(data, train_rows, val_rows) if len(val_rows) else None

    # Fresh, or from the last checkpoint (weights, moments, RNG, sampler position).
    step, best_val = 0, math.inf
    if resuming:
        state = load_training_state(checkpoint_dir(run_dir, LAST), model.head, optimizer, backbone=encoder)
        _keep_fused(optimizer)
        step, best_val = state["step"], state.get("best_val_l1") or math.inf
        if len(state["rng"]) == procs.world_size:
            restore_rng(state["rng"][procs.rank])
        else:  # another number of processes: the run goes on, but not as the original would have
            torch.manual_seed(seed + 7919 * step + procs.rank)
        if procs.main:
            _truncate_metrics(run_dir / METRICS_FILE, step)
            if {**state["sampler"], "position": 0} != _sampler_state(data, seed, 0, procs.world_size):
                tqdm.write("dinocache: note: the number of processes or the feature access (in memory vs streamed) "
                           "changed since the checkpoint, so the data order differs from the original run's")
    else:
        if procs.rank:
            torch.manual_seed(seed + procs.rank)  # same initial weights (DDP broadcasts rank 0's), own noise
        if procs.main and cfg.resume:  # a recorded run that died before its first checkpoint starts again
            _truncate_metrics(run_dir / METRICS_FILE, 0)
        elif procs.main:
            _claim_run(run_dir, {**spec.to_dict(), "train": {k: options[k] for k in _RUN_OPTIONS},
                                 "split": dataclasses.asdict(split), "world_size": procs.world_size,
                                 "baseline_val_l1": baseline, **kind.record})
    if procs.main and baseline is not None:
        tqdm.write(f"dinocache: {len(split.train)} train / {len(split.val)} val episodes; validation L1 of "
                   f"predicting the mean action: {baseline:.4f} (what the head has to beat)")
    if procs.main and step == 0 and (warning := _padding_warning(data, train_rows, kind.episodes)):
        tqdm.write(warning)
    try:
        return _loop(cfg, procs, data, model, optimizer, spec, options, train_rows, val_rows, baseline, step, best_val,
                     t_begin)
    except BaseException:
        if procs.main and not checkpoint_dir(run_dir, LAST).exists():
            _release_run(run_dir)
        raise


def _trained_encoder(model: nn.Module) -> nn.Module | None:
    """The backbone that trains with the head (saved beside it), or None when it is frozen or cached."""
    encoder = getattr(model, "encoder", None)
    return encoder if encoder is not None and any(p.requires_grad for p in encoder.parameters()) else None


def _keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """Undo what loading a checkpoint does to the optimiser's flags: the saved param groups replace its
    own, so a checkpoint of an earlier, unfused run (step counts on the CPU) would unfuse it, and one of
    a graph run would leave it ``capturable``."""
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None, capturable=False)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device, torch.float32)


def _loop(cfg: TrainConfig, procs: Processes, data: CachedFeatures | DecodedFrames, model: nn.Module,
          optimizer: torch.optim.Optimizer, spec: PolicySpec, options: dict[str, Any], train_rows: np.ndarray,
          val_rows: np.ndarray, baseline: float | None, step: int, best_val: float, t_begin: float) -> TrainResult:
    """The training steps from ``step`` to ``cfg.steps``, with validation, logging and checkpoints.

    ``model(batch)`` is the loss (:class:`RunSetup`); its head, and its backbone when that trains,
    are what checkpoints save.

    The host only queues work: a batch (gathered on the device, or copied there ahead of time), then
    the step (:class:`TrainStep`). It reads the device once per record. A step whose gradient norm is
    not finite (a NaN or inf loss, or an overflow in the backward pass) is skipped on the device, and
    so is every later one; the next record sees it and stops the run, naming that step, with the
    weights as they were before it: after one such update every weight is NaN, and a head trained on
    to the end would export actions that are NaN. The norm is taken after DDP's all-reduce, so every
    process stops at the same step.
    """
    device, run_dir = procs.device, Path(cfg.out)
    batch_size, seed = options["batch_size"], options["seed"]
    # One process on CUDA: the step and the validation are CUDA graphs. Not under DDP, whose gradient
    # all-reduce hooks would have to be captured too; nor with a backbone in the step (its batches are
    # frames decoded on the host). With --compile the graph holds Inductor's fused kernels: the
    # compilation happens in the eager warm-up calls, the capture records what they launch.
    graph = (cfg.cuda_graph and device.type == "cuda" and procs.world_size == 1
             and isinstance(data, CachedFeatures))
    if cfg.compile:
        model.head.compile()
    parallel = model
    if procs.world_size > 1:
        parallel = nn.parallel.DistributedDataParallel(model,
                                                       device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(model.head, optimizer, data.batch_buffers(batch_size, device), graph=graph, model=parallel)
    validate = _Validation(model, data, val_rows, max(4 * batch_size, 32), procs, graph) if len(val_rows) else None
    encoder = _trained_encoder(model)

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and procs.main),
               desc=f"train {run_dir.name}", dynamic_ncols=True)
    trackers = open_trackers(cfg.log_to, run_dir, read_json(run_dir / RUN_FILE)) if procs.main else []
    log = _Log(run_dir / METRICS_FILE, bar, _batches(data), trackers) if procs.main else None
    order = data.sample_order(train_rows, seed, procs.rank, procs.world_size)
    batches = data.train_batches(order, batch_size, position=step * batch_size, out=train_step.inputs)
    model.train()
    meter = _Meter()
    best_only: Path | None = None  # a checkpoint written only because its validation was the best so far
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            next(batches)  # into train_step.inputs
            meter.data_s += time.perf_counter() - t0
            train_step()
            step += 1
            meter.steps += 1
            bar.update(1)

            save = step % cfg.save_every == 0 or step == cfg.steps
            evaluated = validate is not None and (save or step % cfg.eval_every == 0)
            if not (save or evaluated or step % cfg.log_every == 0):
                continue
            sums, bad = train_step.take()  # waits for the device: the wall clock is honest
            wall_s = time.perf_counter() - meter.began
            if bad is not None:
                raise TrainingError(_diverged(run_dir, step - meter.steps + bad[0], bad[1], bad[2]))
            val_l1 = validate() if evaluated else None
            record = meter.record(step, sums, wall_s, val_l1, step * batch_size * procs.world_size, procs)
            if log is not None:
                log.write(record, val_l1)
            # Every validation may make a new best, not only those at a scheduled checkpoint: a best
            # seen between checkpoints is saved then (and the one it supersedes, if it was saved only
            # for being best, removed), so that `best` is the best validation the run saw.
            is_best = evaluated and val_l1 < best_val
            best_val = min(best_val, val_l1) if evaluated else best_val
            if save or is_best:
                rng = procs.gather(capture_rng())
                if procs.main:
                    written = save_checkpoint(run_dir, step, model.head, data.normalizer, spec, optimizer, rng,
                                              sampler=_sampler_state(data, seed, step * batch_size, procs.world_size),
                                              extra={"best_val_l1": None if math.isinf(best_val) else best_val},
                                              best=is_best, backbone=encoder)
                    if is_best and best_only is not None:
                        shutil.rmtree(best_only, ignore_errors=True)
                    if is_best:
                        best_only = None if save else written
            meter.restart()
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
    if procs.main and (run_dir / METRICS_FILE).is_file():
        plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE, baseline)
    return TrainResult(run_dir, step, log.last if log else None, None if math.isinf(best_val) else best_val,
                       baseline, _batches(data), time.perf_counter() - t_begin)


def _diverged(run_dir: Path, step: int, loss: float, grad_norm: float) -> str:
    """The one line that stops a run whose step ``step`` would make the weights non-finite."""
    last = checkpoint_dir(run_dir, LAST)
    kept = (f"the last good checkpoint is {last} (step {checkpoint_step(last)})" if last.exists()
            else "there was no checkpoint yet, so the run folder is released")
    return (f"{run_dir}: training diverged at step {step}: loss {loss:g}, gradient norm {grad_norm:g}; stopped "
            f"before updating the weights, {kept}. Lower --lr, or check the store with `dinocache inspect`")


_RUN_OPTIONS = ("batch_size", "seed", "val_frames")


class _Log:
    """Rank 0's output: ``metrics.jsonl``, the progress bar, the experiment trackers asked for, and one
    warning if data loading is slow."""

    def __init__(self, path: Path, bar: tqdm, batches: str, trackers: list[Tracker]) -> None:
        self.path, self.bar, self.batches, self.trackers = path, bar, batches, trackers
        self.last: dict[str, Any] | None = None
        self.warned = False

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def write(self, record: dict[str, Any], val_l1: float | None) -> None:
        with open(self.path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", val_l1="-" if val_l1 is None else f"{val_l1:.4f}",
                             steps_s=f"{record['steps_per_s']:.1f}", data=f"{100 * record['data_fraction']:.1f}%")
        # The first record includes the warm-up (first batch, first streaming window): not judged.
        if self.last is not None and record["data_fraction"] > DATA_FRACTION_TARGET and not self.warned:
            self.warned = True
            hint = {"features streamed": "features streamed: raise --memory-budget to hold them in RAM",
                    "frames decoded": "frames decoded: more CPU cores, or a dataset whose episodes fit the cache, "
                                      "decode faster"}.get(self.batches, self.batches)
            tqdm.write(f"dinocache: data loading takes {100 * record['data_fraction']:.0f}% of the step time "
                       f"({hint})")
        self.last = record


def _batches(data: CachedFeatures | DecodedFrames) -> str:
    """Where a run's batches come from, as the summary and the data-loading warning say it."""
    if isinstance(data, DecodedFrames):
        return "frames decoded"
    return "features in memory" if data.in_memory else "features streamed"


def _sampler_state(data: CachedFeatures, seed: int, position: int, world_size: int) -> dict[str, Any]:
    """All the sampler is (see :class:`~dinocache.policy.data.SampleOrder`): a checkpoint stores it."""
    return {"seed": seed, "position": position, "world_size": world_size,
            "window_chunks": None if data.in_memory else data.window_chunks}
