"""Inputs of the export tests (``tests/test_export*.py``): the trained run they all read (built once per
test run by the ``trained`` fixture in conftest.py), observations made of its store, and the eager
policy's actions to compare with.

The run: a generated dataset with real video (two cameras, an environment state) -> `extract` (a
ViT-S/14 with random weights at 56 px, float16 cache) -> 30 steps of a tiny head with CLS tokens on,
checkpoints at steps 15 and 30; and that run exported once (the ``exported`` fixture), as ``.pt2`` through
the command line and as ``.onnx``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from click.testing import CliRunner

from dinocache.cli import main
from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.pipeline.extract import ExtractConfig, extract
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.fused import FusedPolicy
from dinocache.policy.training.train import TrainConfig, train

from test_train import TINY

TOP, WRIST = "observation.images.top", "observation.images.wrist"
STATE, ENV = "observation.state", "observation.environment_state"

#: Largest difference (in the actions' own units) allowed between a policy computing in ``dtype`` and
#: the float32 eager policy on the CPU: kernel noise at float32, the half-precision rounding otherwise.
DTYPE_ATOL = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


def write_dataset(out: Path, seed: int = 0) -> Path:
    """Four episodes of 16 frames, cameras top and wrist (48x64), state, environment state."""
    return write_synthetic_dataset(out, num_episodes=4, episode_length=16, image_size=(48, 64),
                                   cameras=("top", "wrist"), with_env_state=True, seed=seed)


def extract_store(dataset: Path, out: Path) -> Path:
    """The trained run's extraction of ``dataset`` (deterministic: the same dataset gives the same bytes)."""
    extract(ExtractConfig(dataset=dataset, out=out, backbone="dinov2_vits14", weights="random", image_size="56",
                          unit_frames=16, chunk_frames=8, batch_size=8, progress=False))
    return out


def build_trained(root: Path) -> None:
    """dataset -> `extract` -> 30 training steps, under ``root``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_store(write_dataset(root / "data"), root / "f.zarr")
        train(TrainConfig(store=root / "f.zarr", out=root / "run", steps=30, batch_size=8,
                          act=dict(TINY, use_cls_token=True), val_episodes="none", save_every=15, log_every=10,
                          progress=False))
    finally:
        torch.set_num_threads(threads)


def open_trained(root: Path) -> SimpleNamespace:
    return SimpleNamespace(root=root, dataset=root / "data", store=FeatureStore(root / "f.zarr"),
                           store_path=root / "f.zarr", run=root / "run")


def build_exported(run: Path, folder: Path) -> None:
    """``run`` exported into ``folder``: ``policy.pt2`` by the command line as a user types it (``--out``
    without a suffix: the format's is added; its output kept in ``export.txt``), and ``policy.onnx``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder.mkdir(parents=True)
        result = CliRunner().invoke(main, ["export", str(run), "--out", str(folder / "policy"), "--no-progress"])
        assert result.exit_code == 0, result.output
        (folder / "export.txt").write_text(result.output)
        export_policy(run, folder / "policy.onnx", format="onnx", progress=False)
    finally:
        torch.set_num_threads(threads)


def open_exported(folder: Path) -> SimpleNamespace:
    return SimpleNamespace(folder=folder, pt2=folder / "policy.pt2", onnx=folder / "policy.onnx",
                           pt2_output=(folder / "export.txt").read_text())


def observations(trained: SimpleNamespace, steps: int) -> list[dict]:
    """``steps`` distinct observations: the store's kept frames (cycled) with those rows' state."""
    rows, frames = trained.store.verification_frames()
    state, env = trained.store.read(STATE), trained.store.read(ENV)
    return [{TOP: frames[TOP][t % len(rows)], WRIST: frames[WRIST][t % len(rows)],
             STATE: state[rows[t % len(rows)]], ENV: env[rows[t % len(rows)]]} for t in range(steps)]


def chunk(eager: FusedPolicy, obs: dict) -> torch.Tensor:
    """The eager fused policy's ``(chunk, A)`` action chunk for one observation."""
    with torch.no_grad():
        return eager([torch.from_numpy(obs[TOP])[None], torch.from_numpy(obs[WRIST])[None]],
                     torch.from_numpy(obs[STATE])[None], torch.from_numpy(obs[ENV])[None])[0]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and "tmp" in p.name]
