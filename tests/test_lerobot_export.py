"""``dinocache export --format lerobot`` against the real LeRobot package: the folder LeRobot's loading path
and processors take as they are, acting as ``dinocache.load_policy`` does; fine-tuned runs too; and
``lerobot-eval --policy.path`` on gym-aloha where the simulator imports.

Runs are trained here by dinocache on a store of a dataset written by LeRobot's own writer (see
``tests/_lerobot.py``). Skipped where LeRobot or the plugin is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot", reason="LeRobot is not installed")
pytest.importorskip("lerobot_policy_dinocache", reason="the dinocache LeRobot plugin is not installed")

from _lerobot import BIN, CAMERA, write_dataset, write_store  # noqa: E402
from test_fault_campaign import damage  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from lerobot.configs import PreTrainedConfig  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata  # noqa: E402
from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors  # noqa: E402
from safetensors import safe_open  # noqa: E402

import dinocache  # noqa: E402
from dinocache.cli import main  # noqa: E402
from dinocache.errors import DinocacheError  # noqa: E402
from dinocache.policy.deployment.lerobot_export import export_lerobot  # noqa: E402
from dinocache.policy.model.integrity import IntegrityError, file_record, write_json  # noqa: E402
from dinocache.policy.model.trainable import BackboneTraining  # noqa: E402
from dinocache.policy.training.finetune import finetune  # noqa: E402
from dinocache.policy.training.train import train  # noqa: E402
from dinocache.policy.training.train_config import TrainConfig  # noqa: E402

#: The head trained here (the names of ``dinocache train``'s options, LeRobot's ACT names).
HEAD = dict(chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1,
            n_vae_encoder_layers=1, latent_dim=4, use_cls_token=True)


def train_run(store: Path, out: Path, steps: int = 10) -> Path:
    train(TrainConfig(store=store, out=out, steps=steps, batch_size=8, act=HEAD, eval_every=steps, save_every=steps,
                      log_every=steps, device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "tiny")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    return train_run(write_store(dataset, root / "f16.zarr", "float16"), root / "act")


def lerobot_load(folder: Path, meta: LeRobotDatasetMetadata):
    """The folder loaded as lerobot-train/-eval load a ``--policy.path``: config, ``make_policy``, processors."""
    config = PreTrainedConfig.from_pretrained(folder)
    config.pretrained_path = folder
    policy = make_policy(config, ds_meta=meta)
    pre, post = make_pre_post_processors(config, pretrained_path=str(folder))
    return policy, pre, post


def compare_with_load_policy(folder: Path, run_folder: Path, dataset: Path, steps: int = 12) -> float:
    """Largest difference, in action standard deviations, between LeRobot's policy (its select_action and
    processors, on LeRobot's frames) and ``dinocache.load_policy`` of the run, over ``steps`` steps of episode 1."""
    meta = LeRobotDatasetMetadata("local/tiny", root=dataset)
    policy, pre, post = lerobot_load(folder, meta)
    runtime = dinocache.load_policy(run_folder)
    frames = LeRobotDataset("local/tiny", root=dataset, episodes=[1])
    std = torch.as_tensor(runtime.metadata["normalization"]["action"]["std"])
    policy.reset(), runtime.reset()
    worst = 0.0
    for i in range(steps):
        frame = frames[i]
        observation = {CAMERA: frame[CAMERA].unsqueeze(0), "observation.state": frame["observation.state"].unsqueeze(0)}
        ours = post(policy.select_action(pre(observation)))[0]
        image = (frame[CAMERA] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # what a robot's camera gives
        theirs = runtime.select_action({CAMERA: image, "observation.state": frame["observation.state"].numpy()})
        worst = max(worst, ((ours - torch.from_numpy(theirs)).abs() / std).max().item())
    return worst


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("export") / "policy"
    return folder, export_lerobot(run, folder)


def test_exported_folder_is_a_lerobot_policy_acting_as_load_policy(exported, run, dataset):
    folder, result = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "dinocache.json", "model.safetensors", "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors", "policy_preprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["type"], config["vision_backbone"], config["image_size"], config["use_cls_token"]) == \
        ("dinocache", "dinov2_vits14", "28x28", True)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any(k.startswith("model.encoder.model.blocks.") for k in keys)  # the backbone that built the cache
    assert any(k.startswith("model.head.vae_encoder.") for k in keys)  # the whole head, CVAE included
    recorded = json.loads((folder / "dinocache.json").read_text())
    assert recorded["parity"]["passed"] and recorded["export"]["lerobot_max_abs_diff"] <= result.tolerance

    worst = compare_with_load_policy(folder, run, dataset)
    assert worst <= recorded["parity"]["tolerance"], (worst, recorded["parity"]["tolerance"])


def test_exported_folder_loads_as_lerobot_rollout_loads_it(exported, dataset):
    """``lerobot-rollout``: the policy class's from_pretrained, processors overriding ``device_processor`` and
    ``rename_observations_processor`` (here a robot whose camera is called ``front``)."""
    folder, _ = exported
    config = PreTrainedConfig.from_pretrained(folder)
    config.pretrained_path = folder
    policy = get_policy_class(config.type).from_pretrained(folder, config=config)
    pre, post = make_pre_post_processors(
        config, pretrained_path=str(folder),
        preprocessor_overrides={"device_processor": {"device": "cpu"},
                                "rename_observations_processor": {"rename_map": {"observation.images.front": CAMERA}}})
    frame = LeRobotDataset("local/tiny", root=dataset, episodes=[0])[3]
    observation = {"observation.images.front": frame[CAMERA], "observation.state": frame["observation.state"]}
    policy.reset()
    action = post(policy.select_action(pre(observation)))  # one unbatched observation, as a robot gives it
    assert action.shape == (1, 4) and torch.isfinite(action).all()


def test_exported_fine_tuned_run_carries_its_trained_backbone(run, dataset, tmp_path):
    tuned = tmp_path / "tuned"
    finetune(run, TrainConfig(store=None, out=tuned, steps=2, batch_size=4, eval_every=2, save_every=2, log_every=2,
                              device="cpu", progress=False), BackboneTraining(lr=1e-3))
    folder = tmp_path / "policy"
    export_lerobot(tuned, folder)
    assert json.loads((folder / "config.json").read_text())["freeze_backbone"] is False
    recorded = json.loads((folder / "dinocache.json").read_text())
    assert recorded["backbone_weights"]["source"] == "finetuned"
    assert compare_with_load_policy(folder, tuned, dataset, steps=6) <= recorded["parity"]["tolerance"]


EXPORTED_FILES = ["model.safetensors", "config.json", "policy_preprocessor.json",
                  "policy_preprocessor_step_3_normalizer_processor.safetensors", "policy_postprocessor.json",
                  "policy_postprocessor_step_0_unnormalizer_processor.safetensors", "dinocache.json"]


def test_the_folder_records_the_digest_of_every_file(exported):
    folder, _ = exported
    recorded = json.loads((folder / "dinocache.json").read_text())
    assert set(recorded["files"]) == set(EXPORTED_FILES) - {"dinocache.json"}
    for name, record in recorded["files"].items():
        assert record == file_record(folder / name), name
    assert "document_sha256" in recorded  # the record is sealed: its own change is refused too


def load_checked(folder: Path):
    """``lerobot-eval --policy.path`` / ``lerobot-rollout``'s loading of the policy (the config parsed first)."""
    config = PreTrainedConfig.from_pretrained(folder)
    return get_policy_class(config.type).from_pretrained(folder, config=config)


@pytest.mark.parametrize("where", [0.5, "truncated"])
@pytest.mark.parametrize("name", EXPORTED_FILES)
def test_a_damaged_file_of_the_folder_is_refused_naming_it(exported, tmp_path, name, where):
    """One bit flipped in any file of the folder (JSON: a digit changed, still valid JSON) or the file cut
    short: the plugin refuses to load the policy in one line naming the file, before any weight loads. The
    processors' files are checked there too: LeRobot loads them itself, but never without the policy."""
    folder = tmp_path / "policy"
    shutil.copytree(exported[0], folder)
    config = PreTrainedConfig.from_pretrained(folder)  # as lerobot-eval parses it, before the damage shows
    damage(folder / name, where)
    with pytest.raises(IntegrityError) as err:
        get_policy_class(config.type).from_pretrained(folder, config=config)
    text = str(err.value)
    assert "\n" not in text and str(folder / name) in text, text


def test_a_missing_file_or_digest_table_is_refused(exported, tmp_path):
    folder = tmp_path / "policy"
    shutil.copytree(exported[0], folder)
    (folder / "policy_preprocessor.json").unlink()
    with pytest.raises(IntegrityError, match="policy_preprocessor.json: missing; export the run again"):
        load_checked(folder)
    shutil.rmtree(folder)
    shutil.copytree(exported[0], folder)
    recorded = json.loads((folder / "dinocache.json").read_text())
    del recorded["files"]
    write_json(folder / "dinocache.json", recorded)  # sealed again: only the table is gone
    with pytest.raises(IntegrityError, match="records no digest of the folder's files"):
        load_checked(folder)


def test_a_hub_snapshot_is_checked_as_a_local_folder(exported, tmp_path):
    """A folder pushed to the Hub: ``from_pretrained("org/name")`` checks the snapshot it downloads (here
    LeRobot's own Hugging Face cache, offline) before loading, and loads it when it is intact."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--local--act" / "snapshots" / revision
    shutil.copytree(exported[0], snapshot)
    (cache / "models--local--act" / "refs").mkdir()
    (cache / "models--local--act" / "refs" / "main").write_text(revision)
    options = dict(cache_dir=cache, local_files_only=True)
    config = PreTrainedConfig.from_pretrained("local/act", **options)
    policy = get_policy_class(config.type).from_pretrained("local/act", config=config, **options)
    assert policy.config.vision_backbone == "dinov2_vits14"
    damage(snapshot / "model.safetensors", 0.5)
    with pytest.raises(IntegrityError, match=f"{snapshot / 'model.safetensors'}: sha256"):
        get_policy_class(config.type).from_pretrained("local/act", config=config, **options)


def test_export_refusals_are_one_line(run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(DinocacheError, match="already exists") as err:
        export_lerobot(run, taken)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["export", str(run), "--format", "lerobot", "--out", str(tmp_path / "h"),
                                       "--dtype", "float16"])
    assert result.exit_code == 2 and "--format lerobot writes the float32 policy" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_lerobot_eval_runs_an_exported_run_on_gym_aloha(tmp_path):
    pytest.importorskip("gym_aloha", reason="gym-aloha (the ALOHA simulator, lerobot[aloha]) is not installed")
    # A run whose inputs are gym-aloha's: one 480x640 camera 'top', 14 joint values in and out.
    aloha = write_dataset(tmp_path / "aloha", image_hw=(480, 640), dim=14, episodes=2, frames=8, fps=50)
    run = train_run(write_store(aloha, tmp_path / "aloha.zarr", "float16"), tmp_path / "act", steps=4)
    folder = tmp_path / "policy"
    export_lerobot(run, folder)
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    args = [str(BIN / "lerobot-eval"), f"--policy.path={folder}", "--policy.device=cpu", "--env.type=aloha",
            "--env.task=AlohaTransferCube-v0", "--env.episode_length=20", "--eval.n_episodes=2",
            "--eval.batch_size=1", f"--output_dir={tmp_path / 'eval'}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["per_group"]["aloha"]["n_episodes"] == 2, info["overall"]
    assert len(info["per_task"][0]["metrics"]["sum_rewards"]) == 2 and np.isfinite(info["overall"]["avg_sum_reward"])


def test_cli_export_format_lerobot_writes_the_folder(run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dinocache.cli", "export", str(run), "--format", "lerobot",
                             "--out", str(tmp_path / "policy")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "type dinocache" in result.stdout and "lerobot-eval --policy.path=" in result.stdout
    assert (tmp_path / "policy" / "config.json").is_file()
