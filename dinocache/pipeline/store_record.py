"""A feature store's root record: what the store is (format, settings, backbone, source), typed, and how
its feature chunks are encoded.

Apart from :mod:`dinocache.pipeline.store` (the arrays and their reading and writing) because the record
is also what a run folder keeps of its store, and what every later stage checks a store against.
The layout is specified in ``docs/cache-format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from zarr.codecs import Crc32cCodec, ZstdCodec

from dinocache import __version__
from dinocache.encoders.record import BackboneRecord
from dinocache.errors import DinocacheError, StoreError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "VIEWS_FORMAT_VERSION", "VIEW_KEYS", "DEFAULT_DTYPE", "DEFAULT_CHUNK_FRAMES", "DEFAULT_UNIT_FRAMES",
           "DEFAULT_PRECISION", "VERIFICATION_FRAMES", "IDENTITY_KEYS", "SourceRecord", "StoreRecord", "Compression",
           "backbone_attributes"]

FORMAT_NAME = "dinocache-features"
FORMAT_VERSION = 1
#: The version of a store that holds augmented views (``views`` > 1, ``docs/cache-format.md``): a
#: dinocache that predates views reads version 1 only, so it refuses such a store rather than training
#: on its clean view and leaving the views it cannot see unchecked. Stores of one view stay version 1,
#: byte for byte what they always were.
VIEWS_FORMAT_VERSION = 2

#: Defaults of a store's settings, also what a record that predates a setting reads as.
DEFAULT_DTYPE = "float16"
DEFAULT_CHUNK_FRAMES = 16
DEFAULT_UNIT_FRAMES = 256
DEFAULT_PRECISION = "fp32"

#: Raw frames a store keeps (per camera) so that stage three can check an exported policy against
#: the cached features when the source dataset is no longer around.
VERIFICATION_FRAMES = 8

#: Attributes that define what a store *is*: a second extraction into the same store must agree on
#: all of them (or pass ``--overwrite``), and later stages check the ones they depend on.
IDENTITY_KEYS = (
    "backbone", "weights", "preprocess", "dtype", "cameras", "source", "episodes_selected",
    "chunk_frames", "unit_frames", "compression", "precision",
)
#: Identity attributes that only a store with views records (K=1 stores leave them out, so that their
#: root record, and the unit digests bound to their identity, are unchanged).
VIEW_KEYS = ("views", "augment")


@dataclass(frozen=True)
class SourceRecord:
    """The dataset a store was extracted from: its reader format and content fingerprint."""

    format: str | None = None
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SourceRecord:
        data = data or {}
        return cls(format=data.get("format"), fingerprint=data.get("fingerprint"))


def backbone_attributes(record: BackboneRecord) -> dict[str, Any]:
    """How a store records its backbone: ``backbone`` (the model), ``weights`` (hashes and seed, no
    path), ``weights_path`` (informative, not compared) and ``preprocess``."""
    backbone = record.to_dict()
    del backbone["weights"], backbone["preprocess"]
    return {"backbone": backbone, "weights": record.weights.identity(), "weights_path": record.weights.path,
            "preprocess": dict(record.preprocess)}


@dataclass(frozen=True)
class StoreRecord:
    """A store's root attributes (``zarr.json`` -> ``attributes.dinocache``), typed.

    :meth:`to_dict` writes the layout of ``docs/cache-format.md`` (the backbone record split into the
    ``backbone``, ``weights``, ``weights_path`` and ``preprocess`` attributes), key for key in the
    order dinocache has always written it, so stores stay byte-identical. :meth:`from_dict` reads
    any store of :data:`FORMAT_VERSION`, older ones included: a setting a store predates reads as its
    default (or None), attributes this code does not know are kept. Another format or format
    version is refused.
    """

    num_frames: int
    cameras: tuple[str, ...]
    backbone: BackboneRecord
    dtype: str = DEFAULT_DTYPE
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    unit_frames: int = DEFAULT_UNIT_FRAMES
    compression: str = "none"
    precision: str = DEFAULT_PRECISION
    source: SourceRecord = SourceRecord()
    source_path: str | None = None
    episodes_selected: tuple[int, ...] | None = None
    fps: float | None = None
    camera_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # camera -> native (H, W)
    lowdim_names: Mapping[str, list[str] | None] = field(default_factory=dict)
    #: ``(episode index, why)`` of each episode ``--skip-bad-episodes`` left out, found bad when the
    #: dataset was opened or while its frames were decoded (written only when there is one).
    episodes_skipped: tuple[tuple[int, str], ...] = ()
    views: int = 1  # K: view 0 the clean frame, views 1..K-1 augmented by `augment`
    augment: Mapping[str, Any] | None = None  # the recipe (AugmentRecipe.to_dict, its seed included)
    format_version: int = FORMAT_VERSION
    dinocache_version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(self.cameras))
        if self.episodes_selected is not None:
            object.__setattr__(self, "episodes_selected", tuple(int(i) for i in self.episodes_selected))
        object.__setattr__(self, "camera_sizes", {c: (int(h), int(w)) for c, (h, w) in self.camera_sizes.items()})
        object.__setattr__(self, "episodes_skipped", tuple((int(i), str(why)) for i, why in self.episodes_skipped))
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise StoreError(f"views {self.views!r} must be a whole number of at least 1")
        if (self.views > 1) != (self.augment is not None):
            raise StoreError(f"{self.views} view(s) with {'a' if self.augment is not None else 'no'} augmentation "
                             "recipe: a store has a recipe exactly when it has augmented views")
        object.__setattr__(self, "format_version", VIEWS_FORMAT_VERSION if self.views > 1 else self.format_version)

    def camera_size(self, camera: str) -> tuple[int, int] | None:
        """The native (H, W) of ``camera`` in the source dataset, when recorded."""
        return self.camera_sizes.get(camera)

    def identity(self) -> dict[str, Any]:
        """The attributes that must match for a store to be this one (see :data:`IDENTITY_KEYS`), and
        with views, :data:`VIEW_KEYS`."""
        data = self.to_dict()
        return {key: data[key] for key in IDENTITY_KEYS + (VIEW_KEYS if self.views > 1 else ())}

    def to_dict(self) -> dict[str, Any]:
        backbone = backbone_attributes(self.backbone)
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "dinocache_version": self.dinocache_version,
            "num_frames": self.num_frames,
            "dtype": self.dtype,
            "chunk_frames": self.chunk_frames,
            "unit_frames": self.unit_frames,
            "compression": self.compression,
            "cameras": list(self.cameras),
            **backbone,
            "precision": self.precision,
            "source": self.source.to_dict(),
            "source_path": self.source_path,
            "episodes_selected": list(self.episodes_selected) if self.episodes_selected is not None else None,
            "fps": self.fps,
            "camera_sizes": {camera: list(size) for camera, size in self.camera_sizes.items()},
            "lowdim_names": dict(self.lowdim_names),
            **({"episodes_skipped": [[i, why] for i, why in self.episodes_skipped]} if self.episodes_skipped else {}),
            **({"views": self.views, "augment": dict(self.augment)} if self.views > 1 else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreRecord:
        """Read the attributes of a store (or a copy of them, as a run folder keeps)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            raise StoreError(f"a Zarr group, but not a dinocache feature store (no {FORMAT_NAME!r} attributes)")
        version = data.get("format_version")
        if version not in (FORMAT_VERSION, VIEWS_FORMAT_VERSION):
            raise StoreError(f"feature-store format version {version} is not understood by dinocache {__version__} "
                             f"(it reads versions {FORMAT_VERSION} and {VIEWS_FORMAT_VERSION})")
        if (version == VIEWS_FORMAT_VERSION) != ("views" in data):
            has = "with" if "views" in data else "without"
            raise StoreError(f"format version {version} {has} augmented views ('views'): a version "
                             f"{VIEWS_FORMAT_VERSION} store has them, a version {FORMAT_VERSION} store none")
        names = {f.name for f in fields(cls)} - {"extra"}
        split = {"format", "weights", "weights_path", "preprocess"}
        try:
            known = {k: v for k, v in data.items() if k in names and v is not None}
            backbone = data.get("backbone")
            known["backbone"] = BackboneRecord.from_dict({
                **(backbone if isinstance(backbone, Mapping) else {"name": backbone}),
                "weights": {**(data.get("weights") or {}), "path": data.get("weights_path")},
                "preprocess": data.get("preprocess") or {},
            })
            known["source"] = SourceRecord.from_dict(data.get("source"))
            extra = {k: v for k, v in data.items() if k not in names and k not in split}
            return cls(**known, extra=extra)
        except (DinocacheError, TypeError, ValueError) as err:
            raise StoreError(f"unreadable feature-store attributes ({err})") from None


