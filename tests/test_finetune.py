"""`dinocache finetune`: a cached run continued end to end with its backbone trainable (issue 19).

One tiny cached run (ViT-S/14, random weights, 28 px: a 2x2 grid; a tiny head) is built once per
module; each test fine-tunes it for a few steps on frames decoded from the generated dataset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dinocache.cli import main
from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.encoders.backbone import create_backbone
from dinocache.errors import BackboneError, DinocacheError
from dinocache.pipeline.extract import ExtractConfig, extract
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.runtime import load_policy
from dinocache.policy.model.checkpoint import load_head
from dinocache.policy.model.features import camera_features
from dinocache.policy.model.trainable import BackboneTraining, TrainableBackbone, load_trained_backbone
from dinocache.policy.training.finetune import finetune
from dinocache.policy.training.frames import DecodedFrames
from dinocache.policy.training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from _devices import needs_cuda  # noqa: E402

TINY = dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
            n_vae_encoder_layers=1, latent_dim=8, chunk_size=4, dropout=0.0, optimizer_lr=1e-3, kl_weight=1.0,
            optimizer_lr_backbone=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> SimpleNamespace:
    """dataset (3 episodes of 10 frames, 48x64) -> extract (ViT-S/14, random, 28 px) -> 10 cached steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    dataset = write_synthetic_dataset(root / "data", num_episodes=3, episode_length=10, image_size=(48, 64),
                                      cameras=("top",), seed=0)
    extract(ExtractConfig(dataset=dataset, out=root / "f.zarr", backbone="dinov2_vits14", weights="random",
                          image_size="28", unit_frames=16, chunk_frames=8, batch_size=8, progress=False))
    train(TrainConfig(store=root / "f.zarr", out=root / "run", steps=10, batch_size=4, act=TINY,
                      val_episodes="none", save_every=1000, log_every=5, progress=False))
    return SimpleNamespace(root=root, dataset=dataset, run=root / "run")


