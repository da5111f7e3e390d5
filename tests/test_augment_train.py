"""Training on a store of augmented views, and feature-grid augmentation: every view is drawn, validation
sees view 0 only, the grid shift replicates edges, runs record their options and resume exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dinocache.cli import main
from dinocache.errors import DinocacheError, TrainingError
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import open_training_store
from dinocache.policy.training.feature_augment import FeatureAugment, ViewDraw, shift_grid
from dinocache.policy.training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY  # noqa: E402
from _runs import assert_same_run, metrics, train_crashing_at  # noqa: E402
from test_train_data import make_store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VIEWS = 4


@pytest.fixture(scope="module")
def views_store(tmp_path_factory) -> Path:
    """A learnable store of 8 episodes whose every frame has 4 distinct views."""
    path = tmp_path_factory.mktemp("views") / "f.zarr"
    make_store(path, num_episodes=8, views=VIEWS)
    return path


def view_of_each_sample(store, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(row, view) of every sample of a batch, found by its camera's features: each view of each
    frame of the store is distinct, so its bytes say which it is."""
    every = store.view_features("cameras/top/patch", 0, store.num_frames)
    where = {every[row, view].tobytes(): (row, view) for row in range(store.num_frames) for view in range(store.views)}
    return [where[grid.tobytes()] for grid in batch["features.top"].permute(0, 2, 3, 1).numpy()]


@pytest.mark.parametrize("memory_budget", [None, 1], ids=["in-memory", "streamed"])
def test_training_draws_every_view_and_validation_only_view_0(views_store: Path, memory_budget: int | None):
    store = open_training_store(views_store)
    data = CachedFeatures(store, chunk_size=5, memory_budget=memory_budget, window_frames=32)
    assert data.in_memory == (memory_budget is None) and data.views == VIEWS
    order = data.sample_order(np.arange(store.num_frames), seed=3)
    drawn = []
    with data.train_batches(order, 16) as batches:
        for _ in range(40):
            batch = next(batches)
            drawn += view_of_each_sample(store, batch)
    counts = np.bincount([view for _, view in drawn], minlength=VIEWS)
    assert len(counts) == VIEWS and counts.min() > 0.15 * len(drawn), counts  # about a quarter each
    # the draw is the ViewDraw stream: resuming at a position draws what the whole run drew there
    assert [view for _, view in drawn] == ViewDraw(VIEWS, seed=3).take(len(drawn)).tolist()
    with data.train_batches(order, 16, position=5 * 16) as batches:
        assert view_of_each_sample(store, next(batches)) == drawn[5 * 16:6 * 16]

    shown = [pair for batch in data.validation_batches(np.arange(40), data.batch_buffers(16))
             for pair in view_of_each_sample(store, batch)]
    assert {view for _, view in shown} == {0} and [row for row, _ in shown][:40] == list(range(40))


def test_clean_sampling_holds_and_draws_view_0_only_and_the_budget_counts_every_view(views_store: Path):
    store = open_training_store(views_store)
    clean = CachedFeatures(store, chunk_size=5, view_sampling="clean")
    every = CachedFeatures(store, chunk_size=5)
    assert clean.views == 1 and every.feature_bytes == VIEWS * clean.feature_bytes
    budget = 2 * clean.feature_bytes  # room for two views: the clean one is held, the four are streamed
    assert CachedFeatures(store, chunk_size=5, memory_budget=budget, view_sampling="clean").in_memory
    assert not CachedFeatures(store, chunk_size=5, memory_budget=budget, window_frames=32).in_memory
    with clean.train_batches(clean.sample_order(np.arange(store.num_frames), seed=3), 16) as batches:
        assert {view for _ in range(10) for _, view in view_of_each_sample(store, next(batches))} == {0}


