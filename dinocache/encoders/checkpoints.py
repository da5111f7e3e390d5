"""Read a weights file and load it into a timm model, strictly.

Supported inputs: an official facebookresearch checkpoint (DINOv2 ``*_pretrain.pth``, DINOv3
``dinov3_*_pretrain_*-<hash>.pth``, torchvision ``resnet18-f37072fd.pth``), a timm state dict
(``.safetensors`` / ``.pth``) or a local timm model folder (``config.json`` + ``model.safetensors``).

Official layouts are converted by the *same* ``checkpoint_filter_fn`` timm applies to its own
pretrained downloads (found in the module that defines the model class), never by a hand-written
key map. ``timm.create_model(checkpoint_path=...)`` would skip that filter, which is why loading
goes through here.

Strict means: after conversion every model tensor is present and every checkpoint tensor is used.
The only tensors allowed to go unused are ones upstream never uses at inference and timm's filters
drop by design: ``mask_token`` (masked-image pretraining), DINOv3's ``rope_embed.periods`` (derived
from the architecture; checked to agree with timm's), ``*.qkv.bias_mask`` and ``local_cls_norm``
(training only), distillation ``projectors.*`` / ConvNeXt ``norms.*`` (EUPE extras), and a
classifier layer the backbone does not have.
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinocache.encoders.arch import count_blocks, mlp_kind
from dinocache.encoders.registry import BackboneSpec, list_backbones
from dinocache.errors import BackboneError

StateDict = dict[str, torch.Tensor]

_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")


def checkpoint_file(path: Path) -> Path:
    """The file to read for ``path``: the path itself, or the weights file inside a timm folder."""
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise BackboneError(f"weights folder {path} has none of {', '.join(_FOLDER_FILES)}")
    if not path.is_file():
        raise BackboneError(
            f"weights file {path} does not exist (pass an official or timm checkpoint, a timm model "
            "folder, 'auto' or 'random')")
    return path


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a ``.safetensors`` / ``.pth`` file, unwrapped from training-checkpoint nesting."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = _torch_load(path)
    except Exception as err:  # corrupt / truncated / not a checkpoint / pickled objects
        raise BackboneError(f"cannot read weights file {path}: {_not_loadable(err)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not data:
        raise BackboneError(f"weights file {path} does not hold a state dict")
    if all(k.startswith("module.") for k in data):  # saved from DistributedDataParallel
        data = {k[len("module."):]: v for k, v in data.items()}
    not_tensors = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise BackboneError(f"weights file {path} has non-tensor entries, e.g. {not_tensors[:3]}")
    return dict(data)


def _not_loadable(err: Exception) -> str:
    """Why a weights file could not be read, in words that help.

    Never torch's own advice to load with ``weights_only=False``: unsafe on an untrusted file, and
    useless on one that is not a checkpoint at all. The one refusal that is about the file's content
    rather than its bytes names the Python object it would have had to unpickle.
    """
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and found:
        return (f"it holds Python objects besides tensors ({found.group(1)}), and dinocache never unpickles code "
                "from a weights file; save only the tensors, torch.save(model.state_dict(), path), or use .safetensors")
    detail = "" if isinstance(err, pickle.UnpicklingError) else f" ({_one_line(err)})"  # the former: torch's advice
    return f"it is not a PyTorch (.pth/.pt) or .safetensors checkpoint, or it is truncated or damaged{detail}"


def _torch_load(path: Path) -> object:
    """``torch.load`` memory-mapped where the format allows: a 7B checkpoint is then not held twice
    (file copy + model) while it is loaded. Legacy (pre-zip) files cannot be mapped."""
    with warnings.catch_warnings():  # a file that is no pickle at all may read as an unknown protocol
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=True)


def warn_if_not_published(path: Path, sha256: str) -> None:
    """Warn (not fail) when a file named like an official checkpoint has another hash.

    The usual cause is a truncated or corrupted download; the file may still load, so the decision
    is left to the user, but it should not pass silently.
    """
    for spec in list_backbones():
        expected = spec.checkpoint_sha256_prefix
        if spec.checkpoint_file != path.name or not expected or sha256.startswith(expected):
            continue
        size = path.stat().st_size
        published = f", published size {spec.checkpoint_size:,} bytes" if spec.checkpoint_size else ""
        warnings.warn(
            f"{path} does not match the published sha256 of {spec.checkpoint_file} "
            f"(expected {expected}, got {sha256}; file has {size:,} bytes{published}): "
            f"a truncated or altered download? Re-download it from {spec.checkpoint_url}",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------
# Which architecture a state dict belongs to: a checkpoint of the wrong model is refused naming both
# models ("looks like dinov2_vitb14 but dinov2_vits14 was asked for"), before a model is built and
# long before torch reports a size mismatch on some ``blocks.7.mlp.fc1.weight``. The signature reads
# the same facts from the official facebookresearch layout and from timm's.
# --------------------------------------------------------------------------------------------------

_REGISTER_KEYS = ("register_tokens", "reg_token", "storage_tokens")
_CONVNET_WIDTH_KEYS = ("head.norm.weight", "norm.weight", "norm_pre.weight")


@dataclass(frozen=True)
class ArchSignature:
    """The facts that tell registered architectures apart (patch size and tokens for ViTs only)."""

    kind: str
    embed_dim: int
    depth: int
    patch_size: int | None = None
    num_prefix_tokens: int = 0
    mlp: str = "mlp"

    def describe(self) -> str:
        if self.kind != "vit":
            return f"convnet, embed dim {self.embed_dim}, {self.depth} blocks"
        registers = self.num_prefix_tokens - 1
        parts = [f"embed dim {self.embed_dim}", f"{self.depth} blocks", f"patch {self.patch_size}"]
        if registers > 0:
            parts.append(f"{registers} registers")
        if self.mlp == "swiglu":
            parts.append("SwiGLU")
        return ", ".join(parts)


def spec_signature(spec: BackboneSpec) -> ArchSignature:
    if spec.kind == "vit":
        return ArchSignature("vit", spec.embed_dim, spec.depth, spec.patch_size,
                             spec.num_prefix_tokens, spec.mlp)
    return ArchSignature("convnet", spec.embed_dim, spec.depth)


def state_dict_signature(state_dict: Mapping[str, object]) -> ArchSignature | None:
    """Signature of a state dict in official or timm layout; None when it is not recognisable."""
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    depth = count_blocks(shapes)
    patch = shapes.get("patch_embed.proj.weight")
    if patch is not None and len(patch) == 4:
        prefix = int("cls_token" in shapes)
        prefix += sum(shapes[k][1] for k in _REGISTER_KEYS if k in shapes and len(shapes[k]) == 3)
        return ArchSignature("vit", patch[0], depth, patch[-1], prefix, mlp_kind(shapes))
    for key in _CONVNET_WIDTH_KEYS:
        if key in shapes and depth:
            return ArchSignature("convnet", shapes[key][0], depth)
    last_stage = sorted((k for k in shapes if re.match(r"^layer4\.\d+\.conv\d\.weight$", k)),
                        key=lambda k: [int(t) for t in re.findall(r"\d+", k)])
    if last_stage and depth:
        return ArchSignature("convnet", shapes[last_stage[-1]][0], depth)
    return None


def lookalikes(signature: ArchSignature) -> list[str]:
    """Registered backbone names with exactly this architecture."""
    return [s.name for s in list_backbones() if spec_signature(s) == signature]


def check_architecture(state_dict: StateDict, spec: BackboneSpec, path: Path) -> None:
    """Refuse a checkpoint of another model before anything is built, naming both models.

    Only for registered backbones: a ``timm:`` model's file may use a layout the signature does not
    know, and the strict load after conversion still refuses a wrong one.
    """
    if spec.family == "timm":
        return
    found = state_dict_signature(state_dict)
    wanted = spec_signature(spec)
    if found is None or found == wanted:
        return
    names = lookalikes(found)
    if names:
        raise BackboneError(
            f"checkpoint {path} looks like {' or '.join(names)} ({found.describe()}) "
            f"but backbone {spec.name} was asked for ({wanted.describe()})")
    raise BackboneError(
        f"checkpoint {path} ({found.describe()}) does not match backbone {spec.name} "
        f"({wanted.describe()})")


def load_into(model: nn.Module, state_dict: StateDict, spec: BackboneSpec, path: Path) -> None:
    """Convert ``state_dict`` with timm's own filter for ``model`` and load it strictly."""
    state_dict = _settle_dinov3_extras(dict(state_dict), model, spec, path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as err:
            raise BackboneError(
                f"checkpoint {path} cannot be converted for {spec.name} ({spec.timm_id}): "
                f"{_one_line(err)}") from None
    state_dict = _drop_unused_classifier(state_dict, model)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(f"checkpoint {path} does not fit {spec.name}: {_one_line(err)}") from None
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit {spec.name} ({spec.timm_id}): "
            f"{len(missing)} tensors missing {_examples(missing)}, "
            f"{len(unexpected)} unexpected {_examples(unexpected)}")