def tune(cached: SimpleNamespace, out: Path, steps: int, resume: bool = False, save_every: int | None = None,
         **options) -> Path:
    """Fine-tune for `steps`; one checkpoint at the end unless asked (each holds a whole ViT-S, 260 MB)."""
    cfg = TrainConfig(store=None, out=out, steps=steps, batch_size=4, eval_every=1000, save_every=save_every or steps,
                      log_every=1, resume=resume, progress=False)
    finetune(cached.run, cfg, BackboneTraining(**options))
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_changes_the_backbone_and_lowers_the_training_loss(cached, tmp_path):
    run = tune(cached, tmp_path / "ft", steps=24)
    losses = [r["loss"] for r in records(run)]
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses

    base = create_backbone("dinov2_vits14", weights="random", image_size=28)
    tuned = load_file(run / "checkpoints" / "last" / "backbone.safetensors")
    changed = [k for k, v in base.model.state_dict().items() if not torch.equal(v, tuned[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed

    config = json.loads((run / "checkpoints" / "last" / "config.json").read_text())
    saved = config["backbone_weights"]
    assert saved["file"] == "backbone.safetensors" and len(saved["sha256"]) == 64
    assert saved["base"]["tensor_sha256"] == base.weights.tensor_sha256 != saved["tensor_sha256"]
    assert config["backbone_training"] == BackboneTraining().to_dict()
    head, _, spec = load_head(run)
    assert spec.store_record.identity() == load_head(cached.run)[2].store_record.identity()


def test_the_head_starts_from_the_cached_run(cached, tmp_path):
    """The warm start: after one fine-tuning step every head weight is within one AdamW step (its
    first update moves a weight by about the learning rate, 1e-3 here) of the cached run's, whereas a
    head built afresh differs by the scale of its initialisation."""
    run = tune(cached, tmp_path / "ft", steps=1)
    cached_head, tuned_head = load_head(cached.run)[0].state_dict(), load_head(run)[0].state_dict()
    assert cached_head.keys() == tuned_head.keys()
    moved = max((tuned_head[k].float() - v.float()).abs().max().item() for k, v in cached_head.items())
    assert moved <= 1.5 * TINY["optimizer_lr"], moved
    head = load_head(run)[0]
    fresh = type(head)(head.config, head.inputs).state_dict()
    assert max((fresh[k].float() - v.float()).abs().max().item() for k, v in cached_head.items()) > 0.05


def test_a_resumed_finetune_equals_an_uninterrupted_one(cached, tmp_path):
    whole = tune(cached, tmp_path / "whole", steps=6, save_every=3)
    part = tune(cached, tmp_path / "part", steps=3, save_every=3)
    tune(cached, part, steps=6, resume=True, save_every=3)
    assert [r["loss"] for r in records(part)] == [r["loss"] for r in records(whole)]
    for name in ("backbone.safetensors", "model.safetensors"):
        a, b = (load_file(run / "checkpoints" / "last" / name) for run in (whole, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_takes_backbone_options_that_agree_and_refuses_those_that_do_not(cached, tmp_path):
    """Each backbone option given again is compared with the record on its own: --layer-decay 0.9
    alone resumes a run made with --unfreeze-last 1 --layer-decay 0.9; --layer-decay 0.5 is refused
    in one line, and the run is left as it was."""
    run = tune(cached, tmp_path / "ft", steps=1, unfreeze_last=1, layer_decay=0.9)
    with pytest.raises(DinocacheError, match=r"--layer-decay 0.5 \(the run has 0.9\)"):
        tune(cached, run, steps=2, resume=True, layer_decay=0.5)
    assert len(records(run)) == 1
    tune(cached, run, steps=2, resume=True, layer_decay=0.9)
    assert [r["step"] for r in records(run)] == [1, 2]
    assert json.loads((run / "run.json").read_text())["backbone_training"]["unfreeze_last"] == 1


def test_the_exported_policy_reproduces_the_finetuned_eager_policy(cached, tmp_path):
    run = tune(cached, tmp_path / "ft", steps=3)
    result = export_policy(run, tmp_path / "policy.pt2", progress=False)
    assert result.parity.passed and result.parity.origin.startswith("dataset")
    weights = result.metadata["backbone_weights"]
    assert weights["source"] == "finetuned" and weights["base"]["source"] == "random"

    head, normalizer, spec = load_head(run)
    encoder = load_trained_backbone(run, spec)
    data = DecodedFrames.from_dataset(cached.dataset, spec.config.chunk_size, cache_bytes=0)
    rows = np.array([0, 7, 15, 29])
    frames = data.frames(rows)["observation.images.top"]
    state = torch.from_numpy(data.raw["observation.state"][rows])
    with torch.no_grad():  # the trained policy run eagerly, as it trained (eval mode: zero latent)
        batch = camera_features(encoder, [torch.from_numpy(frames)], ["top"], False)
        batch["observation.state"] = normalizer.normalize("observation.state", state)
        expected = normalizer.unnormalize("action", head(batch)[0])
    policy = load_policy(tmp_path / "policy.pt2")
    for i in range(len(rows)):
        policy.reset()
        action = policy.select_action({"observation.images.top": frames[i], "observation.state": state[i].numpy()})
        np.testing.assert_allclose(action, expected[i, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_base_weights_that_do_not_match_are_refused_with_both_hashes(cached, tmp_path):
    run = tune(cached, tmp_path / "ft", steps=1)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(create_backbone("dinov2_vits14", weights="random", image_size=28, seed=1).model.state_dict(), other)
    with pytest.raises(BackboneError, match=r"sha256 [0-9a-f]{64}.*sha256"):
        export_policy(run, tmp_path / "p.pt2", weights=other, progress=False)
    (run / "checkpoints" / "last" / "backbone.safetensors").write_bytes(other.read_bytes())
    with pytest.raises(DinocacheError, match=r"backbone\.safetensors: (sha256|\d+ bytes).* (was|were) written: "
                                             r"the file is"):
        export_policy(run, tmp_path / "p.pt2", progress=False)


def test_memory_options_freeze_blocks_decay_rates_and_checkpoint_activations():
    frozen = create_backbone("dinov2_vits14", weights="random", image_size=28)
    encoder = TrainableBackbone(frozen, unfreeze_last=2, gradient_checkpointing=True)
    assert encoder.depth == 12 and encoder.model.grad_checkpointing
    trained = {name for name, p in encoder.model.named_parameters() if p.requires_grad}
    assert trained == {n for n in dict(encoder.model.named_parameters()) if n.startswith(("blocks.10.", "blocks.11.",
                                                                                          "norm."))}
    from dinocache.policy.model.act import ACTHead
    from dinocache.policy.model.config import ACTConfig, ACTInputs
    from dinocache.policy.training.online import OnlineACT

    inputs = ACTInputs(cameras=[("top", 384, 2, 2)], state_dim=2, action_dim=2)
    head = ACTHead(ACTConfig(**TINY, n_action_steps=4), inputs)
    groups = OnlineACT(head, encoder).parameter_groups(layer_decay=0.5)
    assert [g.get("lr") for g in groups] == [None, 1e-3 * 0.5, 1e-3]
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    grid, _ = encoder(images)
    grid.sum().backward()
    assert encoder.model.blocks[10].attn.qkv.weight.grad is not None
    assert encoder.model.blocks[9].attn.qkv.weight.grad is None
    with pytest.raises(BackboneError, match="has 12 blocks"):
        TrainableBackbone(frozen, unfreeze_last=13)


def test_the_command_line_finetunes_and_refuses_a_finetuned_run(cached, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["finetune", str(cached.run), "--out", str(out), "--steps", "2",
                                       "--optimizer-lr-backbone", "1e-6", "--unfreeze-last", "1", "--layer-decay",
                                       "0.8", "--gradient-checkpointing", "--no-progress"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["backbone_training"] == {"lr": 1e-6, "unfreeze_last": 1, "layer_decay": 0.8,
                                        "gradient_checkpointing": True}
    assert run["act_config"]["optimizer_lr_backbone"] == 1e-6
    assert run["split"] == json.loads((cached.run / "run.json").read_text())["split"]
    again = CliRunner().invoke(main, ["finetune", str(out), "--out", str(tmp_path / "x"), "--steps", "1"])
    assert again.exit_code == 2 and "already trained its backbone" in again.output


@needs_cuda
def test_finetunes_on_cuda_in_bfloat16(cached, tmp_path):
    cfg = TrainConfig(store=None, out=tmp_path / "gpu", steps=3, batch_size=4, save_every=3, log_every=1,
                      device="cuda", progress=False)
    result = finetune(cached.run, cfg)
    assert result.step == 3 and np.isfinite(records(tmp_path / "gpu")[-1]["loss"])
