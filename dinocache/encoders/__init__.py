"""Frozen image backbones (DINOv2, DINOv3, ResNet, any timm model) and their preprocessing.

Modules: ``registry`` (backbone specs as data, ``dinocache backbones``), ``preprocess`` (the one
uint8 -> normalised tensor path, shared by extraction and the exported policy), ``backbone``
(:class:`FrozenBackbone`, :func:`create_backbone`), ``record`` (:class:`BackboneRecord`, what a
backbone records about itself, torch-free), ``weights`` / ``checkpoints`` (offline-first weights
resolution and strict loading of official or timm checkpoints), ``arch`` (recognising a
checkpoint's architecture), ``pos_embed`` (upstream-exact position table resizing) and ``build``
(timm model creation without wasted initialisation).

Names are imported lazily so that ``dinocache backbones`` does not pay for importing timm models.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BackboneSpec": "registry",
    "get_backbone_spec": "lookup",
    "list_backbones": "registry",
    "ImagePreprocessor": "preprocess",
    "PreprocessConfig": "preprocess",
    "FrozenBackbone": "backbone",
    "create_backbone": "backbone",
    "BackboneRecord": "record",
    "WeightsRecord": "record",
    "tensor_sha256": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