def test_the_grid_shift_replicates_the_edge_patches():
    """The shift of each sample is DrQ's on the grid: pad by replicating the edge patches, crop back."""
    grid = torch.randn(6, 5, 4, 7).to(memory_format=torch.channels_last)  # the batches' channels-last layout
    dy, dx = torch.tensor([0, 1, -2, 2, -1, 0]), torch.tensor([0, -1, 2, 3, 0, -3])
    shifted = shift_grid(grid, dy, dx)
    for b in range(6):
        padded = np.pad(grid[b].numpy(), ((0, 0), (2, 2), (3, 3)), mode="edge")
        top, left = 2 + int(dy[b]), 3 + int(dx[b])
        np.testing.assert_array_equal(shifted[b].numpy(), padded[:, top:top + 4, left:left + 7])
    assert torch.equal(shifted[0], grid[0])


def test_feature_augmentation_acts_in_training_only_on_the_patch_grids():
    torch.manual_seed(0)
    batch = {"features.top": torch.randn(64, 8, 4, 4), "cls.top": torch.randn(64, 8), "action": torch.randn(64, 5, 2)}
    augment = FeatureAugment(grid_shift=1, patch_dropout=0.25)
    out = augment(batch)
    assert out["cls.top"] is batch["cls.top"] and out["action"] is batch["action"]
    dropped = (out["features.top"] == 0).all(dim=1)
    assert 0.15 < dropped.float().mean() < 0.35  # whole patches zeroed, about a quarter of them
    moved = FeatureAugment(grid_shift=1)(batch)["features.top"]
    assert not torch.equal(moved, batch["features.top"])
    assert augment.eval()(batch) is batch and FeatureAugment()(batch) is batch


@pytest.mark.parametrize("memory_budget", [None, 1], ids=["in-memory", "streamed"])
def test_resume_with_views_and_grid_augmentation_reproduces_the_uninterrupted_run(views_store: Path, tmp_path: Path,
                                                                                  monkeypatch, memory_budget):
    options = dict(store=views_store, steps=30, batch_size=8, act=dict(TINY, dropout=0.1), val_episodes="0.25",
                   eval_every=10, save_every=15, log_every=5, progress=False, memory_budget=memory_budget,
                   window_frames=32, grid_shift=1, patch_dropout=0.1)
    train(TrainConfig(out=tmp_path / "whole", **options))

    train_crashing_at(TrainConfig(out=tmp_path / "split", **options), 22, monkeypatch)
    with pytest.raises(DinocacheError, match=r"--grid-shift 2 \(the run has 1\)"):
        train(TrainConfig(out=tmp_path / "split", resume=True, **{**options, "grid_shift": 2}))
    train(TrainConfig(out=tmp_path / "split", resume=True, **options))

    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(5, 35, 5))
    assert_same_run(tmp_path / "whole", tmp_path / "split", ("loss", "l1", "kld", "grad_norm", "val_l1"))
    record = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert record["train"] == {"batch_size": 8, "seed": 1000, "val_frames": 2048, "view_sampling": "uniform",
                               "grid_shift": 1, "patch_dropout": 0.1}
    assert record["store"]["provenance"]["views"] == VIEWS


def test_the_options_from_the_command_line_and_their_refusals(views_store: Path, small_dataset: Path, tmp_path: Path):
    """Each augmentation changes what is trained on; --online, which trains on frames, refuses them."""
    args = ["train", str(views_store), "--steps", "4", "--batch-size", "4", "--log-every", "2", "--val-episodes",
            "none", "--no-progress", "--dim-model", "16", "--n-heads", "2", "--dim-feedforward", "16",
            "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--chunk-size", "5"]
    losses = {}
    for name, extra in {"clean": ["--view-sampling", "clean"], "views": [],
                        "shift": ["--grid-shift", "1", "--patch-dropout", "0.2"]}.items():
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        losses[name] = [r["loss"] for r in metrics(tmp_path / name)]
    assert losses["clean"] != losses["views"] != losses["shift"]
    online = CliRunner().invoke(main, ["train", "--online", str(small_dataset), "--out", str(tmp_path / "online"),
                                       "--grid-shift", "1"])
    assert online.exit_code != 0 and "--grid-shift 1: these augment cached features; an --online run trains on " \
        "decoded frames" in online.output and not (tmp_path / "online").exists()
    with pytest.raises(TrainingError, match=r"--patch-dropout 1.0: must be a probability in \[0, 1\)"):
        TrainConfig(store=views_store, out=tmp_path / "x", patch_dropout=1.0)
