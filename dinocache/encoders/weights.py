"""Where a backbone's weights come from, decided before any work starts, and recorded after.

``weights`` is one of:

* ``'auto'``: timm's pretrained weights through the Hugging Face cache. A cached file is used
  without touching the network; otherwise it is downloaded unless ``HF_HUB_OFFLINE`` is set or the
  Hub does not answer one short connection attempt (no minute of retries). When neither works, the
  run stops *before* any frame is read, with one message naming the official file, its URL and the
  flags to pass instead.
* a path: an official or timm checkpoint / timm model folder (see ``checkpoints.py``).
* ``'random'``: seeded random initialisation, for dry runs and tests. It is recorded with its seed
  so stage three can rebuild the very same backbone.

Whatever the source, :func:`weights_record` records it (a :class:`WeightsRecord`) together with
``tensor_sha256``, a hash of the loaded tensors themselves, so later stages can verify they run the
weights the cache was built with -- even random ones, which have no file to hash.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from dinocache.encoders.checkpoints import (
    StateDict,
    check_architecture,
    checkpoint_file,
    read_state_dict,
    warn_if_not_published,
)
from dinocache.encoders.record import WeightsRecord
from dinocache.encoders.registry import DINOV3_ACCESS_PAGE, BackboneSpec
from dinocache.errors import BackboneError
from dinocache.hashing import file_sha256
from dinocache.hub import hf_offline, hub_cache_dir, hub_unreachable

Source = Literal["random", "file", "hf-cache"]
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
#: A file, or a folder of official / timm checkpoints, that ``find_local_weights`` looks in first.
WEIGHTS_ENV = "DINOCACHE_WEIGHTS"


@dataclass(frozen=True)
class FetchedWeights:
    """A weights request made concrete: random init, or a read, hashed, architecture-checked file."""

    source: Source
    path: Path | None = None
    sha256: str | None = None
    state_dict: StateDict | None = field(default=None, repr=False)


def fetch_weights(spec: BackboneSpec, weights: str | os.PathLike[str]) -> FetchedWeights:
    """Resolve ``weights`` for ``spec`` and read the file; raise now if they cannot be had.

    Everything that can fail for a user reason (no cached download, missing or corrupt file, a
    checkpoint of another model) fails here, before a model is built or a frame is read.
    """
    if isinstance(weights, str) and weights == "random":
        return FetchedWeights("random")
    if isinstance(weights, str) and weights == "auto":
        source: Source = "hf-cache"
        path = _hf_weights_file(spec)
    else:
        source, path = "file", checkpoint_file(Path(weights).expanduser())
    sha256 = file_sha256(path)
    warn_if_not_published(path, sha256)
    state_dict = read_state_dict(path)
    check_architecture(state_dict, spec, path)
    return FetchedWeights(source, path, sha256, state_dict)


def weights_record(weights: FetchedWeights, seed: int, model: nn.Module | None) -> WeightsRecord:
    """The record of ``weights`` as loaded into ``model`` (None on the meta device: no data)."""
    return WeightsRecord(
        source=weights.source,
        path=str(weights.path) if weights.path else None,
        sha256=weights.sha256,
        seed=seed if weights.source == "random" else None,
        tensor_sha256=tensor_sha256(model) if model is not None else None,
    )


def tensor_sha256(module: nn.Module) -> str:
    """sha256 over the state dict: names, shapes and float32 bytes, in sorted name order.

    Float32 (whatever the storage dtype) makes the hash independent of how the weights were loaded
    or moved, and -0.0 hashes as 0.0 (equal values, equal hash). Buffers derived from the
    architecture and never saved (e.g. RoPE periods) are not weights and are left out.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        values = tensor.detach().to("cpu", torch.float32) + 0.0  # + 0.0 turns -0.0 into 0.0
        digest.update(values.contiguous().numpy())
    return digest.hexdigest()


def find_local_weights(spec: BackboneSpec) -> Path | None:
    """Pretrained weights for ``spec`` already on this machine, or None; never touches the network.

    Looks in ``$DINOCACHE_WEIGHTS`` first -- a checkpoint file, or a folder holding the official file
    name (``dinov2_vits14_reg4_pretrain.pth``...) or a timm model folder named after the backbone or
    its timm id -- then in the Hugging Face cache. A file found this way is not read here: the
    caller passes it to :func:`fetch_weights`, which checks that it is the right model.
    """
    configured = os.environ.get(WEIGHTS_ENV, "").strip()
    if configured:
        root = Path(configured).expanduser()
        if root.is_file():
            return root
        candidates = [root / name for name in (spec.checkpoint_file, spec.name, spec.timm_id) if name]
        for candidate in candidates:
            if candidate.exists():
                try:
                    return checkpoint_file(candidate)
                except BackboneError:  # a folder without a weights file: keep looking
                    continue
    if spec.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in _HF_FILES:
            cached = try_to_load_from_cache(spec.hf_hub_id, filename, cache_dir=hub_cache_dir())
            if isinstance(cached, str):
                return Path(cached)
    return None


def weights_unavailable(spec: BackboneSpec, why: str) -> BackboneError:
    """One message: why, which file to get from where, and the two flags that avoid the problem."""
    if spec.checkpoint_file and spec.checkpoint_url:
        where = f"download {spec.checkpoint_file} from {spec.checkpoint_url}"
        if spec.license == "dinov3-license":
            where += f" (DINOv3 downloads are granted on request at {DINOV3_ACCESS_PAGE})"
    elif spec.hf_hub_id:
        where = f"download {_HF_FILES[0]} from https://huggingface.co/{spec.hf_hub_id}"
    elif spec.checkpoint_url:
        where = f"download {spec.checkpoint_url}"
    else:
        where = f"get a checkpoint for {spec.timm_id}"
    return BackboneError(
        f"pretrained weights for {spec.name} are not available: {why}; {where} and pass "
        "--weights PATH, or pass --weights random for a dry run")


def _hf_weights_file(spec: BackboneSpec) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = spec.hf_hub_id
    if not repo:
        raise weights_unavailable(spec, f"timm has no pretrained weights for {spec.timm_id}")
    cache_dir = hub_cache_dir()
    for filename in _HF_FILES:
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    if hf_offline():
        raise weights_unavailable(
            spec, f"{repo} is not in the Hugging Face cache {cache_dir} and HF_HUB_OFFLINE is set")
    unreachable = hub_unreachable()
    if unreachable:  # huggingface_hub would retry for a minute before saying so
        raise weights_unavailable(spec, f"{repo} is not in the Hugging Face cache {cache_dir} and {unreachable}")
    errors = []
    for filename in _HF_FILES:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
        except Exception as err:  # network, auth, missing file: report, try the next name
            errors.append(f"{filename}: {type(err).__name__}")
    raise weights_unavailable(spec, f"downloading {repo} failed ({'; '.join(errors)})")
