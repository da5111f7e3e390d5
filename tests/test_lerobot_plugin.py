"""The ``lerobot_policy_dinocache`` plugin against the real LeRobot package: discovery, config, both
training modes (in process and through a real ``lerobot-train``), and the feature cache's refusals.

Inputs are built once per module: a tiny dataset written by LeRobot's own ``LeRobotDataset.create``
(AV1 video, 3 episodes of 20 frames at 48x64), and dinocache feature stores of it made by ``dinocache
extract`` (``dinov2_vits14`` with seeded random weights at 28x28: a 2x2 patch grid). The head is tiny.
Skipped where LeRobot or the plugin is not installed (``pip install "lerobot[training]" -e
plugins/lerobot_policy_dinocache``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

lerobot = pytest.importorskip("lerobot", reason="LeRobot is not installed")
pytest.importorskip("lerobot_policy_dinocache", reason="the dinocache LeRobot plugin is not installed")

from lerobot.configs import PreTrainedConfig  # noqa: E402
from lerobot.datasets.factory import resolve_delta_timestamps  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata  # noqa: E402
from lerobot.policies.act.configuration_act import ACTConfig as LeRobotACTConfig  # noqa: E402
from lerobot.policies.factory import get_policy_class, make_policy, make_policy_config, make_pre_post_processors  # noqa: E402
from lerobot_policy_dinocache.configuration_dinocache import DinocacheConfig  # noqa: E402
from lerobot_policy_dinocache.modeling_dinocache import DinocachePolicy  # noqa: E402

from dinocache.errors import DinocacheError  # noqa: E402
from dinocache.policy.model.config import ACTConfig  # noqa: E402
from _lerobot import BIN, CAMERA, TINY, write_dataset, write_store  # noqa: E402

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "tiny")


@pytest.fixture(scope="module")
def store32(dataset, tmp_path_factory) -> Path:
    return write_store(dataset, tmp_path_factory.mktemp("stores") / "f32.zarr", "float32")


@pytest.fixture(scope="module")
def meta(dataset) -> LeRobotDatasetMetadata:
    return LeRobotDatasetMetadata("local/tiny", root=dataset)


def make(meta: LeRobotDatasetMetadata, **overrides) -> DinocachePolicy:
    """The policy as ``lerobot-train`` makes it: LeRobot's factory, the dataset's features."""
    return make_policy(make_policy_config("dinocache", **{**TINY, **overrides}), ds_meta=meta)


@pytest.fixture(scope="module")
def batch(dataset, meta) -> dict:
    """The first 8 frames of episode 0 as LeRobot's dataloader and the policy's preprocessor give them."""
    config = make_policy_config("dinocache", **TINY)
    frames = LeRobotDataset("local/tiny", root=dataset, delta_timestamps=resolve_delta_timestamps(config, meta))
    raw = next(iter(torch.utils.data.DataLoader(frames, batch_size=8, shuffle=False)))
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=meta.stats)
    return preprocessor(raw)


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


# ------------------------------------------------------------------------------------------ discovery --
def test_register_third_party_plugins_finds_the_plugin_by_its_distribution_name():
    code = (
        "import importlib.metadata as m, json\n"
        "from lerobot.configs import PreTrainedConfig\n"
        "from lerobot.utils.import_utils import register_third_party_plugins\n"
        "before = 'dinocache' in PreTrainedConfig.get_known_choices()\n"
        "register_third_party_plugins()\n"
        "from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors\n"
        "pre, post = make_pre_post_processors(make_policy_config('dinocache', device='cpu'))\n"
        "print(json.dumps({'before': before, 'after': 'dinocache' in PreTrainedConfig.get_known_choices(),\n"
        "  'policy': get_policy_class('dinocache').__module__ + '.' + get_policy_class('dinocache').__name__,\n"
        "  'names': sorted(d.metadata['Name'] for d in m.distributions() if 'dinocache' in d.metadata['Name']),\n"
        "  'steps': [type(s).__name__ for s in pre.steps]}))\n"
    )
    found = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    assert found["before"] is False and found["after"] is True
    assert found["policy"] == "lerobot_policy_dinocache.modeling_dinocache.DinocachePolicy"
    assert "lerobot_policy_dinocache" in found["names"]
    assert found["steps"] == ["RenameObservationsProcessorStep", "AddBatchDimensionProcessorStep",
                              "DeviceProcessorStep", "NormalizerProcessorStep"]


def test_processors_are_lerobots_own_steps_leaving_images_to_the_backbone_and_flooring_std(meta):
    config = make(meta).config  # its features filled by make_policy from the dataset
    stats = {key: dict(entry) for key, entry in meta.stats.items()}
    stats["observation.state"]["std"] = np.array([0.0, 2.0, 2.0, 2.0])  # a joint that never moved
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    # the names lerobot-eval and lerobot-rollout override (device_processor, rename_observations_processor)
    assert [step["registry_name"] for step in pre.get_config()["steps"]] == [
        "rename_observations_processor", "to_batch_processor", "device_processor", "normalizer_processor"]
    assert [step["registry_name"] for step in post.get_config()["steps"]] == ["unnormalizer_processor",
                                                                               "device_processor"]
    mean = torch.as_tensor(stats["observation.state"]["mean"], dtype=torch.float32)
    image = torch.rand(1, 3, 48, 64)
    out = pre({"observation.state": (mean + 0.5).unsqueeze(0), CAMERA: image})
    torch.testing.assert_close(out["observation.state"], torch.tensor([[0.5, 0.25, 0.25, 0.25]]))  # std 0 -> 1
    torch.testing.assert_close(out[CAMERA], image)  # VISUAL: IDENTITY, the backbone normalises


# --------------------------------------------------------------------------------------------- config --
def test_the_seeds_line_that_lerobots_act_refuses_is_a_dinocache_config():
    with pytest.raises(ValueError, match="ResNet"):
        LeRobotACTConfig(vision_backbone="dinov3_vitb16", device="cpu")
    config = DinocacheConfig(vision_backbone="dinov3_vitb16", freeze_backbone=True, device="cpu")
    assert (config.type, config.vision_backbone, config.image_size, config.preset) == \
        ("dinocache", "dinov3_vitb16", "224x224", None)
    # every ACT field of dinocache's config is a field here, with LeRobot's defaults
    assert config.act_config() == ACTConfig()
    for name in ("chunk_size", "n_action_steps", "temporal_ensemble_coeff", "dim_model", "n_heads", "kl_weight",
                 "optimizer_lr", "optimizer_lr_backbone"):
        assert getattr(config, name) == getattr(LeRobotACTConfig(device="cpu"), name), name


def test_presets_are_reachable_and_apply_to_fields_left_at_their_defaults():
    default = DinocacheConfig(device="cpu")
    assert (default.preset, default.vision_backbone, default.use_cls_token) == ("dinov2-reg", "dinov2_vits14_reg", True)
    base = DinocacheConfig(preset="dinov3-base", chunk_size=20, n_action_steps=10, device="cpu")
    assert (base.vision_backbone, base.use_cls_token, base.chunk_size) == ("dinov3_vitb16", True, 20)
    with pytest.raises(ValueError) as err:
        DinocacheConfig(preset="dinov2-reg", vision_backbone="resnet18", device="cpu")
    one_line(err, "dinov2-reg", "dinov2_vits14_reg", "resnet18")


@pytest.mark.parametrize("overrides, fragments", [
    (dict(vision_backbone="dinov9_vitz"), ["dinov9_vitz"]),
    (dict(vision_backbone="dinov2_vits14", image_size=30), ["30", "multiple of the patch size 14"]),
    (dict(feature_cache="features.zarr", freeze_backbone=False), ["feature_cache", "freeze_backbone"]),
    (dict(n_action_steps=200), ["chunk size"]),
])
def test_config_refuses_in_one_line(overrides, fragments):
    with pytest.raises((ValueError, DinocacheError)) as err:
        DinocacheConfig(device="cpu", **overrides)
    one_line(err, *fragments)


# ------------------------------------------------------------------------------------ training modes --
@pytest.fixture(scope="module")
def store16(dataset, tmp_path_factory) -> Path:
    return write_store(dataset, tmp_path_factory.mktemp("stores") / "f16.zarr", "float16")


#: How far the feature-cache mode's features and loss may be from the online mode's, relative: a float32
#: store holds the online features to float32 kernel noise; float16 (dinocache's default) rounds each
#: value to 2^-11 relative (measured here: the loss 1e-6 apart on this head).
CACHE_TOLERANCE = {"float32": 1e-5, "float16": 1e-3}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_feature_cache_gives_the_online_features_and_loss_without_running_the_backbone(dtype, meta, store32, store16,
                                                                                        batch):
    store, tolerance = {"float32": store32, "float16": store16}[dtype], CACHE_TOLERANCE[dtype]
    online = make(meta, use_cls_token=True)
    cached = make(meta, use_cls_token=True, feature_cache=str(store))
    cached.load_state_dict(online.state_dict())
    calls = []
    cached.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    online.train(), cached.train()

    grids = online._camera_features(batch)
    looked_up = cached._feature_cache().features(batch["index"])
    for key, grid in grids.items():  # the same pixels (LeRobot's decoding, rounded back) through the same backbone
        assert looked_up[key].dtype == getattr(torch, dtype)
        torch.testing.assert_close(looked_up[key].float(), grid, rtol=tolerance, atol=tolerance * grid.abs().max())

    torch.manual_seed(0)  # the CVAE's latent sample and dropout draw the same numbers in both
    loss_online, info_online = online(batch)
    torch.manual_seed(0)
    loss_cached, info_cached = cached(batch)
    assert calls == []  # the frozen backbone did not run
    assert abs(loss_cached.item() - loss_online.item()) <= tolerance * abs(loss_online.item())
    assert info_cached.keys() == {"l1_loss", "kld_loss", "loss"}

    torch.manual_seed(0)
    per_sample, _ = cached(batch, reduction="none")
    assert per_sample.shape == (8,)
    assert not batch["action_is_pad"].any()  # every sample has the same number of valid steps, so ...
    assert abs(per_sample.mean().item() - loss_cached.item()) <= 1e-5 * abs(loss_cached.item())


def test_optimizer_groups_give_a_trained_backbone_its_own_learning_rate(meta):
    frozen = make(meta)
    groups = frozen.get_optim_params()
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(frozen.model.head.parameters()))
    trained = make(meta, freeze_backbone=False, optimizer_lr_backbone=3e-6).get_optim_params()
    assert len(trained) == 2 and trained[1]["lr"] == 3e-6
    assert sum(p.numel() for p in trained[1]["params"]) > 20_000_000  # ViT-S/14


def test_feature_cache_refuses_another_backbone_image_size_weights_or_dataset(meta, store32, tmp_path):
    cases = [
        (dict(vision_backbone="dinov2_vits14_reg"), ["name: store 'dinov2_vits14', policy 'dinov2_vits14_reg'"]),
        (dict(image_size=42), ["preprocess.image_size: store [28, 28], policy [42, 42]"]),
        (dict(backbone_seed=1), ["weights:", "random weights, seed 0"]),
    ]
    for overrides, fragments in cases:
        with pytest.raises(DinocacheError) as err:
            make(meta, feature_cache=str(store32), **overrides)
        one_line(err, str(store32), *fragments)

    other = write_dataset(tmp_path / "other", seed=1)
    with pytest.raises(DinocacheError) as err:
        make(LeRobotDatasetMetadata("local/tiny", root=other), feature_cache=str(store32))
    one_line(err, str(store32), "is not the dataset the store was extracted from", "fingerprint")


def shard(store: Path, unit: int) -> Path:
    """The file holding unit ``unit`` of the camera's patch grids."""
    return store / "cameras" / CAMERA / "patch" / "c" / str(unit) / "0" / "0" / "0"


