"""The online baseline (`dinocache.policy.training.online`): same loss as the cache, ACT's ResNet18 recipe, it learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from dinocache.encoders.backbone import create_backbone
from dinocache.errors import BackboneError
from dinocache.keys import camera_key
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.training.online import OnlineACT, TrainableBackbone, build_online_act

TINY = dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=2, n_decoder_layers=1,
            n_vae_encoder_layers=1, latent_dim=8, chunk_size=5, n_action_steps=5, dropout=0.0, optimizer_lr=1e-3,
            kl_weight=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(batch_size: int, size: tuple[int, int], cameras=("top",), state_dim=3, action_dim=2,
                 chunk=5, seed=0) -> dict[str, torch.Tensor]:
    """Frames and normalised low-dim tensors with the shapes the head wants (content is irrelevant here)."""
    generator = torch.Generator().manual_seed(seed)
    batch = {camera_key(cam): torch.randint(0, 256, (batch_size, *size, 3), dtype=torch.uint8, generator=generator)
             for cam in cameras}
    batch["observation.state"] = torch.randn(batch_size, state_dim, generator=generator)
    batch["action"] = torch.randn(batch_size, chunk, action_dim, generator=generator)
    batch["action_is_pad"] = torch.zeros(batch_size, chunk, dtype=torch.bool)
    batch["action_is_pad"][0, 3:] = True
    return batch


def test_training_on_the_cache_equals_running_the_backbone_online(tmp_path: Path):
    """Same batch, same seed: the loss from cached features equals the loss from decoded frames + backbone."""
    from dinocache.datasets import open_dataset
    from dinocache.datasets.synthetic import write_synthetic_dataset
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.policy.training.data import CachedFeatures
    from dinocache.policy.training.episodes import open_training_store
    from dinocache.policy.training.run import resolve_act_config

    dataset = write_synthetic_dataset(tmp_path / "data", num_episodes=2, episode_length=[9, 11], image_size=(48, 64),
                                      cameras=("top",), seed=0)
    extract(ExtractConfig(dataset=dataset, out=tmp_path / "f.zarr", backbone="dinov2_vits14", weights="random",
                          image_size="56", unit_frames=8, chunk_frames=4, batch_size=8, progress=False))
    store = open_training_store(tmp_path / "f.zarr")
    chunk = 5
    data = CachedFeatures(store, chunk, use_cls_token=True, memory_budget=1 << 30)
    rows = np.array([0, 4, 6, 8, 9, 15, 19])  # episode ends (8, 19) and chunks that run past them
    cached = data.gather([(data.resident, rows)])

    # Online: decoded frames, low-dim inputs normalised with statistics computed here and windowed by hand.
    source = open_dataset(dataset)
    lowdim = {ep.index: source.read_lowdim(ep.index) for ep in source.episodes}
    frames = {ep.index: source.read_frames(ep.index, "top") for ep in source.episodes}

    def stats(key: str) -> tuple[np.ndarray, np.ndarray]:
        values = np.concatenate([lowdim[e][key] for e in sorted(lowdim)]).astype(np.float64)
        std = values.std(0)
        return values.mean(0), np.where(std < 1e-4, 1.0, std)  # near-constant dimensions are only centred

    (state_mean, state_std), (action_mean, action_std) = stats("observation.state"), stats("action")
    starts = {ep.index: ep.start for ep in source.episodes}
    online: dict[str, list] = {k: [] for k in (camera_key("top"), "observation.state", "action", "action_is_pad")}
    for row in rows:
        episode = max(e for e, s in starts.items() if s <= row)
        t, length = row - starts[episode], len(lowdim[episode]["action"])
        online[camera_key("top")].append(torch.from_numpy(frames[episode][t]))
        online["observation.state"].append(torch.tensor((lowdim[episode]["observation.state"][t] - state_mean) / state_std))
        window = [min(t + k, length - 1) for k in range(chunk)]
        online["action"].append(torch.tensor((lowdim[episode]["action"][window] - action_mean) / action_std))
        online["action_is_pad"].append(torch.tensor([bool(t + k >= length) for k in range(chunk)]))
    online_batch = {k: torch.stack(v) for k, v in online.items()}
    online_batch["observation.state"] = online_batch["observation.state"].float()
    online_batch["action"] = online_batch["action"].float()

    config = resolve_act_config(None, dict(TINY, use_cls_token=True, dropout=0.1), store)
    torch.manual_seed(0)
    model = build_online_act(config, "dinov2_vits14", ["top"], data.inputs.state_dim, data.inputs.action_dim,
                             weights="random", image_size=56, seed=0)
    assert model.head.inputs == data.inputs and not model.trains_backbone
    assert len(model.parameter_groups()) == 1, "a frozen backbone has nothing to optimise"

    assert cached["action_is_pad"].tolist() == online_batch["action_is_pad"].tolist()
    torch.testing.assert_close(cached["action"], online_batch["action"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached["observation.state"], online_batch["observation.state"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        features = model.features(online_batch)
    for key in ("features.top", "cls.top"):
        torch.testing.assert_close(cached[key].float(), features[key], rtol=4e-3, atol=4e-3)

    losses = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        assert not model.encoder.training, "the frozen backbone stays in eval mode"
        for name, compute in (("cache", lambda: model.head.compute_loss(cached)),
                              ("online", lambda: model.compute_loss(online_batch))):
            torch.manual_seed(1)  # the same dropout masks and CVAE noise
            losses[mode, name] = compute()[1]
    for mode in ("train", "eval"):
        for key in ("loss", "l1_loss", "kld_loss"):
            np.testing.assert_allclose(losses[mode, "cache"][key], losses[mode, "online"][key], rtol=2e-3, atol=1e-5)


def test_resnet18_is_finetuned_the_act_way():
    """ACT's recipe: FrozenBatchNorm2d, every conv trains, at optimizer_lr_backbone; the grid is the frozen one."""
    config = ACTConfig(**dict(TINY, optimizer_lr=1e-2, optimizer_lr_backbone=1e-4, optimizer_weight_decay=0.0))
    torch.manual_seed(0)
    model = build_online_act(config, "resnet18", ["top", "wrist"], state_dim=3, action_dim=2, finetune=True,
                             weights="random", image_size=64, seed=0)
    trunk = model.encoder
    assert isinstance(trunk, TrainableBackbone) and model.trains_backbone
    assert model.head.inputs.cameras == [("top", 512, 2, 2), ("wrist", 512, 2, 2)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) == 20
    assert all(p.requires_grad for p in trunk.parameters())

    batch = random_batch(4, (64, 64), cameras=("top", "wrist"))
    # Before any step the trunk computes what the frozen backbone (the cache's) computes.
    frozen = create_backbone("resnet18", weights="random", image_size=64, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(trunk(batch[camera_key("top")])[0], frozen(batch[camera_key("top")])[0])

    groups = model.parameter_groups()
    assert [g.get("lr") for g in groups] == [None, 1e-4]
    optimizer = model.optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    after = model.state_dict()

    # Adam's first step moves each parameter with a gradient by its group's learning rate (times the sign).
    def largest_step(prefix: str) -> float:
        return max((after[k] - before[k]).abs().max().item() for k in before if k.startswith(prefix)
                   and k in dict(model.named_parameters()))

    np.testing.assert_allclose(largest_step("encoder."), 1e-4, rtol=1e-3)
    np.testing.assert_allclose(largest_step("head."), 1e-2, rtol=1e-3)
    frozen_keys = [k for k in before if k.startswith("encoder.") and k.rsplit(".", 1)[-1] in
                   ("running_mean", "running_var", "weight", "bias") and k not in dict(model.named_parameters())]
    assert len(frozen_keys) == 4 * 20
    for key in frozen_keys:
        assert torch.equal(before[key], after[key]), f"{key} changed: BatchNorm must stay frozen"


@pytest.mark.parametrize(("backbone", "finetune", "size"), [("dinov2_vits14", False, 56), ("resnet18", True, 64)])
def test_a_few_steps_reduce_the_loss(backbone: str, finetune: bool, size: int):
    config = ACTConfig(**dict(TINY, use_vae=False, optimizer_lr_backbone=1e-3))
    torch.manual_seed(0)
    model = build_online_act(config, backbone, ["top"], state_dim=3, action_dim=2, finetune=finetune,
                             weights="random", image_size=size, seed=0)
    batch = random_batch(4, (48, 64))
    batch["action"] = batch["observation.state"][:, None, :2].expand(-1, 5, -1).contiguous()  # learnable
    optimizer = model.optimizer()
    losses = []
    for _ in range(12):
        loss, info = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(info["loss"])
    assert losses[-1] < 0.6 * losses[0], losses


def test_refusals():
    with pytest.raises(BackboneError, match="choose 1 to 8"):
        TrainableBackbone(create_backbone("resnet18", weights="random", image_size=32), unfreeze_last=9)
    config = ACTConfig(**TINY)
    model = build_online_act(config, "dinov2_vits14", ["top"], 3, 2, weights="random", image_size=28)
    wrong = ACTInputs(cameras=[("top", 384, 3, 3)], state_dim=3, action_dim=2)
    with pytest.raises(ValueError, match=r"expects grids \(384, 3, 3\), dinov2_vits14 gives \(384, 2, 2\)"):
        OnlineACT(ACTHead(config, wrong), model.encoder)


def test_act_resnet18_trains_online_exports_and_serves_select_action(tmp_path: Path):
    """`dinocache train --online --backbone resnet18 DATASET`: ACT's own recipe, resumable exactly and
    exportable like any run."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from dinocache.cli import main
    from dinocache.datasets.synthetic import write_synthetic_dataset
    from dinocache.policy.deployment.export import export_policy
    from dinocache.policy.deployment.runtime import load_policy

    dataset = write_synthetic_dataset(tmp_path / "data", num_episodes=2, episode_length=8, image_size=(48, 64),
                                      cameras=("top",), seed=0)
    run = tmp_path / "run"
    head = ["--dim-model", "32", "--n-heads", "4", "--dim-feedforward", "64", "--n-encoder-layers", "1",
            "--n-decoder-layers", "1", "--n-vae-encoder-layers", "1", "--latent-dim", "8", "--chunk-size", "4"]
    args = ["train", "--online", "--backbone", "resnet18", "--weights", "random", "--image-size", "32", str(dataset),
            "--out", str(run), "--batch-size", "4", "--val-episodes", "none", "--save-every", "2", "--log-every", "1",
            "--no-progress", *head]
    result = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    resumed = CliRunner().invoke(main, [*args, "--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    whole = tmp_path / "whole"  # the same three steps without the interruption: exactly the same run
    args[args.index(str(run))] = str(whole)
    assert CliRunner().invoke(main, [*args, "--steps", "3"]).exit_code == 0

    def losses(folder: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(run)) == 3 and losses(run) == losses(whole)
    for name in ("backbone.safetensors", "model.safetensors"):
        a, b = (load_file(folder / "checkpoints" / "last" / name) for folder in (run, whole))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    for option, value in (("--backbone", "dinov2_vits14"), ("--image-size", "64"), ("--layer-decay", "0.5")):
        changed = list(args)  # they name the run `whole`, three steps done
        if option in changed:
            changed[changed.index(option) + 1] = value
        else:
            changed += [option, value]
        refused = CliRunner().invoke(main, [*changed, "--steps", "4", "--resume"])
        assert refused.exit_code != 0 and "cannot resume with changed settings" in refused.output, refused.output
        assert f"{option} {value} (the run has " in refused.output, refused.output
        assert len(losses(whole)) == 3, "nothing written by the refused resume"

    record = json.loads((run / "run.json").read_text())
    assert record["store"]["path"] is None and record["store"]["provenance"]["backbone"]["name"] == "resnet18"
    assert record["backbone_training"]["unfreeze_last"] is None
    assert record["act_inputs"]["cameras"] == [["top", 512, 1, 1]]
    tuned = load_file(run / "checkpoints" / "last" / "backbone.safetensors")
    base = create_backbone("resnet18", weights="random", image_size=32).model.state_dict()
    assert not torch.equal(tuned["conv1.weight"], base["conv1.weight"])
    assert torch.equal(tuned["bn1.running_mean"], base["bn1.running_mean"]), "FrozenBatchNorm: statistics fixed"

    exported = export_policy(run, tmp_path / "act.pt2", progress=False)
    assert exported.parity.passed and exported.metadata["backbone_weights"]["source"] == "finetuned"
    policy = load_policy(tmp_path / "act.pt2")
    policy.reset()
    action = policy.select_action({"observation.images.top": np.zeros((48, 64, 3), np.uint8),
                                   "observation.state": np.zeros(4, np.float32)})
    assert action.shape == (4,) and np.isfinite(action).all()