def _settle_dinov3_extras(state_dict: StateDict, model: nn.Module, spec: BackboneSpec,
                          path: Path) -> StateDict:
    """Check the official DINOv3 tensors timm's filter drops silently, so none is dropped unseen."""
    if "storage_tokens" not in state_dict:
        return state_dict
    periods = state_dict.get("rope_embed.periods")
    timm_periods = getattr(getattr(model, "rope", None), "periods", None)
    if periods is not None and timm_periods is not None and (
        periods.shape != timm_periods.shape
        # upstream stores the periods rounded to bfloat16; timm recomputes them in float32
        or not torch.allclose(periods.float(), timm_periods.float(), rtol=1e-2)
    ):
        raise BackboneError(
            f"checkpoint {path} has RoPE periods that differ from {spec.timm_id}'s: "
            "it was trained with another RoPE base or head size")
    has_q_bias = any(name.endswith("attn.q_bias") for name, _ in model.named_parameters())
    biases = [k for k in state_dict if k.endswith("attn.qkv.bias")]
    if biases and not has_q_bias:
        if any(state_dict[k].count_nonzero() for k in biases):
            raise BackboneError(
                f"checkpoint {path} has non-zero q/v biases but {spec.timm_id} has no qkv bias; "
                "use the timm `_qkvb` variant of this model")
        for key in biases:  # all zero: nothing is lost by not loading them
            del state_dict[key]
    return state_dict


def _drop_unused_classifier(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Drop a classifier layer (e.g. torchvision's ``fc``) when the backbone has no classifier.

    Only ``<classifier>.weight`` / ``.bias`` go, as in timm's own pretrained loading; any other
    stray tensor still counts as unexpected.
    """
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    heads = classifier if isinstance(classifier, (list, tuple)) else (classifier,) if classifier else ()
    own = set(model.state_dict())
    unused = {f"{head}.{p}" for head in heads for p in ("weight", "bias")} - own
    return {k: v for k, v in state_dict.items() if k not in unused}


def _examples(keys: list[str]) -> str:
    return f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else ""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "") or type(err).__name__