@pytest.fixture(scope="module")
def store_of_units(dataset, tmp_path_factory) -> Path:
    """A float32 store of the dataset in units of 16 frames (4 units), so that one unit's shard can be another's."""
    from dinocache.pipeline.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("units") / "f.zarr"
    extract(ExtractConfig(dataset=dataset, out=out, backbone="dinov2_vits14", weights="random", image_size="28",
                          dtype="float32", device="cpu", unit_frames=16, chunk_frames=4, progress=False))
    return out


@pytest.mark.parametrize("damage", ["num_frames edited", "a shard from another unit", "a shard lost"])
def test_feature_cache_refuses_a_store_whose_parts_disagree(damage, meta, store_of_units, tmp_path):
    """The store is checked as a whole when the policy opens it (``FeatureStore.check_whole``): an edited
    root record, or a shard file that is not the one written for its unit, reads cleanly chunk by chunk
    and would hand the head other frames' features; refused in one line naming the store."""
    import shutil

    store = tmp_path / "f.zarr"
    shutil.copytree(store_of_units, store)
    if damage == "num_frames edited":
        root = json.loads((store / "zarr.json").read_text())
        root["attributes"]["dinocache"]["num_frames"] -= 4
        (store / "zarr.json").write_text(json.dumps(root))
        fragments = ["the root record (zarr.json attributes) is not the one written"]
    elif damage == "a shard from another unit":
        shutil.copy(shard(store, 0), shard(store, 1))
        fragments = ["unit 1", "is not the one written for unit 1"]
    else:
        shard(store, 1).unlink()
        fragments = ["unit 1", "is missing"]
    with pytest.raises(DinocacheError) as err:
        make(meta, feature_cache=str(store))
    one_line(err, str(store), *fragments)


