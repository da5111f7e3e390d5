"""Stage one's commands: `extract`, `inspect`, and the tools around them (`backbones`, `make-sample`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

@click.command()
@click.option("--image-size", default="224", show_default=True,
              help="Input resolution, N or HxW, used for the patch grid and bytes-per-frame columns.")
def backbones(image_size: str) -> None:
    """List every registered backbone with its patch grid and cache size per frame.

    \b
    Examples:
      dinocache backbones
      dinocache backbones --image-size 448
      dinocache backbones --image-size 224x320
    """
    click.echo(backbone_table(image_size))


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _fmt_stats(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.3f}" for v in values)


def backbone_table(image_size: str | int | tuple[int, int]) -> str:
    """The table ``dinocache backbones`` prints: one row per registered backbone.

    The grid and bytes-per-frame columns are for ``image_size`` (N or HxW). Bytes per frame per
    camera is what a float16 feature store holds: the patch grid (h*w*C*2) plus the CLS token (C*2).
    A backbone whose patch size does not divide the size gets '-' in those columns instead of an
    error, so one table serves patch-14 and patch-16 models alike.
    """
    from dinocache.encoders.image_size import parse_image_size
    from dinocache.encoders.registry import list_backbones

    height, width = parse_image_size(image_size)
    header = ("name", "timm id", "patch", "dim", "params", "mean / std", "default",
              f"grid@{height}x{width}", "bytes/frame")
    rows = [header]
    for spec in list_backbones():
        if height % spec.patch_size == 0 and width % spec.patch_size == 0:
            h, w = height // spec.patch_size, width // spec.patch_size
            grid = f"{h}x{w}"
            nbytes = f"{h * w * spec.embed_dim * 2 + spec.embed_dim * 2:,}"
        else:
            grid = nbytes = "-"
        rows.append((
            spec.name, spec.timm_id, str(spec.patch_size), str(spec.embed_dim),
            _fmt_params(spec.num_params), f"{_fmt_stats(spec.mean)} / {_fmt_stats(spec.std)}",
            str(spec.default_image_size), grid, nbytes,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 4, 6, 8}
    lines = [
        "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                  for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Any other timm model: --backbone timm:<model-name>. "
                 "Sizes must be multiples of the patch size (convnets: of the total stride 32).")
    return "\n".join(lines)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected K/N, e.g. 0/4 (K counts from 0)") from None
    if not 0 <= k < n:
        raise click.BadParameter(f"{value!r}: need 0 <= K < N")
    return k, n


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--backbone", default="dinov2_vits14_reg", show_default=True, help="Registered name (see `dinocache backbones`) or timm:<model>.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The feature store to create or complete (a .zarr folder).")
@click.option("--weights", default="auto", show_default=True, help="auto (Hugging Face cache), a checkpoint PATH, or random (tests and dry runs).")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True, help="Seed of --weights random.")
@click.option("--cameras", default=None, help="Comma-separated camera names (default: all).")
@click.option("--image-size", default=None, help="N or HxW, a multiple of the patch size (default: the backbone's).")
@click.option("--center-crop", is_flag=True, help="Resize the shorter side and crop the centre instead of resizing.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Stored feature dtype.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Backbone compute precision: auto is bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), show_default=True,
              help="Frames per backbone forward.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--decode-workers", default=None, type=click.IntRange(min=1), help="Videos decoded at once (default: one per available core).")
@click.option("--episodes", default=None, help="START:STOP (episode indices) or a comma list.")
@click.option("--format", "fmt", default=None, help="Dataset format when detection is not wanted: lerobot-v2.1, lerobot-v3.0, aloha-hdf5.")
@click.option("--revision", default=None, help="For a Hub dataset id: the branch, tag or commit to use (fetched if not cached).")
@click.option("--skip-bad-episodes", is_flag=True, help="Skip malformed episodes (listed at the end, and recorded in the store) instead of "
              "stopping, also one whose frame is found damaged in the middle of extraction.")
@click.option("--compression", default="none", show_default=True, help="none, zstd, or bitround:N (N mantissa bits kept, then zstd).")
@click.option("--chunk-frames", default=16, type=click.IntRange(min=1), show_default=True,
              help="Frames per chunk (the unit of a training read).")
@click.option("--unit-frames", default=256, type=click.IntRange(min=1), show_default=True,
              help="Frames per shard = per work unit (a multiple of --chunk-frames).")
@click.option("--shard", default=None, help="K/N: do only share K (from 0) of N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")
@click.option("--dask-scheduler", default=None, help="tcp://HOST:PORT of a dask.distributed scheduler to spread units over.")
@click.option("--dask-workers", default=None, type=click.IntRange(min=1), help="Start a local dask cluster of N worker processes (one per GPU).")
@click.option("--views", default=1, type=click.IntRange(min=1), show_default=True,
              help="Views stored of every frame: view 0 the clean frame, views 1..K-1 augmented by --augment "
                   "(K times the store; `train` samples them).")
@click.option("--augment", default=None,
              help="With --views 2 or more: a recipe preset (lerobot, drq, all) or a JSON recipe file [default: lerobot, "
                   "LeRobot's image_transforms].")
@click.option("--augment-seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Seed of the augmented views (each frame's draw depends on it, its row, view and camera only).")
@click.option("--overwrite", is_flag=True, help="Replace a store that was built differently.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone.")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def extract(dataset: Path, out: Path, fmt: str | None, revision: str | None, shard: str | None, dask_scheduler: str | None,
            dask_workers: int | None, compile_: bool, no_progress: bool, cameras: str | None, **options) -> None:
    """Run a frozen backbone once over every frame of DATASET and write a feature store (stage one).

    Re-running the same command resumes: finished work units are skipped and the result is
    bit-identical to an uninterrupted run.

    \b
    Examples:
      dinocache extract data/aloha_sim --backbone dinov2_vitb14_reg --out features.zarr
      dinocache extract data/g1 --backbone dinov3_vits16 --image-size 224 --out g1.zarr --cameras cam_high
      dinocache extract data/g1 --out g1.zarr --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
      dinocache extract data/g1 --out g1.zarr --dask-workers 4 --device cuda
      dinocache extract data/g1 --out g1_views.zarr --views 4 --augment lerobot
    """
    from dinocache.datasets import detect_format
    from dinocache.datasets.hub import resolve_dataset

    dataset = resolve_dataset(dataset, revision)  # a Hub id becomes its local folder, once, for every worker
    detect_format(dataset)  # a mistyped path is said before torch is even imported
    from dinocache.pipeline.extract import ExtractConfig, extract as run_extract

    cfg = ExtractConfig(dataset=dataset, out=out, format=fmt, shard=_parse_shard(shard), compile=compile_,
                        progress=not no_progress, cameras=cameras.split(",") if cameras else None, **options)
    if dask_scheduler or dask_workers:
        if cfg.shard is not None:
            raise click.UsageError("--shard and dask are two ways to split the work: choose one")
        from dinocache.pipeline.distributed import extract_with_dask

        summary = extract_with_dask(cfg, scheduler=dask_scheduler, n_workers=dask_workers)
    else:
        summary = run_extract(cfg)
    click.echo(summary.format())


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--pca", type=click.Path(path_type=Path), default=None, help="Write the feature-PCA picture to this PNG.")
@click.option("--frames", default=4, type=click.IntRange(min=1), show_default=True,
              help="How many frames the PCA picture shows.")
@click.option("--quick", is_flag=True, help="Skip reading every feature to look for NaN (unwritten) frames.")
def inspect(store: Path, pca: Path | None, frames: int, quick: bool) -> None:
    """Report a feature store: provenance, shapes, sizes, completeness, statistics.

    \b
    Examples:
      dinocache inspect features.zarr
      dinocache inspect features.zarr --pca pca.png
    """
    from dinocache.pipeline.inspect import describe, pca_picture, verify
    from dinocache.pipeline.store import FeatureStore

    feature_store = FeatureStore(store)
    problems = None if quick else verify(feature_store)
    click.echo(describe(feature_store, problems))
    if problems is not None:
        click.echo("verify      " + ("every array reads and every frame is written (no NaN)" if not problems
                                     else "; ".join(problems)))
    if pca is not None:
        click.echo(f"pca         {pca_picture(feature_store, pca, num_frames=frames)}")
    if problems:
        sys.exit(1)


@click.command("make-sample")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["lerobot-v3.0", "lerobot-v2.1", "aloha-hdf5"]),
              default="lerobot-v3.0", show_default=True,
              help="Dataset format to write: LeRobot's codebase_version v3.0 (what LeRobotDataset and "
                   "lerobot-train read) or v2.1 (LeRobot <= 0.3), or ALOHA HDF5.")
@click.option("--episodes", default=4, type=click.IntRange(min=1), show_default=True, help="Episodes to write.")
@click.option("--length", default=40, type=click.IntRange(min=1), show_default=True, help="Frames per episode.")
@click.option("--image-size", default="96x128", show_default=True, help="HxW of the cameras.")
@click.option("--cameras", default="top", show_default=True, help="Comma-separated camera names.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Seed of the scenes (same seed, same dataset).")
def make_sample(out: Path, fmt: str, episodes: int, length: int, image_size: str, cameras: str, seed: int) -> None:
    """Write a small synthetic demonstration dataset with real encoded video.

    A coloured disc moves towards a goal; the state and the actions depend on what the camera sees,
    so a policy has something to learn from pixels. Handy to try the pipeline on a new machine.

    \b
    Examples:
      dinocache make-sample sample_data
      dinocache make-sample sample_v21 --format lerobot-v2.1 --episodes 10 --cameras top,wrist
    """
    from dinocache.datasets.synthetic import write_synthetic_dataset
    from dinocache.errors import DinocacheError, os_error_line

    try:
        height, width = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{image_size!r}: expected HxW, e.g. 96x128", param_hint="--image-size") from None
    if height < 1 or width < 1:
        raise click.BadParameter(f"{image_size!r}: both sides must be at least 1 pixel", param_hint="--image-size")
    names = cameras.split(",")
    if not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(f"{cameras!r}: expected distinct names, e.g. top,wrist", param_hint="--cameras")
    existed = out.exists()
    try:
        path = write_synthetic_dataset(out, format=fmt, num_episodes=episodes, episode_length=length,
                                       image_size=(height, width), cameras=tuple(names), seed=seed)
    except OSError as err:  # a full disk, a read-only folder: no half-written dataset left to be mistaken for one
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise DinocacheError(f"{out}: cannot write the sample dataset ({os_error_line(err)})") from None
    click.echo(f"wrote {fmt} dataset: {episodes} episodes x {length} frames, cameras {cameras} -> {path}")
