"""Issue 13's fault campaign: each broken input built the way it was found, and the one clear line it must end in.

Nothing may come out silently wrong (a store missing a shard file, a diverging loss, a resume that
ignores an option, a wrong frame rate), and nothing may end in a traceback, a stuck folder or a
misleading message. Inputs are small real ones: generated stores and datasets with real encoded
video, written to disk and broken with file operations.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dinocache.cli import main
from dinocache.errors import StoreError, TrainingError
from dinocache.policy.checkpoint import load_head
from dinocache.policy.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY  # noqa: E402
from test_train_data import make_store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: str):
    """A real click invocation of ``dinocache``, in-process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    """Check that a command failed with one ``dinocache: error:`` line holding every fragment; return it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinocache: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def act_args(**overrides) -> list[str]:
    return [arg for name, value in {**TINY, **overrides}.items() for arg in (f"--{name.replace('_', '-')}", value)]


def shard_file(store: Path, camera: str, unit: int, array: str = "patch") -> Path:
    """The file holding one unit (shard) of a camera's feature array."""
    return store / "cameras" / camera / array / "c" / str(unit) / "0" / ("0/0" if array == "patch" else "")


# ------------------------------------------------------------------ 1. a store missing a shard file --
@pytest.mark.parametrize("memory_budget", [None, "1"], ids=["in-memory", "streamed"])
def test_a_store_missing_a_shard_file_is_refused_naming_array_and_frames(tmp_path: Path, memory_budget):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=6)
    shard_file(store, "top", 1).unlink()  # unit 1: frames 32-63; units/done still says complete
    args = [store, "--out", tmp_path / "run", "--steps", 200, "--batch-size", 4, "--val-episodes", "none",
            "--window-frames", 16, "--no-progress", *act_args()]
    if memory_budget:
        args += ["--memory-budget", memory_budget]
    line = one_line_error(cli("train", *args), "'cameras/top/patch'", "NaN or inf", "dinocache inspect")
    first, last = map(int, re.search(r"first (\d+), last (\d+)", line).groups())
    assert 32 <= first <= last <= 63, line
    assert not (tmp_path / "run").exists(), "a run that never trained leaves no folder behind"

    report = cli("inspect", store)
    assert report.exit_code == 1, report.output
    assert "complete    incomplete: all 4 units are marked done" in report.stdout, report.stdout
    assert "camera 'top': 32 frame(s) contain NaN" in report.stdout


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=4)
    run = tmp_path / "run"
    result = cli("train", store, "--out", run, "--steps", 20, "--batch-size", 4, "--val-episodes", "none",
                 "--save-every", 1, "--no-progress", *act_args(optimizer_lr=1e10))
    one_line_error(result, "diverged at step 2", "loss nan", "last good checkpoint", "(step 1)")
    assert (run / "checkpoints" / "last").resolve().name == "000001"
    weights = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run / "checkpoints" / "000002").exists()


# ------------------------------------------------------------ 2. resume refuses every option given --
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, Path]:
    """A store and a run of it (batch 4, seed 7, 100 validation frames) with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("resume")
    make_store(root / "f.zarr", num_episodes=4)
    train(TrainConfig(store=root / "f.zarr", out=root / "run", steps=2, batch_size=4, seed=7, val_frames=100,
                      act=TINY, progress=False))
    return root / "f.zarr", root / "run"


@pytest.mark.parametrize("option, default, recorded", [("--batch-size", 8, 4), ("--seed", 1000, 7),
                                                       ("--val-frames", 2048, 100)])
def test_resume_refuses_an_option_given_at_its_default_that_conflicts(stopped_run, option, default, recorded):
    store, run = stopped_run
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = cli("train", store, "--out", run, "--resume", "--steps", 3, "--no-progress", option, default)
    one_line_error(result, f"{option} {default} (the run has {recorded})", "cannot resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_accepts_given_options_that_agree_with_the_run(stopped_run):
    store, run = stopped_run
    result = cli("train", store, "--out", run, "--resume", "--steps", 3, "--no-progress", "--batch-size", 4,
                 "--seed", 7, "--val-frames", 100, "--val-episodes", "0.1")
    assert result.exit_code == 0, result.output
    assert "steps       3" in result.output


# ---------------------------------------------------------- 7, 12c. a chunk that fails its checksum --
def flip_a_byte(file: Path) -> None:
    """Bit rot: one byte of a chunk's payload changed, so its crc32c no longer matches."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_inspect_fails_a_store_whose_action_chunk_fails_its_checksum(tmp_path: Path):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=4)
    flip_a_byte(store / "action" / "c" / "0" / "0")
    report = cli("inspect", store)
    assert report.exit_code == 1, report.output
    assert "array 'action' is corrupt or unreadable in action/c/0/0 holding frames 0-" in report.stdout, report.stdout
    one_line_error(cli("train", store, "--out", tmp_path / "run", "--no-progress"), "'action'", "action/c/0/0")
    assert not (tmp_path / "run").exists()


def test_a_checksum_error_in_features_names_the_shard_file_and_frames(tmp_path: Path):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=4)
    flip_a_byte(shard_file(store, "wrist", 2))  # frames 64-95, in chunks of 8
    args = ["--out", tmp_path / "run", "--steps", 2, "--batch-size", 4, "--val-episodes", "none", "--no-progress"]
    line = one_line_error(cli("train", store, *args, *act_args()), "'cameras/wrist/patch'",
                          "in cameras/wrist/patch/c/2/0/0/0 holding frames ")
    first, last = map(int, re.search(r"holding frames (\d+)-(\d+)", line).groups())
    assert 64 <= first and last == first + 7 and last <= 95, line
    report = cli("inspect", store)
    assert report.exit_code == 1 and "cameras/wrist/patch/c/2/0/0/0 holding frames" in report.stdout, report.output
