"""`dinocache demo`: the three stages, end to end, on the sample dataset that ships in the package.

A new user should see extract -> train -> export -> live actions work in one command, in minutes on
a laptop CPU, before pointing the tool at their own data. The sample is a LeRobot v2.1 dataset with
real H.264 video written by the project's own generator (:mod:`dinocache.datasets.synthetic`, recipe
:data:`SAMPLE_RECIPE`): a disc moves over a background and the actions are where it will be a few
frames later, so a head trained on image features has something real to learn.

Weights are looked for, in order, in ``--weights``, ``$DINOCACHE_WEIGHTS`` and the Hugging Face cache;
with none found the demo says so in one line and goes on with seeded random weights, which every
artefact then records, so the pipeline can still be seen working on a machine without downloads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dinocache.encoders.lookup import get_backbone_spec
from dinocache.errors import DinocacheError
from dinocache.keys import ACTION, OBS_STATE

#: How the bundled sample was written: ``write_synthetic_dataset(out, **SAMPLE_RECIPE)``.
SAMPLE_RECIPE: dict[str, Any] = dict(format="lerobot-v2.1", num_episodes=12, episode_length=60,
                                     image_size=(96, 128), cameras=("top", "wrist"), fps=30,
                                     state_dim=6, action_dim=6, seed=7)
#: A head that learns the sample in a couple of minutes on a CPU; every other field keeps ACT's default.
#: It acts with the ACT paper's temporal ensembling (a query every step, chunks blended with
#: ``exp(-0.01 i)``): the sample's disc keeps moving, and executing 20 predicted actions open loop, as
#: a plain action queue does, drifts from it.
DEMO_HEAD: dict[str, Any] = dict(chunk_size=20, n_action_steps=1, temporal_ensemble_coeff=0.01, dim_model=128,
                                 dim_feedforward=512, n_encoder_layers=2, n_vae_encoder_layers=2, optimizer_lr=3e-4)
_MARKER = ".dinocache-demo"


def sample_dataset() -> Path:
    """The bundled sample dataset (read in place; nothing is written inside the package)."""
    path = Path(str(resources.files("dinocache") / "data" / "sample"))
    if not (path / "meta" / "info.json").is_file():
        raise DinocacheError(f"the bundled sample dataset is missing from {path}; reinstall dinocache")
    return path


def write_sample(out: Path) -> Path:
    """Write the sample dataset afresh (how ``dinocache/data/sample`` was made)."""
    from dinocache.datasets.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(out, **SAMPLE_RECIPE)


def resolve_weights(backbone: str, explicit: str | None) -> tuple[str, str]:
    """The ``weights`` argument to use and one line saying where it came from."""
    from dinocache.encoders.weights import WEIGHTS_ENV, find_local_weights

    if explicit:
        return explicit, f"weights: {explicit} (--weights)"
    found = find_local_weights(get_backbone_spec(backbone))
    if found is not None:
        return str(found), f"weights: {found}"
    return "random", (f"weights: no pretrained {backbone} weights on this machine (--weights, ${WEIGHTS_ENV}, "
                      "Hugging Face cache); continuing with seeded RANDOM weights, recorded as such -- "
                      "the pipeline runs, but the features mean nothing")


@dataclass
class DemoConfig:
    """What ``dinocache demo`` runs; the defaults take a few minutes on 2 CPU cores."""

    out: Path = Path("dinocache-demo")
    backbone: str = "dinov2_vits14_reg"
    weights: str | None = None
    image_size: str = "112"
    steps: int = 600
    batch_size: int = 16
    control_steps: int | None = None  # per held-out episode; None: every step
    device: str | None = None
    dataset: Path | None = None  # default: the bundled sample
    progress: bool = True


@dataclass
class DemoResult:
    """Where everything went and how well the policy did."""

    out: Path
    weights_source: str
    artefacts: dict[str, Path] = field(default_factory=dict)
    val_l1: float | None = None
    baseline_val_l1: float | None = None
    live_episodes: int = 0
    live_mae: float | None = None
    live_baseline_mae: float | None = None
    parity_max_abs_diff: float | None = None


def _prepare_out(out: Path) -> None:
    """Start from an empty folder; only ever delete a folder an earlier demo made."""
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise DinocacheError(f"{out} exists and was not made by `dinocache demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("made by `dinocache demo`; deleted and rewritten by the next one\n")


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Extract, train, export, then drive the exported policy through the held-out episodes, step by step."""
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.pipeline.inspect import pca_picture
    from dinocache.pipeline.store import FeatureStore
    from dinocache.policy.deployment.export import export_policy
    from dinocache.policy.training.train import TrainConfig, train

    dataset = Path(cfg.dataset) if cfg.dataset else sample_dataset()
    weights, weights_line = resolve_weights(cfg.backbone, cfg.weights)
    echo(f"dinocache demo: {weights_line}")
    _prepare_out(cfg.out)
    result = DemoResult(out=cfg.out, weights_source="random" if weights == "random" else "pretrained")
    paths = result.artefacts

    echo(f"[1/4] extract: {cfg.backbone} over every frame of {dataset}")
    paths["features"] = cfg.out / "features.zarr"
    extract(ExtractConfig(dataset=dataset, out=paths["features"], backbone=cfg.backbone, weights=weights,
                          image_size=cfg.image_size, device=cfg.device, progress=cfg.progress))
    paths["feature_pca"] = pca_picture(FeatureStore(paths["features"]), cfg.out / "features_pca.png")

    echo(f"[2/4] train: ACT head on the cached features, {cfg.steps} steps")
    paths["run"] = cfg.out / "run"
    trained = train(TrainConfig(store=paths["features"], out=paths["run"], steps=cfg.steps,
                                batch_size=cfg.batch_size, act=dict(DEMO_HEAD), val_episodes="0.25",
                                eval_every=max(cfg.steps // 5, 1), save_every=cfg.steps,
                                log_every=max(cfg.steps // 50, 1), device=cfg.device, progress=cfg.progress))
    result.val_l1, result.baseline_val_l1 = trained.best_val_l1, trained.baseline_val_l1
    paths["loss_curve"] = paths["run"] / "loss.png"

    echo("[3/4] export: backbone + preprocessing + head fused into one program, verified against the cache")
    paths["policy"] = cfg.out / "policy.pt2"
    exported = export_policy(paths["run"], paths["policy"], device=cfg.device or "cpu", dataset=dataset,
                             progress=cfg.progress)
    result.parity_max_abs_diff = exported.max_abs_diff

    episodes = json.loads((paths["run"] / "run.json").read_text())["split"]["val"]
    steps = "every step" if cfg.control_steps is None else f"{cfg.control_steps} steps"
    echo(f"[4/4] live: select_action on {steps} of held-out episodes {episodes}")
    result.live_episodes = len(episodes)
    result.live_mae, result.live_baseline_mae = _drive(paths["policy"], dataset, paths["run"], cfg)
    return result


def _drive(policy_path: Path, dataset: Path, run_dir: Path, cfg: DemoConfig) -> tuple[float, float]:
    """Feed the validation episodes' frames and states to the policy one step at a time, as a robot would.

    Returns the mean absolute error of the chosen actions against the demonstrated ones, and that of
    always answering the training set's mean action (the bar any policy has to clear), both in action
    standard deviations (each action dimension divided by its std), the unit of the validation L1.
    """
    from tqdm.auto import tqdm

    from dinocache import load_policy
    from dinocache.datasets import open_dataset

    run = json.loads((run_dir / "run.json").read_text())
    stats = run["normalization"][ACTION]
    mean_action = np.asarray(stats["mean"], dtype=np.float32)
    std_action = np.asarray(stats["std"], dtype=np.float32)
    policy = load_policy(policy_path, device=cfg.device or "cpu")
    source = open_dataset(dataset)
    lengths = {e.index: e.length for e in source.episodes}
    steps_of = {episode: lengths[episode] if cfg.control_steps is None else min(cfg.control_steps, lengths[episode])
                for episode in run["split"]["val"]}
    chosen, demonstrated = [], []
    with tqdm(total=sum(steps_of.values()), unit="step", disable=not cfg.progress, dynamic_ncols=True,
              desc="select_action") as bar:
        for episode, steps in steps_of.items():
            lowdim = source.read_lowdim(episode)
            frames = {camera: source.read_frames(episode, camera)[:steps] for camera in policy.metadata["cameras"]}
            policy.reset()
            for t in range(steps):
                chosen.append(policy.select_action({**{camera: frames[camera][t] for camera in frames},
                                                    OBS_STATE: lowdim[OBS_STATE][t]}))
                bar.update()
            demonstrated.append(lowdim[ACTION][:steps])
    actual = np.concatenate(demonstrated)
    return (float((np.abs(np.stack(chosen) - actual) / std_action).mean()),
            float((np.abs(mean_action[None] - actual) / std_action).mean()))


def format_result(result: DemoResult) -> str:
    """The closing summary: every artefact's path, then the numbers that say whether it learned.

    Errors are in action standard deviations (each action dimension divided by its std in the training
    data): 0 is perfect, and always answering the mean action, the bar any policy has to clear, scores
    about 0.8 on actions that vary like a normal distribution.
    """
    lines = ["", "dinocache demo: done", *(f"  {name:<12} {path}" for name, path in result.artefacts.items())]
    lines.append("  errors below are mean |action - demonstrated| in action std (0 is perfect; lower is better)")
    if result.val_l1 is not None and result.baseline_val_l1:
        lines.append(f"  validation L1 {result.val_l1:.3f} (best during training; the mean action scores "
                     f"{result.baseline_val_l1:.3f}, {result.baseline_val_l1 / max(result.val_l1, 1e-12):.1f}x higher)")
    if result.live_mae is not None:
        lines.append(f"  live control  {result.live_mae:.3f} over {result.live_episodes} held-out episodes, driven "
                     f"step by step through select_action (the mean action scores {result.live_baseline_mae:.3f})")
    if result.parity_max_abs_diff is not None:
        lines.append(f"  export parity: fused policy vs head on cached features, max |diff| "
                     f"{result.parity_max_abs_diff:.2e} action std")
    if result.weights_source == "random":
        lines += ["  These numbers come from RANDOM backbone weights: the head learns from features of an untrained",
                  "  network, so it overfits the training episodes (the gap between the curves in loss.png) and beats",
                  "  the mean action only modestly. That is expected; it shows the pipeline works, not what DINO sees.",
                  "  Pass --weights PATH or set $DINOCACHE_WEIGHTS for real features."]
    return "\n".join(lines)
