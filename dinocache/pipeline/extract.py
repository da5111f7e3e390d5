"""Stage one: run a frozen backbone once over every frame of a dataset and fill a feature store.

This module is the command: its options (:class:`ExtractConfig`), the plan of the store (which
episodes and cameras, its shapes and provenance), the store's creation, and which work units this
process fills. The work itself overlaps three stages: decoding (:mod:`dinocache.pipeline.decoding`),
the backbone's forward and the writer (:mod:`dinocache.pipeline.units`). With ``--views K`` every
frame is stored K times, clean and through K-1 seeded draws of an augmentation recipe
(:mod:`dinocache.encoders.augment_recipe`), recorded in the store's provenance.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dinocache.encoders.augment_recipe import AugmentRecipe, parse_recipe
from dinocache.encoders.backbone import FrozenBackbone, create_backbone
from dinocache.cores import available_cores
from dinocache.devices import check_batch_fits, resolve_device
from dinocache.errors import DinocacheError, EpisodeError
from dinocache.datasets import open_dataset
from dinocache.datasets.base import DatasetSource, EpisodeInfo
from dinocache.datasets.rows import frames_at_rows
from dinocache.pipeline.store import (
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_DTYPE,
    DEFAULT_UNIT_FRAMES,
    Compression,
    FeatureStore,
    SourceRecord,
    StoreLayout,
    StoreRecord,
    create_or_open,
    store_bytes,
)
from dinocache.pipeline.relayout import drop_recorded, relayout
from dinocache.pipeline.units import ExtractSummary, run_units

__all__ = ["PRECISIONS", "ExtractConfig", "ExtractSummary", "Selection", "parse_episodes", "plan_layout", "shard_units",
           "build_backbone", "open_source", "select", "leave_out_damaged", "prepare", "check_forward_fits",
           "redo_damaged_units", "extract", "fill"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractConfig:
    """Everything `dinocache extract` is asked to do; see its ``--help`` for each field."""

    dataset: Path
    out: Path
    backbone: str = "dinov2_vits14_reg"
    weights: str = "auto"
    seed: int = 0
    cameras: Sequence[str] | None = None
    image_size: str | None = None
    center_crop: bool = False
    dtype: str = DEFAULT_DTYPE
    precision: str = "auto"
    batch_size: int = 32
    device: str | None = None
    episodes: str | None = None
    format: str | None = None
    skip_bad_episodes: bool = False
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    unit_frames: int = DEFAULT_UNIT_FRAMES
    compression: str = "none"
    overwrite: bool = False
    compile: bool = False
    shard: tuple[int, int] | None = None
    decode_workers: int | None = None
    progress: bool = True
    views: int = 1
    augment: str | None = None  # a preset name or a recipe file; with views > 1, default the "lerobot" preset
    augment_seed: int = 0

    def __post_init__(self) -> None:
        """Meaningless numbers are refused before any work (the command line's ranges say the same)."""
        for name, least in (("batch_size", 1), ("chunk_frames", 1), ("unit_frames", 1), ("seed", 0), ("views", 1),
                            ("augment_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DinocacheError(f"--{name.replace('_', '-')} {value}: must be a whole number of at least {least}")
        if self.unit_frames % self.chunk_frames:
            raise DinocacheError(f"--unit-frames {self.unit_frames}: must be a multiple of --chunk-frames "
                                 f"{self.chunk_frames} (a shard holds whole chunks)")
        if self.views == 1 and self.augment is not None:
            raise DinocacheError(f"--augment {self.augment}: augmented views need --views 2 or more (view 0 is the "
                                 "clean frame)")

    def recipe(self) -> AugmentRecipe | None:
        """The augmentation recipe of views 1..K-1 (None for one view), read and checked."""
        return parse_recipe(self.augment, self.augment_seed) if self.views > 1 else None

    def resolved_device(self) -> str:
        return str(resolve_device(self.device))

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.resolved_device().startswith("cuda") else "fp32"

    def resolved_decode_workers(self) -> int:
        """``--decode-workers``, by default one per available core (AV1 decodes ~250 frames/s per core)."""
        return self.decode_workers or available_cores()


# --- planning ------------------------------------------------------------------------------------

def parse_episodes(text: str | None, available: Sequence[int], skipped: Mapping[int, str] | None = None) -> list[int]:
    """``None`` -> all; ``'0:50'`` -> indices 0..49 (a slice of episode *indices*); ``'3,5,9'`` -> those.

    ``skipped`` maps episodes dropped by ``--skip-bad-episodes`` to why: asking for one by name is
    refused with that reason, not as an episode the dataset does not have.
    """
    if not text:
        return list(available)
    have = set(available)
    if ":" in text:
        lo, _, hi = text.partition(":")
        try:
            start = int(lo) if lo else min(available)
            stop = int(hi) if hi else max(available) + 1
        except ValueError:
            raise DinocacheError(f"--episodes {text!r}: expected START:STOP or a comma list of episode indices") from None
        chosen = [i for i in available if start <= i < stop]
    else:
        try:
            chosen = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise DinocacheError(f"--episodes {text!r}: expected START:STOP or a comma list of episode indices") from None
        missing = [i for i in chosen if i not in have]
        bad = [i for i in missing if i in (skipped or {})]
        if bad:
            raise DinocacheError(f"--episodes: episode {bad[0]} was skipped as bad (--skip-bad-episodes): "
                                 f"{skipped[bad[0]]}")
        if missing:
            raise DinocacheError(f"--episodes: episode(s) {missing} are not in the dataset (it has {len(have)}: "
                                 f"{min(have)}..{max(have)})")
    if not chosen:
        raise DinocacheError(f"--episodes {text!r} selects no episode")
    return chosen


def plan_layout(source: DatasetSource, episodes: Sequence[EpisodeInfo], cameras: Sequence[str],
                backbone: FrozenBackbone, cfg: ExtractConfig) -> StoreLayout:
    """Read every low-dimensional array (cheap) and decide the store's shapes and provenance."""
    lowdim: dict[str, list[np.ndarray]] = {key: [] for key in source.lowdim}
    episode_index, frame_index, timestamp, table = [], [], [], []
    start = 0
    for ep in episodes:
        arrays = source.read_lowdim(ep.index)
        for key in lowdim:
            lowdim[key].append(np.asarray(arrays[key], dtype=np.float32).reshape(ep.length, -1))
        episode_index.append(np.full(ep.length, ep.index, dtype=np.int64))
        frame_index.append(np.asarray(arrays["frame_index"], dtype=np.int64))
        timestamp.append(np.asarray(arrays["timestamp"], dtype=np.float32))
        table.append((ep.index, start, ep.length, ep.task))
        start += ep.length
    record = StoreRecord(
        num_frames=start, cameras=tuple(cameras), backbone=backbone.record(), dtype=cfg.dtype,
        chunk_frames=cfg.chunk_frames, unit_frames=cfg.unit_frames, compression=str(Compression.parse(cfg.compression)),
        precision=cfg.resolved_precision(), source=SourceRecord(source.format, source.fingerprint()),
        source_path=str(Path(source.path).resolve()), episodes_selected=tuple(ep.index for ep in episodes),
        fps=float(source.fps), camera_sizes={c: (source.cameras[c].height, source.cameras[c].width) for c in cameras},
        lowdim_names={k: info.names for k, info in source.lowdim.items()}, episodes_skipped=tuple(source.skipped),
        views=cfg.views, augment=None if (recipe := cfg.recipe()) is None else recipe.to_dict(),
    )
    h, w = backbone.grid_size
    return StoreLayout(
        record=record,
        grids={camera: (h, w, backbone.embed_dim) for camera in cameras},
        lowdim={key: np.concatenate(parts) for key, parts in lowdim.items()},
        episode_index=np.concatenate(episode_index),
        frame_index=np.concatenate(frame_index),
        timestamp=np.concatenate(timestamp),
        episodes=table,
        verification_frames=functools.partial(frames_at_rows, source, [(i, s, n) for i, s, n, _ in table], cameras),
    )


def shard_units(num_units: int, shard: tuple[int, int] | None) -> range:
    """The contiguous block of units that shard K of N owns (contiguous, so videos decode sequentially)."""
    if shard is None:
        return range(num_units)
    k, n = shard
    return range(k * num_units // n, (k + 1) * num_units // n)


# --- the command ---------------------------------------------------------------------------------

def build_backbone(cfg: ExtractConfig) -> FrozenBackbone:
    """The frozen backbone (with its preprocessing) that ``cfg`` asks for, on its device."""
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, center_crop=cfg.center_crop,
                               seed=cfg.seed, device=cfg.resolved_device(),
                               amp_dtype=PRECISIONS[cfg.resolved_precision()])
    return backbone


@dataclass(frozen=True)
class Selection:
    """What an extraction reads: the dataset, and the cameras and episodes of it asked for."""

    source: DatasetSource
    cameras: list[str]
    episodes: list[EpisodeInfo]


def open_source(cfg: ExtractConfig) -> Selection:
    """The cheap checks, before any backbone is built or weights looked for: the options, the dataset,
    the cameras and episodes asked for, and ``--out`` (a store or nothing yet). A mistyped path or
    camera is said at once, not after a weights lookup."""
    if cfg.dtype not in ("float16", "float32"):
        raise DinocacheError(f"--dtype {cfg.dtype!r}: choose float16 or float32")
    if cfg.unit_frames % cfg.chunk_frames:
        raise DinocacheError(f"--unit-frames {cfg.unit_frames} must be a multiple of --chunk-frames {cfg.chunk_frames}")
    if cfg.overwrite and cfg.shard is not None:
        raise DinocacheError("--overwrite with --shard would let one shard delete another's work; "
                             "delete the store (or run once without --shard) first")
    cfg.recipe()  # a mistyped preset or a bad recipe file, said now
    source = open_dataset(cfg.dataset, format=cfg.format, skip_bad_episodes=cfg.skip_bad_episodes)
    cameras = list(source.select_cameras(cfg.cameras) if cfg.cameras else source.cameras)
    if not cameras:
        raise DinocacheError(f"{cfg.dataset}: the dataset has no camera to extract features from")
    if Path(cfg.out).exists() and not cfg.overwrite:  # refuses, in one line, anything that is not a feature store
        drop_recorded(FeatureStore(cfg.out, mode="r"), source, cfg.skip_bad_episodes)
    return select(cfg, source, cameras)


def select(cfg: ExtractConfig, source: DatasetSource, cameras: list[str]) -> Selection:
    """The episodes of ``source`` that ``--episodes`` asks for (all listed ones by default)."""
    chosen = set(parse_episodes(cfg.episodes, [ep.index for ep in source.episodes], dict(source.skipped)))
    return Selection(source, cameras, [ep for ep in source.episodes if ep.index in chosen])


def leave_out_damaged(cfg: ExtractConfig, selected: Selection, err: EpisodeError) -> Selection:
    """With ``--skip-bad-episodes``, ``selected`` without the episode in which ``err`` found a damaged
    frame, as if opening had found it bad; without the flag, ``err`` itself."""
    if not cfg.skip_bad_episodes:
        raise err
    if cfg.shard is not None:
        raise DinocacheError(f"{err}; --skip-bad-episodes cannot leave an episode out of a store that --shard "
                             "processes fill together: re-run without --shard (it resumes) to leave it out") from None
    selected.source.drop_episode(err.episode, str(err))
    return select(cfg, selected.source, selected.cameras)


def prepare(cfg: ExtractConfig, backbone: FrozenBackbone, selected: Selection,
            left_out: bool = False) -> tuple[FeatureStore, ExtractSummary]:
    """Plan the layout of the selected features and create (or reopen) the store. Safe to run concurrently,
    but not when ``left_out`` (an episode left out since the store was laid out: it is laid out again)."""
    layout = plan_layout(selected.source, selected.episodes, selected.cameras, backbone, cfg)
    store = relayout(cfg.out, layout) if left_out else create_or_open(cfg.out, layout, overwrite=cfg.overwrite)
    summary = ExtractSummary(store=store.path, episodes=len(selected.episodes),
                             skipped_episodes=list(selected.source.skipped))
    return store, summary


def check_forward_fits(cfg: ExtractConfig, backbone: FrozenBackbone, source: DatasetSource,
                       cameras: Sequence[str]) -> None:
    """Refuse a ``--batch-size`` whose batch cannot fit, before the store is made or a buffer allocated.

    A lower bound per frame: its decoded uint8 frame in the host buffers, and on the device the
    preprocessed float32 input and the token embeddings (input and output of a block) in float32,
    and with ``--views K`` the K-1 augmented copies of the frame (the views' forwards run one by one).
    """
    device = torch.device(cfg.resolved_device())
    frame = max(3 * source.camera(camera).height * source.camera(camera).width for camera in cameras)
    height, width = backbone.preprocess.config.image_size
    tokens = backbone.grid_size[0] * backbone.grid_size[1] + backbone.spec.num_prefix_tokens
    model = 4 * (3 * height * width + 2 * tokens * backbone.embed_dim) + (cfg.views - 1) * frame
    what = "decoded frames, the backbone's input and its tokens"
    if device.type == "cuda":
        check_batch_fits("--batch-size", cfg.batch_size, frame, torch.device("cpu"), "decoded frames")
        check_batch_fits("--batch-size", cfg.batch_size, model, device, "the backbone's input and its tokens")
    else:
        check_batch_fits("--batch-size", cfg.batch_size, frame + model, device, what)


def redo_damaged_units(store: FeatureStore, units: Sequence[int]) -> None:
    """Mark for redoing, and say so, the units of ``units`` that are done but whose shard files are
    missing or not the ones written for them (another unit's or store's, or damaged)."""
    for unit, why in store.reopen_damaged_units(units).items():
        start, stop = store.unit_range(unit)
        tqdm.write(f"dinocache: unit {unit} (frames {start}-{stop - 1}) was marked done, but {why}: redoing it")


def extract(cfg: ExtractConfig, backbone: FrozenBackbone | None = None) -> ExtractSummary:
    """Fill this process's share of the store (all of it unless ``cfg.shard``); skip units already done."""
    t_begin = time.perf_counter()
    selected = open_source(cfg)
    backbone = backbone or build_backbone(cfg)
    check_forward_fits(cfg, backbone, selected.source, selected.cameras)
    left_out = False
    while True:  # once more for each episode found damaged in the middle of it (--skip-bad-episodes)
        try:
            summary = fill(cfg, *prepare(cfg, backbone, selected, left_out), backbone, selected.source)
            break
        except EpisodeError as err:
            selected, left_out = leave_out_damaged(cfg, selected, err), True
    summary.seconds = time.perf_counter() - t_begin
    return summary


def fill(cfg: ExtractConfig, store: FeatureStore, summary: ExtractSummary, backbone: FrozenBackbone,
         source: DatasetSource) -> ExtractSummary:
    """Compute and write this process's units of ``store`` that are not done yet."""
    mine = shard_units(store.num_units, cfg.shard)
    redo_damaged_units(store, mine)
    done = store.done_units()
    pending = [u for u in mine if not done[u]]
    summary.units_skipped, summary.shard = len(mine) - len(pending), cfg.shard
    frames_total = sum(b - a for a, b in (store.unit_range(u) for u in mine))
    frames_done = frames_total - sum(b - a for a, b in (store.unit_range(u) for u in pending))
    model = torch.compile(backbone) if cfg.compile else backbone
    with tqdm(total=frames_total, initial=frames_done, unit="frame", disable=not cfg.progress,
              desc=f"extract {store.path.name}", dynamic_ncols=True) as bar:
        if pending:
            summary.merge(run_units(store, source, model, pending, cfg.batch_size, cfg.resolved_device(),
                                    cfg.dtype, cfg.resolved_decode_workers(), progress=bar))
    summary.bytes_written = store_bytes(store.path)
    return summary

