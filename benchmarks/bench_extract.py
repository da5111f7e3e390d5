"""Does stage one run at its limit? Decode capacity, bare forward and the whole pipeline, side by side.

Three measurements on the same frames, the same backbone object and the same decode workers, taken
in turn ``--repeat`` times (best kept, so that a busy neighbour on a shared machine hurts least):

  * decode: every frame decoded by the pipeline's own parallel decoder (``--decode-workers``
    threads, no backbone), frames/s; also with FFmpeg's default threads in every decoder (one per
    core each) instead of the pipeline's share of the cores, to check that choice;
  * bare forward: ``backbone(batch)`` on frames already decoded in memory (on the device for CUDA);
  * write: every unit of the store written (``FeatureStore.write_unit``: Zarr, checksums, files),
    features already in host memory; shown beside the limit, since on a fast GPU it can be the limit;
  * pipeline: stage one proper (``run_units``: decode, batch, forward, cast, write Zarr, overlapped)
    into a freshly created store; the store's creation (reading the low-dimensional arrays,
    decoding its 8 verification frames) is timed apart and also shown as "whole extract".

The limit is min(decode, forward) when the forward runs on a GPU (the two use different hardware),
and 1 / (1/decode + 1/forward) on a CPU-only machine (they share the cores); the figure of merit is
pipeline / limit (target >= 0.9). Results are appended to ``docs/results/bench_extract_<device>.json``
(earlier runs are kept, those of the same configuration too, so that a later run is compared with them).

    python benchmarks/bench_extract.py                         # generated 480x640 H.264 (LeRobot's encoding)
    python benchmarks/bench_extract.py --dataset ../shared/datasets/g1_pick_bottle_3ep --image-size 56 --backbone dinov2_vits14
    python benchmarks/bench_extract.py --device cuda --backbone dinov2_vitb14_reg --batch-size 64 --forward-variants
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from _machine import describe_machine
from bench_decode import LEROBOT_VIDEO, SIZE
from bench_store_write import timed_writes

from dinocache.encoders.backbone import FrozenBackbone
from dinocache.pipeline.decoding import decode_in_order, decoder_threads
from dinocache.pipeline.extract import PRECISIONS, ExtractConfig, build_backbone, open_source, parse_episodes, prepare
from dinocache.pipeline.units import run_units
from dinocache.pipeline.store import store_bytes
from dinocache.datasets import open_dataset

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def decode_fps(cfg: ExtractConfig, episodes: list[tuple[int, int, int]], cameras: list[str], workers: int,
               threads: int | None = None) -> float:
    """Decode capacity: all workers, no backbone, every frame of ``episodes`` (the pipeline's decoder);
    ``threads`` FFmpeg threads per decoder (None: the pipeline's choice, 0: FFmpeg's own default)."""
    source = open_dataset(cfg.dataset)
    total = sum(n for _, _, n in episodes)
    t0 = time.perf_counter()
    frames = sum(len(f) for _, _, f in decode_in_order(source, episodes, cameras, [(0, total)], cfg.batch_size, workers,
                                                       threads=threads))
    assert frames == total * len(cameras), (frames, total, cameras)
    return frames / (time.perf_counter() - t0)


def bare_forward_fps(backbone: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    """Backbone throughput on batches already in memory (on the device for CUDA)."""
    batches = [b.to(device) for b in batches]
    backbone(batches[0])  # warm-up (and compilation, with --compile)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        backbone(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def pipeline_run(cfg: ExtractConfig, backbone: torch.nn.Module, work: Path) -> dict[str, Any]:
    """Stage one into a fresh store: its creation and its run timed apart; the run's own summary."""
    out = work / f"f{time.monotonic_ns()}.zarr"
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, out=out)
    selected = open_source(cfg)
    store, summary = prepare(cfg, backbone, selected)
    created = time.perf_counter() - t0
    part = run_units(store, selected.source, backbone, list(range(store.num_units)), cfg.batch_size, cfg.resolved_device(),
                     cfg.dtype, cfg.resolved_decode_workers())
    summary.merge(part)
    summary.seconds, summary.bytes_written = part.seconds, store_bytes(out)
    shutil.rmtree(out)
    camera_frames = summary.frames * len(store.cameras)
    return {"fps": camera_frames / summary.seconds, "whole_fps": camera_frames / (created + summary.seconds),
            "create_s": created, "summary": summary}


