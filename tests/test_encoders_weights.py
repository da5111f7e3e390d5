"""Weights: official-layout checkpoints, timm files and folders, the HF cache, random init, refusals.

Official checkpoints cannot be downloaded here, so each test writes one: it builds a timm model with
random (and deliberately non-trivial) values, *inverts* timm's conversion to produce the
facebookresearch key layout and shapes (``register_tokens``, a 518-px ``pos_embed``, ``ls1.gamma``,
``storage_tokens``, fused ``qkv.bias`` with its mask, SwiGLU ``w1/w2/w3``, ``rope_embed.periods``,
ConvNeXt ``downsample_layers`` / ``dwconv`` / ``pwconv``), saves it, and loads it back through
``create_backbone(weights=PATH)``. The features must equal those of the timm model it came from.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from dinocache.encoders.backbone import create_backbone
from dinocache.encoders.checkpoints import load_into
from dinocache.hashing import file_sha256
from dinocache.encoders.pos_embed import resample_pos_embed
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.encoders.weights import WEIGHTS_ENV, find_local_weights, tensor_sha256
from dinocache.errors import BackboneError

FRAMES = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _timm_model(name: str, image_size: int | tuple[int, int] | None = None) -> torch.nn.Module:
    """A timm model for ``name`` with every parameter drawn at random, far from init constants.

    Layer-scale starts at 1e-5 and q/v biases at 0 in timm; left so, a conversion that lost them
    would go unnoticed. Norm weights are drawn around 1. Class token and position table are put on
    a 2^-12 grid so that DINOv2's (cls - pos) + pos round trip is exact, bit for bit.
    """
    spec = get_backbone_spec(name)
    kwargs = {"num_classes": 0}
    if spec.kind == "vit":
        kwargs.update(img_size=image_size or spec.pretrain_image_size, dynamic_img_size=False)
    model = timm.create_model(spec.timm_id, **kwargs).eval()  # timm alone: no dinocache code
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                if pname == "weight" and isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                    param.add_(1.0)
                if pname in ("cls_token", "pos_embed"):
                    param.copy_(torch.round(param * 4096) / 4096)
    return model


# -- inverses of timm's checkpoint filters --------------------------------------------------------


def _official_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"mask_token": torch.zeros(1, model.embed_dim)}
    if "reg_token" in sd:  # timm folds the class position into cls_token; upstream keeps it in pos_embed
        class_pos = torch.round(torch.randn(1, 1, model.embed_dim) * 0.02 * 4096) / 4096
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - class_pos
        out["pos_embed"] = torch.cat([class_pos, sd.pop("pos_embed")], dim=1)
    swiglu = type(model.blocks[0].mlp).__name__.startswith("SwiGLU")  # ViT-g: timm packs w12 as fc1
    for key, value in sd.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    return out


def _official_dinov3_vit(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    out = {"mask_token": torch.zeros(1, model.embed_dim),
           # upstream persists the RoPE periods, rounded to bfloat16
           "rope_embed.periods": model.rope.periods.to(torch.bfloat16)}
    for key, value in sd.items():
        if key.endswith(".attn.v_bias"):
            continue
        if key.endswith(".attn.q_bias"):
            prefix = key[: -len("q_bias")]
            v_bias = sd[prefix + "v_bias"]
            out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            out[prefix + "qkv.bias_mask"] = torch.cat(
                [torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value)])
            continue
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            key = key.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
            key = key.replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value.clone()
    return out


def _official_convnext(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace("stem.", "downsample_layers.0.").replace("head.norm.", "norm.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
        out[key] = value.clone()
    return out


def _save_timm_folder(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": model.default_cfg["architecture"]}))
    return folder


def _reference_features(model: torch.nn.Module, backbone, frames: torch.Tensor):
    """(grid, cls) straight from timm for ``backbone``'s preprocessing: no dinocache model code."""
    with torch.no_grad():
        x = backbone.preprocess(frames)
        features = model.forward_features(x)
        if backbone.spec.kind == "convnet":
            norm = model.head.norm
            return norm(features), norm(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        h, w = backbone.grid_size
        patches = features[:, backbone.spec.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(len(x), -1, h, w), features[:, 0]


@pytest.fixture(scope="module")
def dinov2_s14(tmp_path_factory) -> dict:
    """ViT-S/14 without registers: official file (under its official name), timm folder, model."""
    folder = tmp_path_factory.mktemp("dinov2_s14")
    model = _timm_model("dinov2_vits14")
    official = _official_dinov2(model)
    assert official["pos_embed"].shape == (1, 1370, 384)
    torch.save(official, folder / "dinov2_vits14_pretrain.pth")
    return {"official": folder / "dinov2_vits14_pretrain.pth", "state_dict": official,
            "timm": _save_timm_folder(model, folder / "timm"), "model": model}


# -- official layouts -------------------------------------------------------------------------------


def test_dinov2_with_registers_official_checkpoint(tmp_path):
    model = _timm_model("dinov2_vits14_reg")
    official = _official_dinov2(model)
    assert official["pos_embed"].shape == (1, 1370, 384)  # 518 px, class position included
    assert {"register_tokens", "mask_token", "blocks.11.ls1.gamma"} <= set(official)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)

    published = "does not match the published sha256 of dinov2_vits14_reg4_pretrain.pth"
    with pytest.warns(UserWarning, match=published):
        loaded = create_backbone("dinov2_vits14_reg", weights=path, image_size=(42, 56))
    assert loaded.weights.to_dict()["source"] == "file"
    assert loaded.weights.to_dict()["sha256"] == file_sha256(path)
    assert loaded.weights.to_dict()["tensor_sha256"] == tensor_sha256(model)
    # upstream resizes the table of register models as timm does (antialiased, size-based)
    model.set_input_size(img_size=(42, 56))
    for ours, theirs in zip(loaded(FRAMES), _reference_features(model, loaded, FRAMES)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dinov2_official_checkpoint_and_official_pos_interpolation(dinov2_s14):
    with pytest.warns(UserWarning, match="expected b938bf1bc15cd2ec"):
        loaded = create_backbone("dinov2_vits14", weights=dinov2_s14["official"], image_size=(56, 70))
    model = copy.deepcopy(dinov2_s14["model"])
    assert loaded.weights.to_dict()["tensor_sha256"] == tensor_sha256(model)
    # the 37x37 table is resized to 4x5 the way upstream DINOv2 (no registers) does it, not timm's way
    expected = _upstream_dinov2_interpolation(model.pos_embed.detach(), 56, 70, 0.1, False)
    torch.testing.assert_close(loaded.model.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    model.set_input_size(img_size=(56, 70))
    model.pos_embed.data.copy_(expected)
    for ours, theirs in zip(loaded(FRAMES), _reference_features(model, loaded, FRAMES)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, size", [
    ("dinov3_vits16", (48, 64)), ("dinov3_vits16plus", (48, 64)), ("dinov3_convnext_tiny", (64, 96))])
def test_dinov3_official_checkpoint(name, size, tmp_path):
    spec = get_backbone_spec(name)
    model = _timm_model(name, image_size=size)
    official = _official_dinov3_vit(model) if spec.kind == "vit" else _official_convnext(model)
    if spec.kind == "vit":
        assert {"storage_tokens", "blocks.0.ls1.gamma", "blocks.0.attn.qkv.bias_mask"} <= set(official)
        assert ("blocks.0.mlp.w3.weight" in official) == (spec.mlp == "swiglu")
    else:
        assert {"downsample_layers.0.0.weight", "stages.2.8.pwconv1.weight", "norm.weight"} <= set(official)
    path = tmp_path / f"{name}.pth"
    torch.save(official, path)

    loaded = create_backbone(name, weights=path, image_size=size)
    grid, cls = loaded(FRAMES)
    ref_grid, ref_cls = _reference_features(model, loaded, FRAMES)
    assert grid.shape == (2, spec.embed_dim, size[0] // spec.patch_size, size[1] // spec.patch_size)
    torch.testing.assert_close(grid, ref_grid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-5, atol=1e-5)
    # parameters came from the file; buffers timm computes itself (RoPE periods, the zero k bias)
    # were computed, not left uninitialised
    theirs = dict(model.named_buffers())
    for key, buffer in loaded.model.named_buffers():
        assert torch.equal(buffer, theirs[key]), key


def test_timm_folder_and_torchvision_classifier(tmp_path):
    """A timm folder loads as is; torchvision's resnet18 file brings an `fc` the backbone drops."""
    model = _timm_model("resnet18")
    state = dict(model.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "resnet18.pth")
    loaded = create_backbone("resnet18", weights=tmp_path / "resnet18.pth", image_size=(64, 96))
    folder = _save_timm_folder(model, tmp_path / "timm")
    from_folder = create_backbone("resnet18", weights=folder, image_size=(64, 96))
    assert loaded.weights.to_dict()["tensor_sha256"] == from_folder.weights.to_dict()["tensor_sha256"]
    assert loaded.weights.to_dict()["tensor_sha256"] == tensor_sha256(model)
    grid, cls = loaded(FRAMES)
    assert grid.shape == (2, 512, 2, 3) and cls.shape == (2, 512)
    torch.testing.assert_close(cls, grid.mean(dim=(2, 3)))  # no final norm: CLS is the pooled map
    assert from_folder.weights.to_dict()["path"] == str(folder / "model.safetensors")


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("asked, message", [
    ("dinov2_vitb14", r"looks like dinov2_vits14 \(embed dim 384, 12 blocks, patch 14\) "
                      r"but backbone dinov2_vitb14 was asked for \(embed dim 768"),
    ("dinov2_vits14_reg", r"looks like dinov2_vits14 .* but backbone dinov2_vits14_reg was asked for "
                          r"\(.*4 registers\)"),
    ("dinov3_vits16", r"looks like dinov2_vits14 .* but backbone dinov3_vits16 was asked for"),
    ("dinov3_convnext_tiny", r"but backbone dinov3_convnext_tiny was asked for"),
])
def test_checkpoint_of_another_model_is_refused(dinov2_s14, asked, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackboneError, match=message) as info:
            create_backbone(asked, weights=dinov2_s14["official"])
    assert str(dinov2_s14["official"]) in str(info.value)


def test_missing_and_unexpected_tensors_are_refused(dinov2_s14):
    spec, path = get_backbone_spec("dinov2_vits14"), Path("ckpt.pth")
    state = dict(dinov2_s14["state_dict"])
    del state["blocks.3.ls1.gamma"]
    with pytest.raises(BackboneError, match=r"ckpt.pth does not fit dinov2_vits14 .* "
                                            r"1 tensors missing \(blocks\.3\.ls1\.gamma\)"):
        load_into(copy.deepcopy(dinov2_s14["model"]), state, spec, path)
    state = dict(dinov2_s14["state_dict"], **{"head.extra.weight": torch.zeros(3)})
    with pytest.raises(BackboneError, match=r"1 unexpected \(head\.extra\.weight\)"):
        load_into(copy.deepcopy(dinov2_s14["model"]), state, spec, path)


def test_unreadable_or_absent_files_are_refused(dinov2_s14, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(dinov2_s14["official"].read_bytes()[:4096])
    with pytest.raises(BackboneError, match="cannot read weights file .*truncated.pth"):
        create_backbone("dinov2_vits14", weights=truncated)
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("dinov2_vits14", weights=tmp_path / "nope.pth")


# -- 'auto' --------------------------------------------------------------------------------


@pytest.fixture
def empty_offline_hf(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_auto_offline_without_cache_says_what_to_download(empty_offline_hf):
    with pytest.raises(BackboneError) as info:
        create_backbone("dinov2_vits14_reg", weights="auto")
    message = str(info.value)
    assert "dinov2_vits14_reg4_pretrain.pth" in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth" in message
    assert "--weights PATH" in message and "--weights random" in message
    assert "\n" not in message
    with pytest.raises(BackboneError, match="granted on request"):
        create_backbone("dinov3_vits16", weights="auto")


def test_auto_with_the_hub_out_of_reach_fails_at_once_without_retries(monkeypatch, tmp_path):
    """Not told it is offline, on a machine where the Hub does not answer: one short attempt, then one
    line saying what to download and which flag to pass (huggingface_hub alone retries for a minute)."""
    import socket

    with socket.socket() as closed:  # a local port nobody listens on: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(BackboneError) as info:
        create_backbone("dinov2_vits14", weights="auto")
    message = str(info.value)
    assert f"127.0.0.1:{port} cannot be reached" in message and "\n" not in message
    assert "--weights PATH" in message and "--weights random" in message


def test_auto_uses_the_hf_cache_offline(empty_offline_hf, dinov2_s14):
    """A file already in the Hugging Face cache is used with no network (HF_HUB_OFFLINE=1)."""
    repo = empty_offline_hf / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    (snapshot / "model.safetensors").write_bytes((dinov2_s14["timm"] / "model.safetensors").read_bytes())
    backbone = create_backbone("dinov2_vits14", weights="auto", image_size=28)
    assert backbone.weights.to_dict()["source"] == "hf-cache"
    assert backbone.weights.to_dict()["path"] == str(snapshot / "model.safetensors")
    assert backbone.weights.to_dict()["sha256"] == file_sha256(snapshot / "model.safetensors")


# -- DINOv2 position-table interpolation ----------------------------------------------------------


def _upstream_dinov2_interpolation(pos_embed, height, width, offset, antialias, patch=14):
    """facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``, transcribed.

    Upstream names the height ``w`` and the width ``h`` (``B, nc, w, h = x.shape``); kept here.
    """
    w, h = height, width
    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    M = int(N ** 0.5)
    kwargs = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / M, float(h0 + offset) / M)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic", antialias=antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
@pytest.mark.parametrize("height, width", [(224, 224), (224, 322), (448, 448)])
def test_pos_interpolation_matches_upstream(offset, antialias, height, width):
    table = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    ours = resample_pos_embed(table, (37, 37), (height // 14, width // 14), 1, offset, antialias)
    expected = _upstream_dinov2_interpolation(table, height, width, offset, antialias)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_registered_dinov2_interpolation_settings():
    """Registers: timm's own resize is upstream's. No registers: it is not, hence our resize."""
    assert (get_backbone_spec("dinov2_vits14_reg").pos_interp_offset,
            get_backbone_spec("dinov2_vits14_reg").pos_interp_antialias) == (0.0, True)
    assert (get_backbone_spec("dinov2_vitg14").pos_interp_offset,
            get_backbone_spec("dinov2_vitg14").pos_interp_antialias) == (0.1, False)
    table = torch.randn(1, 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    timm_resized = timm.layers.resample_abs_pos_embed(table, (16, 16), (37, 37), num_prefix_tokens=0)
    torch.testing.assert_close(resample_pos_embed(table, (37, 37), (16, 16), 0, 0.0, True), timm_resized)
    assert not torch.allclose(resample_pos_embed(table, (37, 37), (16, 16), 0, 0.1, False), timm_resized)


# -- finding weights already on the machine (what `dinocache demo` uses) ---------------------------


def test_find_local_weights_looks_in_dinocache_weights_then_the_hf_cache(empty_offline_hf, dinov2_s14, monkeypatch,
                                                                          tmp_path):
    spec = get_backbone_spec("dinov2_vits14")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert find_local_weights(spec) is None  # nothing configured, nothing cached

    monkeypatch.setenv(WEIGHTS_ENV, str(dinov2_s14["official"]))  # a file is taken as it is
    assert find_local_weights(spec) == dinov2_s14["official"]
    monkeypatch.setenv(WEIGHTS_ENV, str(dinov2_s14["official"].parent))  # a folder holding the official name
    assert find_local_weights(spec) == dinov2_s14["official"]
    timm_folders = tmp_path / "weights"
    (timm_folders / "dinov2_vits14").mkdir(parents=True)  # a timm model folder named after the backbone
    (timm_folders / "dinov2_vits14" / "model.safetensors").write_bytes(
        (dinov2_s14["timm"] / "model.safetensors").read_bytes())
    monkeypatch.setenv(WEIGHTS_ENV, str(timm_folders))
    assert find_local_weights(spec) == timm_folders / "dinov2_vits14" / "model.safetensors"
    assert find_local_weights(get_backbone_spec("dinov2_vitb14")) is None  # not there for another model
    backbone = create_backbone("dinov2_vits14", weights=find_local_weights(spec), image_size=28)
    assert backbone.weights.to_dict()["tensor_sha256"] == tensor_sha256(dinov2_s14["model"])
