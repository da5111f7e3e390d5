"""Issue 13's fault campaign: each broken input built the way it was found, and the one clear line it must end in.

Nothing may come out silently wrong (a store missing a shard file, a diverging loss, a resume that
ignores an option, a wrong frame rate), and nothing may end in a traceback, a stuck folder or a
misleading message. Inputs are small real ones: generated stores and datasets with real encoded
video, written to disk and broken with file operations.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dinocache.cli import main
from dinocache.datasets import open_dataset
from dinocache.encoders.backbone import create_backbone
from dinocache.errors import BackboneError, DatasetError, DinocacheError
from dinocache.pipeline.extract import extract
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.deployment.runtime import PolicyError, load_policy
from dinocache.policy.training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from _datasets import (V30_EPISODES, edit_episode_table, edit_hdf5, edit_json, make, reencode, truncate,  # noqa: E402
                       v21_video)
from test_extract import config, extract_args, store_files  # noqa: E402
from test_train import TINY  # noqa: E402
from _export import observations  # noqa: E402
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
    one_line_error(cli("train", *args), "unit 1 (frames 32-63)", "shard file cameras/top/patch/c/1/0/0/0 is missing",
                   "re-run the same `dinocache extract` command")
    assert not (tmp_path / "run").exists(), "a run that never trained leaves no folder behind"

    report = cli("inspect", store)
    assert report.exit_code == 1, report.output
    assert "complete    incomplete: all 4 units are marked done" in report.stdout, report.stdout
    assert "camera 'top': 32 frame(s) contain NaN" in report.stdout


@pytest.mark.parametrize("key", ["action", "observation.state"])
def test_a_store_missing_a_lowdim_chunk_is_refused_naming_the_array(tmp_path: Path, key: str):
    """Actions and states are written whole when the store is made; a chunk file of theirs lost since
    reads as NaN, and is refused before the first step like a missing feature shard."""
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=4)
    chunk = store / key / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    result = cli("train", store, "--out", tmp_path / "run", "--steps", 200, "--batch-size", 4, "--val-episodes",
                 "none", "--no-progress", *act_args())
    one_line_error(result, f"array {key!r}", "NaN or inf", "chunk file is missing or damaged", "dinocache inspect")
    assert not (tmp_path / "run").exists()


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


# ------------------------------------------------- 4, 5. runs that die (or would) before a checkpoint --
@pytest.mark.parametrize("option, value", [("--batch-size", 0), ("--steps", 0), ("--save-every", 0)])
def test_a_meaningless_option_is_refused_before_any_folder_is_made(tmp_path: Path, option, value):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=2)
    one_line_error(cli("train", store, "--out", tmp_path / "run", option, value, "--no-progress"),
                   f"{option} {value}: must be a whole number of at least")
    assert not (tmp_path / "run").exists()


def test_a_run_that_dies_before_its_first_checkpoint_does_not_lock_its_folder(tmp_path: Path, monkeypatch):
    store, run = tmp_path / "f.zarr", tmp_path / "run"
    make_store(store, num_episodes=4)
    args = [store, "--out", run, "--steps", 3, "--batch-size", 4, "--val-episodes", "none", "--no-progress",
            *act_args()]

    # In the process: an error at the first step releases the folder.
    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(torch.optim.AdamW, "step", crash)
    assert isinstance(cli("train", *args).exception, RuntimeError)
    monkeypatch.undo()
    assert not run.exists()

    # Killed outright (nothing can clean up): the recorded run starts again with --resume.
    killer = ("import os, signal, sys, torch; from dinocache.cli import main; "
              "torch.optim.AdamW.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); main(['train', *sys.argv[1:]])")
    done = subprocess.run([sys.executable, "-c", killer, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (run / "run.json").is_file() and not (run / "checkpoints" / "last").exists()
    one_line_error(cli("train", *args), "already holds a training run", "--resume to start it again")
    resumed = cli("train", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "steps       3" in resumed.output and (run / "checkpoints" / "last").resolve().name == "000003"


# ------------------------------------------------------- 12a. a chunk longer than every episode --
def test_a_chunk_longer_than_every_episode_is_said(tmp_path: Path):
    store = tmp_path / "f.zarr"
    make_store(store, num_episodes=2, lengths=(10, 12))
    result = cli("train", store, "--out", tmp_path / "run", "--steps", 1, "--batch-size", 4, "--val-episodes", "none",
                 "--no-progress", *act_args(chunk_size=40))
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warning) == 1 and "--chunk-size 40 is longer than every episode (the longest has 12 frames)" in warning[0]
    assert int(re.search(r"(\d+)% of the training action windows is padding", warning[0]).group(1)) > 80
    quiet = cli("train", store, "--out", tmp_path / "run2", "--steps", 1, "--batch-size", 4, "--val-episodes", "none",
                "--no-progress", *act_args(chunk_size=5))
    assert quiet.exit_code == 0 and "warning" not in quiet.output


# -------------------------------------------------------------------------------- stage one --


def test_a_full_disk_during_extraction_ends_in_one_line_and_resumes(small_dataset: Path, tmp_path: Path, monkeypatch):
    import zarr.storage._local as local_store

    put, feature_files = local_store._put, []

    def filling_disk(path, value, exclusive=False):
        """The disk holds the store's skeleton and two units' features, then every write fails."""
        if {"cameras", "c"} <= set(Path(path).parts):  # a feature shard (not metadata)
            feature_files.append(path)
            if len(feature_files) > 2 * 4:  # 2 cameras x (patch, cls) per unit
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, value, exclusive)

    out = tmp_path / "f.zarr"
    monkeypatch.setattr(local_store, "_put", filling_disk)
    line = one_line_error(cli(*extract_args(small_dataset, out)), "cannot write unit 2", "No space left on device",
                          "The 2 units already written are kept", "re-run the same command")
    assert "Traceback" not in line
    monkeypatch.undo()
    rerun = cli(*extract_args(small_dataset, out))
    assert rerun.exit_code == 0 and "(2 already done)" in rerun.stdout, rerun.output
    extract(config(small_dataset, tmp_path / "clean.zarr"))
    assert store_files(out) == store_files(tmp_path / "clean.zarr")


def test_a_failed_extraction_leaves_no_hidden_creating_folder(tmp_path: Path):
    dataset = make(tmp_path)
    video = v21_video(dataset, 2)
    reencode(video, 2, 12, faststart=True)  # the header promises 12 frames ...
    truncate(video, 0.6)  # ... the data runs out: found only when the store's verification frames are decoded
    for _ in range(2):
        one_line_error(cli(*extract_args(dataset, tmp_path / "f.zarr")), str(video), "episode 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lerobot-v2.1"]


def test_an_asked_for_episode_that_was_skipped_says_why(tmp_path: Path):
    dataset = make(tmp_path)
    truncate(v21_video(dataset, 2), 0.5)  # episode 2's video cannot be opened
    one_line_error(cli(*extract_args(dataset, tmp_path / "f.zarr", "--skip-bad-episodes", "--episodes", "1,2")),
                   "--episodes: episode 2 was skipped as bad", "cannot open video")
    one_line_error(cli(*extract_args(dataset, tmp_path / "f.zarr", "--skip-bad-episodes", "--episodes", "1,7")),
                   "episode(s) [7] are not in the dataset")


def test_an_identity_refusal_names_the_fields_that_differ(small_dataset: Path, tmp_path: Path):
    out = tmp_path / "f.zarr"
    extract(config(small_dataset, out, episodes="0:1"))
    line = one_line_error(cli(*extract_args(small_dataset, out, "--episodes", "0:1", "--image-size", "28")),
                          "preprocess.image_size: store has [56, 56], asked for [28, 28]",
                          "backbone.grid_size: store has [4, 4], asked for [2, 2]", "--overwrite")
    assert "timm_id" not in line and "weights" not in line and "'mean'" not in line, line  # only what differs


# ---------------------------------------------------------------------------------- readers --


@pytest.mark.parametrize("fmt", ["lerobot-v2.1", "lerobot-v3.0"])
def test_an_info_fps_that_contradicts_timestamps_and_video_is_refused(tmp_path: Path, fmt):
    dataset = make(tmp_path, format=fmt)  # parquet timestamps and video streams at 30 fps
    edit_json(dataset / "meta" / "info.json", lambda info: {**info, "fps": 15})
    with pytest.raises(DatasetError, match=r"info.json: declares fps 15, but the parquet timestamps run at 30 fps "
                                           r"and the videos run at 30 fps; correct 'fps'"):
        open_dataset(dataset)
    one_line_error(cli(*extract_args(dataset, tmp_path / "f.zarr")), "declares fps 15")
    assert not (tmp_path / "f.zarr").exists()


def test_an_hdf5_action_shorter_than_the_images_is_named(tmp_path: Path):
    dataset = make(tmp_path, format="aloha-hdf5")
    edit_hdf5(dataset / "episode_1.hdf5", "/action", lambda action: action[:-2])
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(dataset)
    text = str(excinfo.value)
    assert "episode 1: /action has 10 rows but /observations/qpos and /observations/images/top have 12" in text, text
    assert "camera" not in text


# ---------------------------------------------------------------------------------- encoders --
@pytest.mark.parametrize("first", [b"\x17", b"\x80", b"c", b"P", b"\x00"], ids=lambda b: b.hex())
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_weights_file_of_random_bytes_gets_no_unsafe_advice(tmp_path: Path, first: bytes, suffix: str):
    """Whatever its first byte (a pickle protocol marker, an opcode, a zip's "P"), random bytes are
    called not a checkpoint, in one line, without torch's weights_only advice or its warnings."""
    weights = tmp_path / f"model{suffix}"
    weights.write_bytes(first + np.random.default_rng(0).bytes(4095))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(BackboneError) as excinfo:
            create_backbone("dinov2_vits14", weights=str(weights), image_size=28)
    assert not [w for w in shown if "pickle" in str(w.message)], [str(w.message) for w in shown]  # torch's "protocol 216"
    text = str(excinfo.value)
    assert "not a PyTorch (.pth/.pt) or .safetensors checkpoint, or it is truncated or damaged" in text, text
    assert str(weights) in text and "weights_only" not in text and "\n" not in text
    assert "Python objects" not in text


def test_a_weights_file_holding_python_objects_names_one(tmp_path: Path):
    weights = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, weights)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone("dinov2_vits14", weights=str(weights), image_size=28)
    text = str(excinfo.value)
    assert "holds Python objects besides tensors (argparse.Namespace)" in text and "weights_only" not in text, text