def write_fps(cfg: ExtractConfig, backbone: torch.nn.Module, work: Path) -> float:
    """Write capacity: every unit of a fresh store written from features already in host memory."""
    seconds, _, camera_frames = timed_writes(cfg, backbone, work)
    return camera_frames / seconds


def set_fused_attention(backbone: torch.nn.Module, on: bool) -> None:
    """timm's attention modules choose F.scaled_dot_product_attention (fused) or the explicit
    softmax(QK^T)V per module, through their ``fused_attn`` attribute."""
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = on


#: Batch sizes the bare forward is also timed at (--forward-variants): which one fills the device.
SWEPT_BATCH_SIZES = (16, 32, 64, 128, 256)


def forward_variants(backbone: FrozenBackbone, batches: list[torch.Tensor], device: str,
                     compile_too: bool) -> dict[str, float]:
    """What fused attention, the precision, the batch size and torch.compile each buy on the bare forward
    (the batch sizes at the default precision with fused attention, on the same frames)."""
    default_amp = backbone.amp_dtype
    rows: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        backbone.amp_dtype = PRECISIONS[precision]
        for fused in (False, True):
            set_fused_attention(backbone, fused)
            rows[f"{precision}, fused attention {'on' if fused else 'off'}"] = bare_forward_fps(backbone, batches, device)
    backbone.amp_dtype = default_amp
    set_fused_attention(backbone, True)
    frames = [frame for batch in batches for frame in batch.split(1)]
    for size in (s for s in SWEPT_BATCH_SIZES if s <= len(frames)):
        resized = [torch.cat(frames[i:i + size]) for i in range(0, len(frames), size)]
        rows[f"default precision, fused, batch {size}"] = bare_forward_fps(backbone, resized, device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if compile_too:
        rows["default precision, fused, torch.compile"] = bare_forward_fps(torch.compile(backbone), batches, device)
    return rows


def record(path: Path, machine: dict[str, Any], run: dict[str, Any]) -> None:
    """Append ``run`` to the JSON file of this benchmark and device. Earlier runs of the same
    configuration are kept: docs/benchmarks.md quotes them, and a later run is compared with them."""
    data = json.loads(path.read_text()) if path.is_file() else {"benchmark": "bench_extract", "runs": []}
    data["runs"].append({**run, "machine": machine})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="default: a generated 480x640 H.264 dataset")
    parser.add_argument("--episodes", default=None)
    parser.add_argument("--backbone", default="dinov2_vits14_reg")
    parser.add_argument("--image-size", default="224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=256, help="frames of the generated dataset (4 episodes)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode-workers", type=int, default=None, help="default: one per available core")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (pipeline and bare forward)")
    parser.add_argument("--forward-variants", action="store_true",
                        help="also time the bare forward with fused attention off/on, fp32/bf16, at batch sizes "
                             f"{', '.join(map(str, SWEPT_BATCH_SIZES))} (and compiled with --compile)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the three measurements (best kept)")
    parser.add_argument("--load", default=None, help="what else ran on the machine, recorded with the figures")
    parser.add_argument("--json", type=Path, default=None, help="default: docs/results/bench_extract_<device>.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dinocache-bench-"))
    try:
        dataset, name = args.dataset, str(args.dataset)
        if dataset is None:
            from dinocache.datasets.synthetic import write_synthetic_dataset

            dataset = write_synthetic_dataset(work / "data", format="lerobot-v2.1", num_episodes=4,
                                              episode_length=args.frames // 4, image_size=SIZE, seed=0, **LEROBOT_VIDEO)
            name = f"generated LeRobot v2.1, H.264 {SIZE[0]}x{SIZE[1]} (yuv420p, crf 30, GOP 2), 4 x {args.frames // 4} frames"
        cfg = ExtractConfig(dataset=dataset, out=work / "unused.zarr", backbone=args.backbone, weights="random",
                            image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                            precision=args.precision, episodes=args.episodes, decode_workers=args.decode_workers,
                            compile=args.compile, progress=False)
        backbone = build_backbone(cfg)
        model = torch.compile(backbone) if args.compile else backbone
        device, workers = cfg.resolved_device(), cfg.resolved_decode_workers()

        source = open_dataset(dataset)
        chosen = set(parse_episodes(args.episodes, [e.index for e in source.episodes]))
        episodes, start = [], 0
        for ep in source.episodes:
            if ep.index in chosen:
                episodes.append((ep.index, start, ep.length))
                start += ep.length
        cameras = list(source.cameras)
        batches = [piece for index, _, _ in episodes for camera in cameras
                   for piece in torch.from_numpy(source.read_frames(index, camera)).split(args.batch_size)]
        n = sum(len(b) for b in batches)

        decode, decode_ffmpeg_threads, bare, write, pipe = 0.0, 0.0, 0.0, 0.0, None
        for _ in range(args.repeat):
            decode = max(decode, decode_fps(cfg, episodes, cameras, workers))
            decode_ffmpeg_threads = max(decode_ffmpeg_threads, decode_fps(cfg, episodes, cameras, workers, threads=0))
            bare = max(bare, bare_forward_fps(model, batches, device))
            write = max(write, write_fps(cfg, backbone, work))
            run = pipeline_run(cfg, model, work)
            pipe = run if pipe is None or run["fps"] > pipe["fps"] else pipe
        threads = decoder_threads(workers, len(episodes) * len(cameras))
        on_gpu = device.startswith("cuda")
        limit = min(decode, bare) if on_gpu else 1 / (1 / decode + 1 / bare)
        variants = forward_variants(backbone, batches, device, args.compile) if args.forward_variants else {}

        machine = describe_machine(device)
        machine["available_cores"] = len(os.sched_getaffinity(0))
        result = {
            "date": date.today().isoformat(), "dataset": name, "camera_frames": n, "backbone": args.backbone,
            "image_size": args.image_size, "batch_size": args.batch_size, "decode_workers": workers,
            "precision": cfg.resolved_precision(), "compile": args.compile, "load": args.load,
            "load_average_at_end": round(os.getloadavg()[0], 2),
            "decode_fps": round(decode, 1), "decoder_threads": threads,
            "decode_fps_ffmpeg_default_threads": round(decode_ffmpeg_threads, 1), "bare_forward_fps": round(bare, 1),
            "write_fps": round(write, 1),
            "limit_rule": "min(decode, forward)" if on_gpu else "1/(1/decode + 1/forward)", "limit_fps": round(limit, 1),
            "pipeline_fps": round(pipe["fps"], 1), "ratio": round(pipe["fps"] / limit, 3),
            "whole_extract_fps": round(pipe["whole_fps"], 1), "store_creation_s": round(pipe["create_s"], 2),
            "busy_s": {"decode": round(pipe["summary"].decode_s, 2), "forward": round(pipe["summary"].forward_s, 2),
                       "write": round(pipe["summary"].write_s, 2)},
            "limited_by": pipe["summary"].limit, "forward_variants_fps": {k: round(v, 1) for k, v in variants.items()},
        }
        print(f"device      {device} ({machine.get('gpu', machine['cpu'])}), {torch.get_num_threads()} torch threads, "
              f"{workers} decode workers")
        print(f"backbone    {args.backbone} @ {args.image_size}, batch {args.batch_size}, precision "
              f"{cfg.resolved_precision()}{', compiled' if args.compile else ''}")
        print(f"dataset     {name} ({n} camera-frames)")
        print(f"decode      {decode:8.1f} frames/s  (all {workers} workers, {threads} FFmpeg thread(s) each, no backbone)")
        print(f"            {decode_ffmpeg_threads:8.1f} frames/s  (the same with FFmpeg's default threads in every decoder)")
        print(f"bare        {bare:8.1f} frames/s  (forward on decoded frames already in memory)")
        print(f"write       {write:8.1f} frames/s  (every unit written to a fresh store, features in host memory)")
        print(f"limit       {limit:8.1f} frames/s  ({result['limit_rule']})")
        print(f"pipeline    {pipe['fps']:8.1f} frames/s  (stage one: decode + forward + write, overlapped)")
        print(f"ratio       {pipe['fps'] / limit:8.3f}  (pipeline / limit; target >= 0.9)")
        print(f"whole       {pipe['whole_fps']:8.1f} frames/s  (with the store's creation, {pipe['create_s']:.1f} s)")
        for variant, fps in variants.items():
            print(f"  bare forward, {variant}: {fps:.1f} frames/s")
        print(pipe["summary"].format())
        out = args.json or RESULTS / f"bench_extract_{torch.device(device).type}.json"
        record(out, machine, result)
        print(f"recorded in {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
