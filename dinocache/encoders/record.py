"""What a frozen backbone says about itself: the typed record stored beside its features.

:class:`BackboneRecord` is what :meth:`FrozenBackbone.record` produces, what a feature store keeps
(split into its ``backbone`` / ``weights`` / ``weights_path`` / ``preprocess`` attributes by
:mod:`dinocache.pipeline.store`) and what :func:`dinocache.policy.model.provenance.rebuild_backbone`
consumes. It is plain data (no torch) so that reading a store or a run folder stays cheap.

``from_dict`` is tolerant in one direction only: fields a record written by an older dinocache lacks
read as None (and are then not compared); fields this code does not know are kept and written back,
so a record survives a round trip through a run folder unchanged. An optional field added later
(fine-tuned weights, say: their file's sha256 and the base weights' hashes they started from) is
to be written only when set, so that older records read and write back byte-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from dinocache.errors import BackboneError

if TYPE_CHECKING:
    from dinocache.encoders.preprocess import PreprocessConfig

__all__ = ["WeightsRecord", "BackboneRecord"]


def _split(cls: type, data: Mapping[str, Any], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` as (known fields of ``cls``, the rest); refuses a record that is not a mapping."""
    if not isinstance(data, Mapping):
        raise BackboneError(f"{what} record is not a mapping: {data!r}")
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass(frozen=True)
class WeightsRecord:
    """The weights a backbone runs with: where they came from and two hashes that pin them down.

    ``sha256`` names the file loaded (None for random weights), ``tensor_sha256`` hashes the loaded
    tensors (it also covers seeded random weights, which have no file), ``seed`` rebuilds random
    ones. ``path`` is informative only: paths differ between machines, so :meth:`identity` leaves it
    out, and that is what a feature store records as its ``weights``.
    """

    source: str | None = None  # "random", "file" or "hf-cache"
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    tensor_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def identity(self) -> dict[str, Any]:
        """What must match for two backbones to run the same weights (everything but the path)."""
        data = self.to_dict()
        del data["path"]
        return data

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "seed": self.seed,
                "tensor_sha256": self.tensor_sha256, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | None = None) -> WeightsRecord:
        """Read ``data`` (``path``, when given, is the separately recorded file path)."""
        known, extra = _split(cls, data, "weights")
        if path is not None:
            known["path"] = path
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class BackboneRecord:
    """What produced a store's features: the model, its weights and its preprocessing.

    ``preprocess`` is kept as recorded (:meth:`PreprocessConfig.to_dict`); :meth:`preprocess_config`
    parses it, strictly, for the one stage that rebuilds the preprocessing module.
    """

    name: str
    timm_id: str | None = None
    family: str | None = None
    kind: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    num_prefix_tokens: int | None = None
    grid_size: tuple[int, int] | None = None
    weights: WeightsRecord = WeightsRecord()
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    amp_dtype: str | None = None
    timm_version: str | None = None
    torch_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    #: Fields that say which model computes the features, compared when a backbone is rebuilt.
    MODEL_FIELDS = ("timm_id", "patch_size", "embed_dim", "grid_size", "num_prefix_tokens")

    def __post_init__(self) -> None:
        if self.grid_size is not None:
            object.__setattr__(self, "grid_size", tuple(int(v) for v in self.grid_size))
        object.__setattr__(self, "preprocess", dict(self.preprocess))

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The (H, W) the backbone is fed, as recorded."""
        size = self.preprocess.get("image_size")
        return (int(size[0]), int(size[1])) if size is not None else None

    def preprocess_config(self) -> PreprocessConfig:
        """The recorded preprocessing as a :class:`PreprocessConfig` (refused if incomplete)."""
        from dinocache.encoders.preprocess import PreprocessConfig

        return PreprocessConfig.from_dict(dict(self.preprocess))

    def to_dict(self) -> dict[str, Any]:
        """JSON types only, in the order dinocache has always written them."""
        return {
            "name": self.name, "timm_id": self.timm_id, "family": self.family, "kind": self.kind,
            "patch_size": self.patch_size, "embed_dim": self.embed_dim, "num_prefix_tokens": self.num_prefix_tokens,
            "grid_size": list(self.grid_size) if self.grid_size is not None else None,
            "weights": self.weights.to_dict(), "preprocess": dict(self.preprocess), "amp_dtype": self.amp_dtype,
            "timm_version": self.timm_version, "torch_version": self.torch_version, **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneRecord:
        """Read a record written by :meth:`to_dict` (of this or an older dinocache)."""
        known, extra = _split(cls, data, "backbone")
        if not known.get("name"):
            raise BackboneError(f"backbone record names no backbone: {dict(data)!r}")
        known["weights"] = WeightsRecord.from_dict(known.get("weights") or {})
        known["preprocess"] = known.get("preprocess") or {}
        return cls(**known, extra=extra)
