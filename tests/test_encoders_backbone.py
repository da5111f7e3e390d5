"""FrozenBackbone behaviour: what the grid is, frozen-ness, AMP, provenance, torch.export."""

from __future__ import annotations

import json

import pytest
import torch

from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.errors import BackboneError

FRAMES = torch.randint(0, 256, (2, 60, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vits14_reg() -> FrozenBackbone:
    """ViT-S/14 with 4 registers at 56x70 (a 4x5 grid), random weights."""
    return create_backbone("dinov2_vits14_reg", weights="random", seed=3, image_size=(56, 70))


def test_grid_is_the_patch_tokens_without_cls_and_registers(vits14_reg):
    grid, cls = vits14_reg(FRAMES)
    assert vits14_reg.grid_size == (4, 5) and vits14_reg.embed_dim == 384
    assert grid.shape == (2, 384, 4, 5) and cls.shape == (2, 384)
    with torch.no_grad():
        tokens = vits14_reg.model.forward_features(vits14_reg.preprocess(FRAMES))
    assert tokens.shape == (2, 1 + 4 + 4 * 5, 384)  # CLS + 4 registers + 20 patches
    assert torch.equal(grid.flatten(2).transpose(1, 2), tokens[:, 5:])  # row-major (h, w)
    assert torch.equal(cls, tokens[:, 0])
    with torch.no_grad():  # timm's own NCHW view of the final-norm last block agrees
        (last,) = vits14_reg.model.forward_intermediates(
            vits14_reg.preprocess(FRAMES), indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
    torch.testing.assert_close(grid, last, rtol=0, atol=0)


def test_random_weights_are_seeded_and_recorded(vits14_reg):
    again = create_backbone("dinov2_vits14_reg", weights="random", seed=3, image_size=(56, 70))
    state = torch.random.get_rng_state()
    other = create_backbone("dinov2_vits14_reg", weights="random", seed=4, image_size=(56, 70))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    info = vits14_reg.weights.to_dict()
    assert info == {"source": "random", "path": None, "sha256": None, "seed": 3,
                    "tensor_sha256": info["tensor_sha256"]}
    assert again.weights.to_dict() == info
    assert other.weights.to_dict()["tensor_sha256"] != info["tensor_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(vits14_reg(FRAMES), again(FRAMES)))
    assert not torch.equal(vits14_reg(FRAMES)[0], other(FRAMES)[0])


def test_frozen_whatever_the_caller_does(vits14_reg):
    vits14_reg.train()
    assert not vits14_reg.training and not any(m.training for m in vits14_reg.modules())
    assert not any(p.requires_grad for p in vits14_reg.parameters())
    with torch.enable_grad():
        grid, cls = vits14_reg(FRAMES)
    assert grid.grad_fn is None and cls.grad_fn is None


def test_amp_returns_float32_close_to_full_precision(vits14_reg):
    amp = FrozenBackbone(vits14_reg.spec, vits14_reg.model, vits14_reg.preprocess,
                         vits14_reg.weights, amp_dtype=torch.bfloat16)
    full, _ = vits14_reg(FRAMES)
    half, cls = amp(FRAMES)
    assert half.dtype == cls.dtype == torch.float32
    assert not torch.equal(half, full)  # it did run in bfloat16
    assert (half - full).norm() / full.norm() < 0.05
    assert amp.record().to_dict()["amp_dtype"] == "bfloat16"
    with pytest.raises(BackboneError, match="amp_dtype"):
        create_backbone("resnet18", weights="random", amp_dtype=torch.float64)


def test_provenance_is_json_and_complete(vits14_reg):
    record = json.loads(json.dumps(vits14_reg.record().to_dict()))
    assert record["name"] == "dinov2_vits14_reg"
    assert record["timm_id"] == "vit_small_patch14_reg4_dinov2.lvd142m"
    assert (record["family"], record["patch_size"], record["embed_dim"]) == ("dinov2", 14, 384)
    assert record["grid_size"] == [4, 5]
    assert record["weights"]["source"] == "random" and record["weights"]["seed"] == 3
    assert len(record["weights"]["tensor_sha256"]) == 64
    assert record["preprocess"]["image_size"] == [56, 70]


def test_torch_export_matches_eager(vits14_reg):
    vits14_reg.preprocess.prepare_export(FRAMES)
    exported = torch.export.export(vits14_reg, (FRAMES,))
    eager = vits14_reg(FRAMES)
    for ours, theirs in zip(exported.module()(FRAMES), eager):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_requests_fail_before_building():
    with pytest.raises(BackboneError, match="230 is not a multiple of the patch size 14 of dinov2_vitg14"):
        create_backbone("dinov2_vitg14", weights="random", image_size=230)
    with pytest.raises(BackboneError, match="meta device holds no data"):
        create_backbone("dinov2_vits14", weights="auto", device="meta")
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("dinov4_vits14", weights="random")


@pytest.mark.slow
def test_onnx_export_matches_eager(vits14_reg, tmp_path):
    """Runs where the ONNX exporter and runtime are installed (stage three's extras)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    vits14_reg.preprocess.prepare_export(FRAMES)
    torch.onnx.export(vits14_reg, (FRAMES,), tmp_path / "backbone.onnx", dynamo=True,
                      input_names=["images"], output_names=["grid", "cls"])
    grid, cls = ort.InferenceSession(str(tmp_path / "backbone.onnx")).run(None, {"images": FRAMES.numpy()})
    eager_grid, eager_cls = vits14_reg(FRAMES)
    torch.testing.assert_close(torch.from_numpy(grid), eager_grid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(cls), eager_cls, rtol=1e-4, atol=1e-4)
