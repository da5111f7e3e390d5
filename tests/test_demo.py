"""`dinocache demo`: the bundled sample is what its recipe writes, and the demo runs all three stages on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dinocache.cli import main
from dinocache.demo import SAMPLE_RECIPE, resolve_weights, sample_dataset, write_sample
from dinocache.encoders.weights import WEIGHTS_ENV
from dinocache.datasets import open_dataset

from _devices import DEVICES


def test_the_bundled_sample_is_what_its_recipe_writes(tmp_path: Path):
    """The shipped files are the generator's output: same metadata and arrays, frames within codec noise."""
    shipped, fresh = open_dataset(sample_dataset()), open_dataset(write_sample(tmp_path / "sample"))
    assert shipped.format == "lerobot-v2.1"
    assert json.loads((sample_dataset() / "meta" / "info.json").read_text()) == \
        json.loads((tmp_path / "sample" / "meta" / "info.json").read_text())
    assert [e.length for e in shipped.episodes] == [SAMPLE_RECIPE["episode_length"]] * SAMPLE_RECIPE["num_episodes"]
    assert list(shipped.cameras) == [f"observation.images.{c}" for c in SAMPLE_RECIPE["cameras"]]
    for episode in (0, SAMPLE_RECIPE["num_episodes"] - 1):
        ours, theirs = shipped.read_lowdim(episode), fresh.read_lowdim(episode)
        for key in ("observation.state", "action"):
            np.testing.assert_array_equal(ours[key], theirs[key])
        for camera in shipped.cameras:
            a = shipped.read_frames(episode, camera).astype(np.int16)
            b = fresh.read_frames(episode, camera).astype(np.int16)
            assert a.shape == (SAMPLE_RECIPE["episode_length"], *SAMPLE_RECIPE["image_size"], 3)
            assert np.abs(a - b).mean() < 1.0  # another encoder build may round differently, by a grey level


def test_weights_fall_back_to_random_with_one_visible_line(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    weights, line = resolve_weights("dinov2_vits14_reg", None)
    assert weights == "random" and "RANDOM" in line and "\n" not in line
    assert resolve_weights("dinov2_vits14_reg", "/w/model.pth") == ("/w/model.pth", "weights: /w/model.pth (--weights)")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_demo_runs_all_three_stages_from_the_command_line(tmp_path: Path, device: str):
    """The README's first command, shortened (30 steps, 28 px: a 2x2 patch grid), in a fresh process with no
    weights around (and the suite's torch threads, conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-hf"), HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "dinocache.cli", "demo", "--out", str(out), "--steps", "30", "--image-size", "28",
               "--batch-size", "8", "--control-steps", "6", "--device", device, "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "RANDOM weights" in text and "validation L1" in text and "over 3 held-out episodes" in text
    assert "in action std" in text and "These numbers come from RANDOM backbone weights" in text
    for name in ("features.zarr", "features_pca.png", "run/loss.png", "run/run.json", "policy.pt2"):
        assert (out / name).exists(), name
    provenance = json.loads((out / "run" / "run.json").read_text())["store"]["provenance"]
    assert provenance["weights"]["source"] == "random"  # recorded everywhere, not only printed

    # A second demo replaces its own folder; a folder it did not make is never deleted (in this process:
    # the refusal comes before any work, and a second Python start-up would cost more than the check).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    refused = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "mine")], env={WEIGHTS_ENV: None})
    assert refused.exit_code == 2 and "was not made by `dinocache demo`" in refused.stderr, refused.output
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
