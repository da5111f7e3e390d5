"""What an exported policy says about itself: inputs, outputs, timing, provenance, parity.

A robot integrator needs to know, before loading any weights, which cameras at what size the
policy wants, what its state and action vectors mean, at what rate it was trained, and whether it
was checked against the cache it was trained on. That record is one JSON document:

* in a ``.pt2``: the archive entry ``<archive>/extra/dinocache.json``, written by
  ``torch.export.save(..., extra_files=...)``; a ``.pt2`` is a zip, so it is read with
  :mod:`zipfile` without touching the weights;
* in an ``.onnx``: the model's ``metadata_props["dinocache"]``;
* for a run or checkpoint folder (an unexported policy): computed from the checkpoint's spec.

The schema is documented in ``docs/export.md``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinocache import __version__
from dinocache.errors import DinocacheError
from dinocache.policy.model.checkpoint import LAST, PolicySpec, read_config, resolve_checkpoint
from dinocache.policy.model.config import ACTION, OBS_ENV_STATE, OBS_STATE
from dinocache.policy.model.integrity import METADATA_NAME, ONNX_METADATA_KEY, IntegrityError, parse_json, unsealed

__all__ = ["POLICY_FORMAT", "POLICY_FORMAT_VERSION", "METADATA_NAME", "policy_metadata", "read_policy_metadata",
           "rewrite_pt2_metadata", "policy_kind", "load_onnx"]

POLICY_FORMAT = "dinocache-policy"
POLICY_FORMAT_VERSION = 1


def policy_metadata(spec: PolicySpec, checkpoint: str | os.PathLike, step: int, dtype: torch.dtype) -> dict[str, Any]:
    """The metadata of the fused policy of ``spec`` (the head's checkpoint ``checkpoint`` at ``step``).

    Exporting adds ``export`` (format, device, file inputs/outputs) and ``parity`` (the check's result).
    """
    import timm  # only for its version; a robot process loading a .pt2 need not import it

    store = spec.store_record
    cameras = [spec.camera_keys[name] for name in spec.inputs.camera_names]
    names = store.lowdim_names
    config = spec.config
    return {
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "dinocache_version": __version__,
        "cameras": cameras,
        "camera_names": spec.inputs.camera_names,
        # native size of each camera: what the policy takes (its own preprocessing resizes)
        "image_size": {cam: list(store.camera_size(cam) or store.backbone.image_size) for cam in cameras},
        "state_dim": spec.inputs.state_dim,
        "action_dim": spec.inputs.action_dim,
        "env_state_dim": spec.inputs.env_state_dim,
        "state_names": names.get(OBS_STATE),
        "action_names": names.get(ACTION),
        "env_state_names": names.get(OBS_ENV_STATE),
        "fps": store.fps,
        "chunk_size": config.chunk_size,
        "n_action_steps": config.n_action_steps,
        "temporal_ensemble_coeff": config.temporal_ensemble_coeff,
        "dtype": str(dtype).removeprefix("torch."),
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "step": step},
        "act_config": config.to_dict(),
        "act_inputs": spec.inputs.to_dict(),
        "store_path": spec.store_path,
        "provenance": store.to_dict(),
        "normalization": spec.stats,
        "versions": {"dinocache": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "parity": None,
    }


def policy_kind(path: str | os.PathLike) -> str:
    """``'pt2'``, ``'onnx'`` or ``'folder'`` (a run or checkpoint folder), from what ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise DinocacheError(f"{path}: no such policy file or run folder")
    is_zip = zipfile.is_zipfile(path)
    if path.suffix == ".onnx":
        if is_zip:
            raise DinocacheError(f"{path}: a zip archive (a .pt2 policy?) named .onnx; name it .pt2")
        return "onnx"
    if is_zip:
        return "pt2"
    raise DinocacheError(f"{path}: not a policy, or a truncated one (expected a .pt2 archive or an .onnx written by "
                         "`dinocache export`, or a run folder)")


def read_policy_metadata(path: str | os.PathLike, model: Any = None) -> dict[str, Any]:
    """The metadata of an exported policy (or of a run / checkpoint folder's ``last``), weights not loaded;
    its own digest checked (``model``: an ``.onnx``'s ``ModelProto`` already loaded)."""
    path = Path(path)
    kind = policy_kind(path)
    if kind == "folder":
        checkpoint = resolve_checkpoint(path, LAST)
        config = read_config(checkpoint)
        return policy_metadata(PolicySpec.from_dict(config), checkpoint, config["step"], torch.float32)
    if kind == "onnx":
        model = model if model is not None else load_onnx(path, external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY), None)
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                # torch >= 2.8 writes extra files as <archive>/extra/NAME, torch 2.7 as extra_files/NAME
                entry = next((n for n in archive.namelist()
                              if n.endswith((f"extra/{METADATA_NAME}", f"extra_files/{METADATA_NAME}"))), None)
                text = archive.read(entry).decode(errors="replace") if entry else None
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise IntegrityError(f"{path}: the archive is damaged or truncated ({err})") from None
    if text is None:
        raise DinocacheError(f"{path}: a {kind} file without dinocache metadata; was it written by `dinocache export`?")
    metadata = unsealed(parse_json(text, path, " (its metadata)"), path, " (its metadata)")
    _check_format(metadata, path)
    return metadata


def rewrite_pt2_metadata(path: Path, text: str) -> None:
    """Replace the metadata entry of the ``.pt2`` archive at ``path`` with ``text``, in place.

    Export writes the metadata twice: before the written file is checked, then with the check's figure
    and the digests. Saving the program again took as long as the first save (seconds for a ViT-S
    policy, more for larger ones); instead the archive is cut where torch put the metadata, after every
    weight, and the metadata and the few small records torch writes after it go in again. The weights
    stay where torch wrote them, byte for byte and as aligned as it made them.
    """
    with zipfile.ZipFile(path, "a") as archive:
        infos = archive.infolist()
        at = next((i for i, info in enumerate(infos)
                   if info.filename.endswith((f"extra/{METADATA_NAME}", f"extra_files/{METADATA_NAME}"))), None)
        if at is None:
            raise DinocacheError(f"{path}: no {METADATA_NAME} entry to rewrite")
        tail = [(info, text.encode() if i == at else archive.read(info)) for i, info in enumerate(infos) if i >= at]
        archive.start_dir = infos[at].header_offset  # zipfile appends here, and truncates what follows on close
        del archive.filelist[at:]
        for info, _ in tail:
            del archive.NameToInfo[info.filename]
        for info, data in tail:
            archive.writestr(info, data)


def load_onnx(path: Path, external_data: bool = True) -> Any:
    """An ``.onnx`` file's ``ModelProto``; a file that is not one (truncated, or other bytes) is one error."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except (DecodeError, ValueError, OSError) as err:
        raise IntegrityError(f"{path}: not an ONNX model, or a truncated or damaged one ({type(err).__name__}: "
                             f"{str(err)[:200]})") from None


def _check_format(metadata: Mapping[str, Any], path: Path) -> None:
    if metadata.get("format") != POLICY_FORMAT:
        raise DinocacheError(f"{path}: not a dinocache policy (metadata format {metadata.get('format')!r})")
    if metadata.get("format_version") != POLICY_FORMAT_VERSION:
        raise DinocacheError(f"{path}: policy format version {metadata.get('format_version')} is not understood by "
                             f"dinocache {__version__} (it reads version {POLICY_FORMAT_VERSION})")