def lerobot_train(dataset: Path, out: Path, **policy) -> subprocess.CompletedProcess:
    """``lerobot-train`` as a user runs it, 3 steps, a checkpoint at the end."""
    args = [str(BIN / "lerobot-train"), "--policy.type=dinocache", "--policy.push_to_hub=false",
            *(f"--policy.{key}={value}" for key, value in {**TINY, **policy}.items()),
            "--dataset.repo_id=local/tiny", f"--dataset.root={dataset}", "--steps=3", "--batch_size=4",
            "--save_freq=3", "--log_freq=1", "--num_workers=0", "--wandb.enable=false", f"--output_dir={out}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["online", "feature_cache"])
def test_lerobot_train_trains_the_plugin_in_its_own_loop(mode, dataset, store32, meta, batch, tmp_path):
    extra = {"feature_cache": store32} if mode == "feature_cache" else {}
    result = lerobot_train(dataset, tmp_path / "run", **extra)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split(" loss:")[1].split()[0]) for line in result.stderr.splitlines() if " loss:" in line]
    assert len(losses) == 3 and all(np.isfinite(losses)), result.stderr[-2000:]

    folder = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((folder / "config.json").read_text())["type"] == "dinocache"
    config = PreTrainedConfig.from_pretrained(folder)
    config.pretrained_path = folder
    # as lerobot-train --resume loads it: the backbone from the folder (strictly), the dataset's metadata
    policy = get_policy_class(config.type).from_pretrained(folder, config=config, dataset_meta=meta)
    assert policy.config.feature_cache == (str(store32) if extra else None)
    if extra:  # the store is opened, and checked against the loaded backbone, when training first needs it
        assert torch.isfinite(policy.train()(batch)[0])  # opening runs the backbone once, on the store's kept frames
        calls = []
        policy.model.encoder.register_forward_hook(lambda *args: calls.append(1))
        assert torch.isfinite(policy(batch)[0]) and calls == []
    pre, post = make_pre_post_processors(config, pretrained_path=str(folder))
    observation = {key: batch[key][:2] for key in (CAMERA, "observation.state")}
    policy.reset()
    action = post(policy.select_action(observation))
    assert action.shape == (2, 4) and torch.isfinite(action).all()