@dataclass(frozen=True)
class Compression:
    """How feature chunks are encoded: ``none``, ``zstd`` or ``bitround:N`` (+ zstd).

    Lossless codecs gain little on float16 features; BitRound zeroes all but N mantissa bits first so
    that zstd has something to squeeze. Every choice ends in a crc32c checksum.
    """

    kind: str = "none"
    keepbits: int | None = None

    @classmethod
    def parse(cls, text: str) -> Compression:
        text = text.strip().lower()
        if text in ("none", "zstd"):
            return cls(text)
        if text.startswith("bitround:"):
            try:
                keepbits = int(text.split(":", 1)[1])
            except ValueError:
                keepbits = -1
            if not 1 <= keepbits <= 23:
                raise StoreError(f"--compression {text!r}: bitround needs a mantissa bit count 1..23, e.g. bitround:7")
            return cls("bitround", keepbits)
        raise StoreError(f"--compression {text!r} is not one of none, zstd, bitround:N")

    def __str__(self) -> str:
        return f"bitround:{self.keepbits}" if self.kind == "bitround" else self.kind

    def codecs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`zarr.create_array` implementing this choice."""
        filters: list[Any] = []
        compressors: list[Any] = []
        if self.kind == "bitround":
            from zarr.codecs.numcodecs import BitRound

            filters.append(BitRound(keepbits=self.keepbits))
        if self.kind in ("zstd", "bitround"):
            compressors.append(ZstdCodec(level=3))
        compressors.append(Crc32cCodec())
        return {"filters": filters, "compressors": compressors}
