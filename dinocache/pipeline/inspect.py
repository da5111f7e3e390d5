"""Looking at a feature store: a text report, a completeness check, and the classic DINO PCA picture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dinocache.atomic import sweep_temporaries, temporary_name
from dinocache.errors import DinocacheError, StoreError
from dinocache.datasets.rows import frames_at_rows
from dinocache.encoders.augment_recipe import AugmentRecipe
from dinocache.pipeline.store import FeatureStore, store_bytes


def describe(store: FeatureStore, problems: list[str] | None = None) -> str:
    """Provenance, shapes, sizes on disk, completeness and low-dimensional statistics, as text.

    ``problems`` are what :func:`verify` found (None: not verified). Unit markers only say a unit was
    written once, so a store whose markers are all set but whose frames read as NaN is reported
    incomplete, not complete.
    """
    record, p = store.record, store.record.to_dict()
    done = store.done_units()
    if not done.all():
        completeness = f"{int(done.sum())}/{len(done)} units  (INCOMPLETE: re-run extract)"
    elif problems:
        completeness = f"incomplete: all {len(done)} units are marked done, but verify finds damage (below)"
    else:
        completeness = f"{len(done)}/{len(done)} units" + ("  (not verified: --quick)" if problems is None else "")
    weights, backbone = record.backbone.weights, record.backbone
    wdesc = (f"random (seed {weights.seed})" if weights.is_random else f"{weights.source} sha256 {str(weights.sha256)[:16]}...")
    lines = [
        f"store       {store.path}  (format {p['format']} v{record.format_version}, dinocache {record.dinocache_version})",
        f"backbone    {backbone.name}  [{backbone.timm_id}]  weights: {wdesc}",
        f"preprocess  {json.dumps(p['preprocess'], sort_keys=True)}",
        f"source      {record.source.format} at {record.source_path}  (fingerprint {str(record.source.fingerprint)[:16]}...)",
        f"frames      {store.num_frames} in {len(store.episodes())} episodes at {record.fps} fps",
        f"storage     {record.dtype}, chunks of {record.chunk_frames} frames, units (shards) of {record.unit_frames}, "
        f"compression {record.compression}, {store_bytes(store.path) / 2**20:.1f} MiB on disk",
        f"complete    {completeness}",
    ]
    if record.views > 1:
        recipe = AugmentRecipe.from_dict(record.augment, where=f"{store.path}: the recorded augmentation recipe")
        lines.append(f"views       {record.views} per frame: view 0 the clean frame, views 1-{record.views - 1} "
                     f"augmented by {recipe.describe()}")
        lines.append(f"            {json.dumps(record.augment, sort_keys=True)}")
    for camera in store.cameras:
        h, w, c = store.grid_shape(camera)
        lines.append(f"camera      {camera}: patch grid ({store.num_frames}, {h}, {w}, {c}), cls ({store.num_frames}, {c})"
                     + (f", views ({store.num_frames}, {record.views - 1}, ...)" if record.views > 1 else ""))
    one_view = store.num_frames * sum(
        (math.prod(store.grid_shape(camera)) + store.grid_shape(camera)[2]) for camera in store.cameras)
    one_view *= np.dtype(record.dtype).itemsize
    lines.append(f"features    {record.views * one_view / 2**20:.1f} MiB in memory"
                 + (f" = {record.views} views x {one_view / 2**20:.1f} MiB (what `train` holds; --view-sampling clean "
                    "holds one)" if record.views > 1 else ""))
    for key in store.lowdim_keys:
        stats = store.stats(key)
        lines.append(f"{key:<11} dim {len(stats['mean'])}: mean |{np.abs(stats['mean']).mean():.3g}|, "
                     f"std {stats['std'].mean():.3g}, min {stats['min'].min():.3g}, max {stats['max'].max():.3g}")
    return "\n".join(lines)


def verify(store: FeatureStore, progress: bool = True) -> list[str]:
    """Read every array (checksums included) and report what does not add up (array lengths, episodes
    table, statistics, root record), units not done, done units whose shard files are missing or not
    the ones written for them, unreadable chunks, and frames or values that read as NaN."""
    problems = store.structure_problems()
    done = store.done_units()
    if not done.all():
        problems.append(f"{int((~done).sum())} of {len(done)} units not done")
    for unit, why in store.unit_problems().items():
        start, stop = store.unit_range(unit)
        problems.append(f"unit {unit} (frames {start}-{stop - 1}): {why} (re-run extract to redo it)")
    for camera in store.cameras:
        nan = 0
        for unit in tqdm(range(store.num_units), desc=f"verify {camera}", disable=not progress, leave=False):
            start, stop = store.unit_range(unit)
            try:  # every view of the unit's frames
                patch = store.view_features(f"cameras/{camera}/patch", start, stop)
                cls = store.view_features(f"cameras/{camera}/cls", start, stop)
            except StoreError as err:
                problems.append(str(err).removeprefix(f"{store.path}: "))
                continue
            nan += int((np.isnan(patch.reshape(len(patch), -1)).any(axis=1) | np.isnan(cls.reshape(len(cls), -1)).any(axis=1)).sum())
        if nan:
            problems.append(f"camera {camera!r}: {nan} frame(s) contain NaN (never written, or the shard file is lost)")
    for name in store.array_names():
        if name.startswith("cameras/"):
            continue
        try:
            values = store.read(name)
        except StoreError as err:
            problems.append(str(err).removeprefix(f"{store.path}: "))
            continue
        if values.dtype.kind == "f" and np.isnan(values).any():
            problems.append(f"array {name!r}: {int(np.isnan(values).sum())} value(s) are NaN (never written, "
                            f"or its file is lost)")
    return problems


def pca_rgb(grids: np.ndarray) -> np.ndarray:
    """Project (F, h, w, C) patch grids on their first three principal components, as RGB in [0, 1].

    The components are fitted jointly over all frames shown, so colours mean the same across them.
    """
    f, h, w, c = grids.shape
    x = grids.reshape(-1, c).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    return rgb.reshape(f, h, w, 3)


def _camera_frames(store: FeatureStore, camera: str, indices: np.ndarray) -> list[np.ndarray | None]:
    """The source images of the given store frames, or None where the dataset is no longer there."""
    from dinocache.datasets import open_dataset

    if store.record.source_path is None:
        return [None] * len(indices)
    try:
        source = open_dataset(store.record.source_path, format=store.record.source.format)
    except (DinocacheError, OSError):
        return [None] * len(indices)
    table = [(index, start, length) for index, start, length, _ in store.episodes()]
    return list(frames_at_rows(source, table, [camera], indices)[camera])


def pca_picture(store: FeatureStore, out: Path, num_frames: int = 4, camera: str | None = None) -> Path:
    """Write the DINO picture (:func:`pca_figure`) to the PNG ``out``."""
    import matplotlib.pyplot as plt

    fig = pca_figure(store, num_frames, camera)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)
    tmp = temporary_name(out)  # written whole or not at all: a full disk leaves no half picture
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, out)
    except OSError as err:  # matplotlib's errors name no file
        raise DinocacheError(f"--pca {out}: cannot write the picture ({err.strerror or err})") from None
    finally:
        if tmp.exists():  # (unlinking a missing file on a read-only disk fails too)
            tmp.unlink()
        plt.close(fig)
    return out


def pca_figure(store: FeatureStore, num_frames: int = 4, camera: str | None = None) -> Any:
    """The DINO picture, a matplotlib figure: each sampled frame's image above its patch features' PCA
    as RGB, drawn at the camera's aspect ratio, titled with the backbone and whether its weights were random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    camera = camera or store.cameras[0]
    indices = np.unique(np.linspace(0, store.num_frames - 1, num_frames).round().astype(np.int64))
    grids = np.stack([store.patch(camera, int(i)) for i in indices]).astype(np.float32)
    if np.isnan(grids).any():
        raise DinocacheError(f"{store.path}: frames {indices.tolist()} are not all written yet; finish extraction first")
    rgb = pca_rgb(grids)
    images = _camera_frames(store, camera, indices)
    # The grid is drawn at the camera's aspect ratio, not the backbone input's: a 96x128 camera resized
    # to a square 112x112 input gives a square grid, but each patch covers a wider-than-tall region.
    height, width = store.record.camera_size(camera) or grids.shape[1:3]
    aspect = (height / width) / (grids.shape[1] / grids.shape[2])
    fig, axes = plt.subplots(2, len(indices), figsize=(3 * len(indices), 6 * height / width + 0.8), squeeze=False)
    for col, (index, image, colours) in enumerate(zip(indices, images, rgb)):
        if image is not None:
            axes[0, col].imshow(image)
        else:
            axes[0, col].text(0.5, 0.5, "source dataset\nnot found", ha="center", va="center")
        axes[0, col].set_title(f"frame {index}", fontsize=9)
        axes[1, col].imshow(colours, interpolation="nearest", aspect=aspect)
        for ax in axes[:, col]:
            ax.axis("off")
    name, weights = store.record.backbone.name, store.record.backbone.weights
    if weights.is_random:
        about = f"RANDOM weights (seed {weights.seed}): the colours show the architecture, not learned features"
    else:
        about = f"weights: {weights.source} {Path(str(weights.path or '')).name}".rstrip()
    fig.suptitle(f"{camera}: first three principal components of the {name} patch features\n{about}", fontsize=10)
    return fig