def test_an_int64_image_is_told_how_to_cast_integers(tmp_path: Path):
    backbone = create_backbone("dinov2_vits14", weights="random", image_size=28)
    frames = torch.full((1, 28, 28, 3), 200, dtype=torch.int64)
    with pytest.raises(BackboneError, match=r"got torch.int64; cast integer frames holding 0-255") as excinfo:
        backbone(frames)
    assert "float frames" not in str(excinfo.value)


# ======================================================================================================
# Issue 34: nothing acts on corrupt data. Each class is tested over several artefacts, byte offsets,
# windows and options, not one instance.
# ======================================================================================================


@pytest.fixture(scope="module")
def artefacts(trained, exported) -> SimpleNamespace:
    """The run the export tests read (a real dataset -> store -> 30 steps, checkpoints 15 and 30), its
    .pt2 and .onnx (conftest.py; read-only: tests damage copies), and the first action each file gives
    for ``observation``."""
    observation = observations(trained, 1)[0]
    actions = {fmt: load_policy(getattr(exported, fmt)).select_action(observation) for fmt in ("pt2", "onnx")}
    return SimpleNamespace(run=trained.run, store=trained.store_path, observation=observation, actions=actions,
                           pt2=exported.pt2, onnx=exported.onnx)


def damage(file: Path, where: float | str) -> None:
    """One bit flipped at a fraction of the file's length (0: its first byte, 1: its last), or the file
    cut at ``"truncated"`` (its second half gone). In JSON the lowest bit, so that a digit stays a digit
    ('4' <-> '5') and the document stays valid; elsewhere the highest (in a float32 weight: its sign, or
    a high mantissa bit), a change that shows in the actions."""
    data = bytearray(file.read_bytes())
    if where == "truncated":
        data = data[:len(data) // 2]
    else:
        data[round(float(where) * (len(data) - 1))] ^= 0x01 if file.suffix == ".json" else 0x80
    file.unlink()  # not through the link: a copied run's other checkpoints keep their bytes
    file.write_bytes(bytes(data))


def refused_in_one_line(error: BaseException, *fragments: str) -> str:
    assert isinstance(error, DinocacheError), repr(error)
    text = str(error)
    assert "\n" not in text and all(f in text for f in fragments), text
    return text


CHECKPOINT_FILES = ["model.safetensors", "config.json", "training_state.safetensors", "training_state.json"]
#: The readers of each file: train --resume reads them all; export, finetune and load_policy the head's.
HEAD_FILES = {"model.safetensors", "config.json"}


@pytest.mark.parametrize("where", [0.0, 0.33, 0.67, 1.0, "truncated"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_is_refused_by_every_reader_naming_it(artefacts, tmp_path: Path, name, where):
    run = tmp_path / "run"
    shutil.copytree(artefacts.run, run, symlinks=True)
    file = (run / "checkpoints" / "last").resolve() / name
    damage(file, where)
    resumed = cli("train", artefacts.store, "--out", run, "--resume", "--steps", 31, "--no-progress")
    line = one_line_error(resumed, f"checkpoints/last/{name}", "the run's other checkpoints: 000015")
    assert "point" in line and "at one to resume from it" in line, line
    if name in HEAD_FILES:
        one_line_error(cli("export", run, "--out", tmp_path / "p.pt2", "--no-progress"), name)
        one_line_error(cli("finetune", run, "--out", tmp_path / "ft", "--steps", 1, "--no-progress"), name)
        with pytest.raises(DinocacheError) as excinfo:
            load_policy(run)
        refused_in_one_line(excinfo.value, name)
        assert not (tmp_path / "p.pt2").exists() and not (tmp_path / "ft").exists()


def test_a_checkpoint_copied_from_another_step_is_refused(artefacts, tmp_path: Path):
    """Files valid on their own but from another checkpoint: each checkpoint records its own files."""
    run = tmp_path / "run"
    shutil.copytree(artefacts.run, run, symlinks=True)
    last, first = (run / "checkpoints" / "last").resolve(), run / "checkpoints" / "000015"
    for name in ("model.safetensors", "training_state.json"):
        (last / name).unlink()
        shutil.copy(first / name, last / name)
        one_line_error(cli("train", artefacts.store, "--out", run, "--resume", "--steps", 31, "--no-progress"),
                       f"checkpoints/last/{name}: ")
        shutil.copy(artefacts.run / "checkpoints" / last.name / name, last / name)


@pytest.mark.parametrize("where", [*np.linspace(0, 1, 9).round(3).tolist(), "truncated"])
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_damaged_policy_file_never_loads_as_another_policy(artefacts, tmp_path: Path, fmt, where):
    """A flipped bit anywhere in a .pt2 or .onnx (in a weight, the program, the metadata, the archive's
    directory) is refused naming the file; only a bit the content does not depend on (say a zip
    entry's timestamp) may load, and then it acts exactly as the intact file."""
    policy = tmp_path / getattr(artefacts, fmt).name
    shutil.copy(getattr(artefacts, fmt), policy)
    damage(policy, where)
    try:
        loaded = load_policy(policy)
    except DinocacheError as error:
        refused_in_one_line(error, str(policy))
        return
    assert np.array_equal(loaded.select_action(artefacts.observation), artefacts.actions[fmt])


@pytest.mark.parametrize("fmt, named", [("pt2", "onnx"), ("onnx", "pt2")])
def test_a_policy_file_under_the_other_format_s_name_is_named(artefacts, tmp_path: Path, fmt, named):
    policy = tmp_path / f"policy.{named}"
    shutil.copy(getattr(artefacts, fmt), policy)
    with pytest.raises(DinocacheError) as excinfo:
        load_policy(policy)
    refused_in_one_line(excinfo.value, str(policy))


@pytest.mark.parametrize("envs, bad_step", [(1, 0), (1, 3), (2, 2)])
def test_select_action_never_hands_out_a_non_finite_action(artefacts, envs: int, bad_step: int):
    """An observation that drives the network to inf/NaN (a finite but absurd state) at any step, in
    any environment: the runtime raises naming the step instead of returning the action."""
    policy = load_policy(artefacts.run, temporal_ensemble_coeff=0.01)  # the model runs at every step
    absurd = {**artefacts.observation, "observation.state": np.full_like(artefacts.observation["observation.state"],
                                                                         3e38)}
    for step in range(bad_step):
        actions = policy.select_actions([artefacts.observation] * envs)
        assert np.isfinite(actions).all()
    with pytest.raises(PolicyError, match=rf"non-finite action at {'environment 1, ' if envs > 1 else ''}"
                                          rf"step {bad_step} since reset") as excinfo:
        policy.select_actions([artefacts.observation] * (envs - 1) + [absurd])
    refused_in_one_line(excinfo.value, "nothing was handed out")


# --------------------------------------------------------------------- every decoded frame verified --
def decoder_sees_damage(video: Path) -> bool:
    """Whether FFmpeg itself (through PyAV, as any reader would use it) flags damage in ``video``: an
    error, a packet marked corrupt, or a frame decoded with concealed errors."""
    import av

    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.is_corrupt or any(frame.is_corrupt for frame in packet.decode()):
                    return True
    except av.FFmpegError:
        return True
    return False


def read_all_frames(dataset: Path, episode: int) -> np.ndarray:
    source = open_dataset(dataset)
    return np.concatenate(list(source.iter_frames(episode, "observation.images.top", batch_size=8)))


@pytest.fixture(scope="module")
def long_episodes(tmp_path_factory) -> SimpleNamespace:
    """Three 40-frame episodes of 96x128 H.264: long enough for several damaged frames to follow one."""
    dataset = make(tmp_path_factory.mktemp("video"), episode_length=40, image_size=(96, 128))
    return SimpleNamespace(dataset=dataset, frames=read_all_frames(dataset, 1))


@pytest.mark.parametrize("where", np.linspace(0.04, 0.96, 12).round(2).tolist())
def test_damage_the_decoder_can_see_is_an_error_naming_episode_camera_and_frame(long_episodes, tmp_path, where):
    """16 damaged bytes anywhere in an episode's mp4: whatever FFmpeg flags (a packet, a frame decoded
    with concealed errors, a decode error) stops the read naming the episode and camera (and, for a
    frame, which); damage FFmpeg cannot see (H.264 carries no checksum) must at least not be made
    worse: the frames are then FFmpeg's own."""
    dataset = tmp_path / "data"
    shutil.copytree(long_episodes.dataset, dataset)
    video = v21_video(dataset, 1)
    data = bytearray(video.read_bytes())
    at = round(where * (len(data) - 16))
    data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
    video.write_bytes(bytes(data))
    try:
        frames = read_all_frames(dataset, 1)
    except DatasetError as error:
        text = refused_in_one_line(error, "episode 1", str(video))
        assert "camera 'observation.images.top'" in text or "cannot open video" in text, text
        return
    assert not decoder_sees_damage(video), f"FFmpeg flagged damage at byte {at} that the reader let through"
    assert frames.shape == long_episodes.frames.shape


@pytest.mark.parametrize("episode", [0, 1, 2])
@pytest.mark.parametrize("shift", [0.5, -2 / 30, 0.01, -0.004])
def test_a_shifted_v30_video_window_is_refused_naming_the_episode(tmp_path: Path, episode: int, shift: float):
    """An episode's window in a shared v3.0 video moved by whole frames (its frames are another
    episode's) or by a fraction of one (LeRobot's decoder refuses a frame more than its tolerance_s,
    1e-4 s, from the time asked for): either is refused, at opening or at the first frame decoded."""
    dataset = make(tmp_path, format="lerobot-v3.0")  # three 12-frame episodes in one file
    rows = {row["episode_index"]: row for row in pq.read_table(dataset / V30_EPISODES).to_pylist()}
    for column in ("from_timestamp", "to_timestamp"):
        name = f"videos/observation.images.top/{column}"
        edit_episode_table(dataset, name, episode, rows[episode][name] + shift)
    with pytest.raises(DatasetError) as excinfo:
        read_all_frames(dataset, episode)
    refused_in_one_line(excinfo.value, f"episode {episode}", "camera 'observation.images.top'")


# ---------------------------------------------------------------- the store checks itself as a whole --
@pytest.fixture(scope="module")
def two_stores(small_dataset: Path, tmp_path_factory) -> SimpleNamespace:
    """The same dataset extracted twice (weights of seeds 0 and 1): 6 units of 8 frames, 2 cameras."""
    root = tmp_path_factory.mktemp("stores")
    extract(config(small_dataset, root / "a.zarr"))
    extract(config(small_dataset, root / "b.zarr", seed=1))
    return SimpleNamespace(dataset=small_dataset, a=root / "a.zarr", b=root / "b.zarr")


def edit_zarr_json(file: Path, edit) -> None:
    document = json.loads(file.read_text())
    edit(document)
    file.write_text(json.dumps(document))


def set_rows(file: Path, delta: int):
    return lambda document: document["shape"].__setitem__(0, document["shape"][0] + delta)


def rewrite_array(store: Path, name: str, change) -> None:
    """New values written through zarr itself: every chunk checksum is valid."""
    import zarr

    array = zarr.open_array(store / name, mode="r+")
    array[...] = change(array[...])


STRUCTURAL_EDITS = {
    "action rows -3": lambda s: edit_zarr_json(s / "action" / "zarr.json", set_rows(s, -3)),
    "state rows +5": lambda s: edit_zarr_json(s / "observation.state" / "zarr.json", set_rows(s, 5)),
    "cls rows -8": lambda s: edit_zarr_json(s / "cameras" / "observation.images.top" / "cls" / "zarr.json",
                                            set_rows(s, -8)),
    "num_frames -2": lambda s: edit_zarr_json(s / "zarr.json", lambda d: d["attributes"]["dinocache"].__setitem__(
        "num_frames", d["attributes"]["dinocache"]["num_frames"] - 2)),
    "fps 30 -> 15": lambda s: edit_zarr_json(s / "zarr.json", lambda d: d["attributes"]["dinocache"].__setitem__(
        "fps", 15.0)),
    "action std x2": lambda s: rewrite_array(s, "stats/action/std", lambda v: v * 2),
    "a frame moved between episodes": lambda s: rewrite_array(s, "episodes/length", lambda v: v + [-1, 1, 0]),
    "an action row changed": lambda s: rewrite_array(s, "action", lambda v: np.where(np.arange(len(v))[:, None] == 5,
                                                                                      v + 1, v)),
}


@pytest.mark.parametrize("edit", list(STRUCTURAL_EDITS))
def test_a_store_whose_parts_disagree_is_refused_by_inspect_and_train(two_stores, tmp_path: Path, edit: str):
    store = tmp_path / "f.zarr"
    shutil.copytree(two_stores.a, store)
    STRUCTURAL_EDITS[edit](store)
    report = cli("inspect", store)
    assert report.exit_code != 0 and "every array reads" not in report.output, report.output
    result = cli("train", store, "--out", tmp_path / "run", "--steps", 1, "--no-progress", *act_args())
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert str(store) in result.stderr and not (tmp_path / "run").exists(), result.stderr


def unit_file(store: Path, unit: int, camera: str, part: str) -> Path:
    return store / "cameras" / f"observation.images.{camera}" / part / "c" / str(unit) / "0" / ("0/0" if part == "patch" else "")


@pytest.mark.parametrize("source", ["another unit", "another store", "lost"])
@pytest.mark.parametrize("camera, part, unit", [("top", "patch", 2), ("wrist", "cls", 4), ("wrist", "patch", 0)])
def test_a_shard_not_written_for_its_unit_is_refused_and_extract_redoes_it(two_stores, tmp_path: Path, source,
                                                                          camera, part, unit):
    """A shard file copied from another unit (the same size: a full unit's) or another store, or lost:
    inspect fails naming the unit and file, training refuses, and extract redoes the unit, saying so,
    until the store is byte for byte the one an uninterrupted extraction writes."""
    store = tmp_path / "f.zarr"
    shutil.copytree(two_stores.a, store)
    target = unit_file(store, unit, camera, part)
    if source == "lost":
        target.unlink()
    else:
        origin = two_stores.b if source == "another store" else two_stores.a
        shutil.copy(unit_file(origin, unit if source == "another store" else (unit + 1) % 4, camera, part), target)
    name = str(target.relative_to(store))
    report = cli("inspect", store)
    assert report.exit_code == 1 and f"unit {unit} (frames {8 * unit}-" in report.stdout and name in report.stdout, \
        report.output
    one_line_error(cli("train", store, "--out", tmp_path / "run", "--steps", 1, "--no-progress"), f"unit {unit}",
                   name, "re-run the same `dinocache extract` command")
    rerun = cli(*extract_args(two_stores.dataset, store))
    assert rerun.exit_code == 0, rerun.output
    assert f"unit {unit} (frames {8 * unit}-" in rerun.output and "redoing it" in rerun.output, rerun.output
    assert "(5 already done)" in rerun.stdout, rerun.stdout
    assert store_files(store) == store_files(two_stores.a)
    assert cli("inspect", store).exit_code == 0


# ------------------------------------------------------------------------------- every failure one line --
OUT_OF_RANGE = [
    ("extract", "--batch-size", "0"), ("extract", "--batch-size", "-4"), ("extract", "--unit-frames", "0"),
    ("extract", "--chunk-frames", "0"), ("extract", "--seed", "-1"), ("extract", "--dask-workers", "0"),
    ("inspect", "--frames", "0"), ("bench-policy", "--steps", "0"), ("bench-policy", "--warmup", "-1"),
    ("bench-policy", "--threads", "0"), ("make-sample", "--episodes", "0"), ("make-sample", "--length", "0"),
    ("make-sample", "--image-size", "0x0"), ("make-sample", "--cameras", "top,top"),
    ("train", "--steps", "0"), ("train", "--seed", "-1"), ("train", "--val-frames", "-1"), ("train", "--lr", "-1"),
    ("train", "--kl-weight", "-0.5"), ("train", "--dropout", "1.5"), ("train", "--grad-clip-norm", "-1"),
    ("train", "--optimizer-weight-decay", "nan"), ("train", "--chunk-size", "0"), ("finetune", "--layer-decay", "0"),
    ("finetune", "--unfreeze-last", "0"), ("finetune", "--optimizer-lr-backbone", "-1e-6"),
    ("sim eval", "--max-steps", "0"), ("sim demos", "--episodes", "0"),
]


@pytest.mark.parametrize("command, option, value", OUT_OF_RANGE, ids=lambda v: str(v))
def test_a_numeric_option_out_of_range_is_one_line_before_any_work(two_stores, artefacts, tmp_path: Path,
                                                                   command: str, option: str, value: str):
    out = tmp_path / "out"
    inputs = {"extract": [two_stores.dataset, "--out", out], "inspect": [two_stores.a], "bench-policy": [artefacts.run],
              "make-sample": [out], "train": [two_stores.a, "--out", out, "--no-progress", "--steps", 1],
              "finetune": [artefacts.run, "--out", out, "--steps", 1], "sim eval": [artefacts.run],
              "sim demos": ["--out", out]}[command]
    field = f"`{option[2:].replace('-', '_')}`".replace("`lr`", "`optimizer_lr`")  # ACT fields: LeRobot's names
    line = one_line_error(cli(*command.split(), *inputs, option, value))
    assert option in line or field in line, line
    assert value in line or "range" in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_grad_clip_norm_of_zero_turns_clipping_off_as_in_lerobot(two_stores, tmp_path: Path):
    """LeRobot clips only when grad_clip_norm > 0; 0 used to scale every gradient by 0 (no step moved
    a weight, and the run still reported a validation score)."""
    def weights(clip: float) -> dict[str, torch.Tensor]:
        run = tmp_path / f"clip-{clip}"
        result = cli("train", two_stores.a, "--out", run, "--steps", 3, "--batch-size", 4, "--val-episodes", "none",
                     "--save-every", 1, "--no-progress", *act_args(grad_clip_norm=clip))
        assert result.exit_code == 0, result.output
        return {step: load_file(run / "checkpoints" / f"{step:06d}" / "model.safetensors") for step in (1, 3)}

    off, huge = weights(0), weights(1e30)
    assert all(torch.equal(off[3][k], huge[3][k]) for k in off[3]), "0 is no clipping: as an unreachable clip"
    assert any(not torch.equal(off[1][k], off[3][k]) for k in off[3] if k.startswith("head.")), "the weights move"


@pytest.fixture
def unwritable(tmp_path: Path):
    """Two real folders no file fits in: a full disk (a 1 MiB tmpfs, filled) and a read-only one. Needs the
    right to mount (root); skipped elsewhere."""
    places = {"full disk": tmp_path / "full", "read-only": tmp_path / "ro"}
    for place in places.values():
        place.mkdir()
    mounted = []
    try:
        for place, options in zip(places.values(), ("size=1M", "ro,size=1M")):
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(place)], check=True, capture_output=True)
            mounted.append(place)
    except (OSError, subprocess.CalledProcessError) as err:
        for place in mounted:
            subprocess.run(["umount", "-l", str(place)], check=False)
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    filler = os.open(places["full disk"] / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(filler, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(filler)
    yield places
    for place in mounted:  # lazily: a file a failed writer left open keeps the mount busy until it is collected
        subprocess.run(["umount", "-l", str(place)], check=False)


@pytest.mark.parametrize("place", ["full disk", "read-only"])
def test_a_full_disk_or_read_only_folder_is_one_line_in_every_command(unwritable, two_stores, artefacts, place):
    """Every command that writes, pointed at a disk with no room or a read-only folder: one line naming
    what could not be written, exit 2, nothing left behind (and no abort: torch's archive writer aborts
    the process on a full disk, so export finds out first)."""
    root = unwritable[place]
    before = sorted(p.name for p in root.iterdir())
    commands = {
        "extract": [*extract_args(two_stores.dataset, root / "f.zarr")],
        "train": ["train", two_stores.a, "--out", root / "run", "--steps", 2, "--batch-size", 4, "--no-progress",
                  *act_args()],
        "export onnx": ["export", artefacts.run, "--out", root / "p.onnx", "--no-progress"],
        "inspect --pca": ["inspect", two_stores.a, "--pca", root / "pca.png", "--quick"],
        "make-sample": ["make-sample", root / "sample"],
        "finetune": ["finetune", artefacts.run, "--out", root / "ft", "--steps", 1, "--no-progress"],
    }
    for name, args in commands.items():
        result = cli(*args)
        assert result.exit_code == 2, (name, result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dinocache: error: ") and str(root) in lines[0], (name, lines)
        assert sorted(p.name for p in root.iterdir()) == before, (name, list(root.iterdir()))
    # the .pt2 in its own process: a regression here aborts the process rather than raising
    done = subprocess.run([sys.executable, "-m", "dinocache.cli", "export", str(artefacts.run), "--out",
                           str(root / "p.pt2"), "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "nothing was written" in done.stderr, done.stderr
    assert sorted(p.name for p in root.iterdir()) == before


def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint_and_resumes(two_stores, tmp_path: Path,
                                                                                 monkeypatch):
    import dinocache.policy.training.checkpointing as checkpoint

    run, saved = tmp_path / "run", []
    real = checkpoint.save_file

    def filling(tensors, path, *args, **kwargs):
        saved.append(path)
        if len(saved) > 2:  # the first checkpoint's two files fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *args, **kwargs)

    args = ["train", two_stores.a, "--out", run, "--steps", 3, "--batch-size", 4, "--save-every", 1,
            "--val-episodes", "none", "--no-progress", *act_args()]
    monkeypatch.setattr(checkpoint, "save_file", filling)
    one_line_error(cli(*args), "No space left on device", "the last checkpoint (step 1) is kept", "--resume")
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000001", "last"]  # no half checkpoint
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0 and "steps       3" in resumed.output, resumed.output


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_writers_killed_outright_are_swept_by_the_next_run(artefacts, two_stores, tmp_path: Path):
    """A SIGKILL leaves what no process can clean up: the next export of the same file, the next checkpoint
    of the run and the next PCA picture delete their own kind (of processes that are gone)."""
    out, pid = tmp_path / "policy.pt2", dead_pid()  # every format's export sweeps alike (atomic.check_room)
    left = [tmp_path / f".policy.{pid}.tmp.pt2", tmp_path / f".pca.{pid}.tmp.png"]
    alive = tmp_path / f".policy.{os.getppid()}.tmp.pt2"  # a live writer's is left alone
    for file in [*left, alive]:
        file.write_bytes(b"x" * 1000)
    run = tmp_path / "run"
    shutil.copytree(artefacts.run, run, symlinks=True)
    (run / "checkpoints" / ".000009.tmp").mkdir()
    assert cli("export", run, "--out", out, "--no-progress").exit_code == 0
    assert cli("inspect", two_stores.a, "--pca", tmp_path / "pca.png", "--quick").exit_code == 0
    assert cli("train", artefacts.store, "--out", run, "--resume", "--steps", 31, "--no-progress").exit_code == 0
    assert not any(file.exists() for file in left) and alive.exists()
    assert not (run / "checkpoints" / ".000009.tmp").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu"])
def test_a_device_this_machine_lacks_is_one_line_in_every_command(two_stores, artefacts, tmp_path: Path, device):
    commands = [[*extract_args(two_stores.dataset, tmp_path / "f.zarr"), "--device", device],
                ["train", two_stores.a, "--out", tmp_path / "run", "--no-progress", "--device", device],
                ["export", artefacts.run, "--out", tmp_path / "p.pt2", "--no-progress", "--device", device],
                ["finetune", artefacts.run, "--out", tmp_path / "ft", "--no-progress", "--device", device],
                ["bench-policy", artefacts.run, "--device", device]]
    for args in commands:
        one_line_error(cli(*args), f"{device}: " + ("not a device" if device == "gpu" else "CUDA is not available"))
    with pytest.raises(DinocacheError, match=f"device {device}"):
        load_policy(artefacts.pt2, device=device)
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_cannot_fit_is_refused_before_it_is_allocated(two_stores, tmp_path: Path):
    one_line_error(cli(*extract_args(two_stores.dataset, tmp_path / "f.zarr"), "--batch-size", 10**7),
                   "--batch-size 10000000: one batch needs at least", "GiB of RAM is free")
    one_line_error(cli("train", two_stores.a, "--out", tmp_path / "run", "--batch-size", 10**7, "--no-progress"),
                   "--batch-size 10000000: one batch needs at least", "could fit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["lerobot-v2.1", "lerobot-v3.0"])
@pytest.mark.parametrize("column", ["observation.state", "action"])
def test_text_in_a_number_column_is_one_line_naming_file_and_column(tmp_path: Path, fmt: str, column: str):
    dataset = make(tmp_path, format=fmt)
    file = next((dataset / "data").rglob("*.parquet"))
    table = pq.read_table(file)
    rows = [[str(v) for v in row] for row in table[column].to_pylist()]
    rows[1][0] = "n/a"
    import pyarrow as pa

    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(rows)), file)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(dataset)
    refused_in_one_line(excinfo.value, str(file), f"column {column!r}", "not numbers")


def test_a_torn_metrics_line_does_not_stop_a_resume(artefacts, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(artefacts.run, run, symlinks=True)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 40, "loss": 1.2')  # a run killed while appending
    result = cli("train", artefacts.store, "--out", run, "--resume", "--steps", 31, "--no-progress")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------- a frame found damaged in the middle of extraction --
#: Episodes of 8, 8, 4 and 60 frames: episode 2 holds none of the 8 rows whose frames the store keeps
#: (decoded when it is created), so its damage is met while units are filled: units 0-1 (rows 0-15, episodes
#: 0-1) are written by then, and episode 3 leaves the work after it.
DAMAGED_LENGTHS = [8, 8, 4, 60]


def zero_tail_of_video(dataset: Path) -> None:
    """A corrupt packet: the last third of episode 2's media data zeroed (size and index kept)."""
    from test_extract import zero_tail_of_mdat

    zero_tail_of_mdat(v21_video(dataset, 2), 0.3)


def shift_a_timestamp(dataset: Path) -> None:
    """Frame 2 of episode 2 recorded 10 ms late in its parquet row (still increasing, so opening passes)."""
    import pyarrow as pa

    file = dataset / "data" / "chunk-000" / "episode_000002.parquet"
    table = pq.read_table(file)
    column = table.schema.get_field_index("timestamp")
    values = table["timestamp"].to_numpy().copy()
    values[2] += 0.01
    pq.write_table(table.set_column(column, "timestamp", pa.array(values, type=table.schema.field(column).type)), file)


def damage_a_jpeg(dataset: Path) -> None:
    """Frame 2 of episode 2's JPEG cut after its first two bytes (zero padding after them, as the recorder pads)."""
    def cut(frames: np.ndarray) -> np.ndarray:
        frames = frames.copy()
        frames[2, 2:] = 0
        return frames

    edit_hdf5(dataset / "episode_2.hdf5", "/observations/images/top", cut)


#: Each class of damage met mid-extraction: how the dataset is written and broken, and what the reason says.
MID_EXTRACTION_DAMAGE = {
    "corrupt packet": (dict(format="lerobot-v2.1"), zero_tail_of_video, ["cannot decode the video after frame"]),
    "timestamp off": (dict(format="lerobot-v2.1"), shift_a_timestamp, ["frame 2 is at", "parquet row says"]),
    "damaged JPEG": (dict(format="aloha-hdf5", aloha_compressed=True), damage_a_jpeg,
                     ["frame 2 does not decode as JPEG"]),
}


def damaged_mid_extraction(root: Path, damage: str) -> tuple[Path, list[str]]:
    options, breaking, said = MID_EXTRACTION_DAMAGE[damage]
    dataset = make(root, num_episodes=4, episode_length=DAMAGED_LENGTHS, **options)
    breaking(dataset)
    return dataset, ["episode 2: ", "camera 'observation.images.top'", *said]


def shard_inodes(store: Path, units: range) -> list[int]:
    return [shard_file(store, "observation.images.top", unit, part).stat().st_ino for unit in units
            for part in ("patch", "cls")]


@pytest.mark.parametrize("damage", list(MID_EXTRACTION_DAMAGE))
def test_skip_bad_episodes_skips_an_episode_found_damaged_mid_extraction(tmp_path: Path, damage: str):
    """Without --skip-bad-episodes the run stops in one line naming episode, camera and frame, keeping
    the units before it. With it, the rerun leaves the episode out, recorded with that line in the
    store's provenance and said in the summary; the units already written are kept (the same files,
    not computed again); the store is whole, and the one a run that skipped from the start writes."""
    dataset, said = damaged_mid_extraction(tmp_path, damage)
    out = tmp_path / "f.zarr"
    one_line_error(cli(*extract_args(dataset, out, "--decode-workers", "1")), *said)
    assert FeatureStore(out).done_units()[:2].all()
    written = shard_inodes(out, range(2))

    skipped = cli(*extract_args(dataset, out, "--skip-bad-episodes"))
    assert skipped.exit_code == 0, skipped.output
    assert "(2 already done)" in skipped.stdout and "SKIPPED 1 bad episode(s):" in skipped.stdout, skipped.stdout
    assert all(fragment in skipped.stdout for fragment in said), skipped.stdout
    store = FeatureStore(out)
    (index, why), = store.record.episodes_skipped
    assert index == 2 and all(fragment in why for fragment in said), why
    assert [episode for episode, *_ in store.episodes()] == [0, 1, 3] and store.done_units().all()
    assert shard_inodes(out, range(2)) == written
    assert cli("inspect", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    again = cli(*extract_args(dataset, out, "--skip-bad-episodes"))  # resumes: nothing left to do
    assert again.exit_code == 0 and f"({store.num_units} already done)" in again.stdout, again.output
    one_line_error(cli(*extract_args(dataset, out)), "episode 2 was left out of this store by --skip-bad-episodes",
                   *said[2:])
    clean = tmp_path / "clean.zarr"
    assert cli(*extract_args(dataset, clean, "--skip-bad-episodes")).exit_code == 0
    assert store_files(out) == store_files(clean)


def test_skip_bad_episodes_after_a_kill_once_the_episode_was_left_out_is_deterministic(tmp_path: Path):
    """Killed (SIGKILL) after the store was laid out again without the damaged episode, part-way
    through the frames after it: the rerun resumes that store (the episode stays out, as recorded)
    and ends byte for byte as an uninterrupted run."""
    dataset, _ = damaged_mid_extraction(tmp_path, "corrupt packet")
    clean = tmp_path / "clean.zarr"
    assert cli(*extract_args(dataset, clean, "--skip-bad-episodes")).exit_code == 0
    out = tmp_path / "f.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "dinocache.cli", *extract_args(dataset, out, "--skip-bad-episodes")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    marks, deadline = out / "units" / "done" / "c", time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # laid out again, and a unit after the episode done
        if b"episodes_skipped" in _read(out / "zarr.json") and len(list(_listing(marks))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = FeatureStore(out).done_units()
    assert 3 <= done.sum() < len(done), done
    rerun = cli(*extract_args(dataset, out, "--skip-bad-episodes"))
    assert rerun.exit_code == 0 and f"({int(done.sum())} already done)" in rerun.stdout, rerun.output
    assert store_files(out) == store_files(clean)


def test_skip_bad_episodes_skips_an_episode_whose_kept_frame_is_damaged(tmp_path: Path):
    """The frames a store keeps are decoded when it is created, before any unit: damage met there is
    left out the same way (nothing is left beside the store). ``--shard`` processes cannot lay a
    store out again: with them it stays an error, saying how to leave the episode out."""
    dataset = make(tmp_path)
    video = v21_video(dataset, 2)
    reencode(video, 2, 12, faststart=True)
    truncate(video, 0.6)  # the header promises 12 frames, the data runs out
    out = tmp_path / "f.zarr"
    one_line_error(cli(*extract_args(dataset, out, "--skip-bad-episodes", "--shard", "0/2")), str(video), "episode 2",
                   "cannot leave an episode out of a store that --shard processes fill together",
                   "re-run without --shard")
    result = cli(*extract_args(dataset, out, "--skip-bad-episodes"))
    assert result.exit_code == 0 and "SKIPPED 1 bad episode(s):" in result.stdout, result.output
    store = FeatureStore(out)
    assert [index for index, _ in store.record.episodes_skipped] == [2] and store.done_units().all()
    assert [episode for episode, *_ in store.episodes()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.zarr", "lerobot-v2.1"]


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        return b""


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []
