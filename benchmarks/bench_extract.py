"""Does the extraction pipeline keep the backbone busy? Bare forward vs. the whole `extract`, one process.

Both sides see the same frames with the same backbone object:
  * bare: the frames are already decoded in memory; only backbone(batch) is timed;
  * pipeline: `extract()` end to end (open dataset, decode video, preprocess, forward, write Zarr).
The ratio pipeline/bare throughput is the figure of merit (target >= 0.9).

    python benchmarks/bench_extract.py                         # generated 480x640 H.264 dataset
    python benchmarks/bench_extract.py --dataset ../shared/datasets/g1_pick_bottle_3ep --episodes 0:1
    python benchmarks/bench_extract.py --device cuda --backbone dinov2_vitb14_reg --frames 2048
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dinocache.pipeline.extract import ExtractConfig, build_backbone, extract, parse_episodes
from dinocache.pipeline.readers import open_dataset


def bare_forward_fps(backbone, frames: list[torch.Tensor], device: str) -> float:
    """Backbone throughput on batches already in memory (on the device for CUDA)."""
    batches = [b.to(device) for b in frames]
    backbone(batches[0])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        backbone(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="default: a generated 480x640 H.264 dataset")
    parser.add_argument("--episodes", default=None)
    parser.add_argument("--backbone", default="dinov2_vits14_reg")
    parser.add_argument("--image-size", default="224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=256, help="frames of the generated dataset")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dinocache-bench-"))
    try:
        dataset = args.dataset
        if dataset is None:
            from dinocache.pipeline.synthetic import write_synthetic_dataset

            dataset = write_synthetic_dataset(work / "data", format="lerobot-v2.1", num_episodes=4,
                                              episode_length=args.frames // 4, image_size=(480, 640), seed=0)
        cfg = ExtractConfig(dataset=dataset, out=work / "f.zarr", backbone=args.backbone, weights="random",
                            image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                            precision=args.precision, episodes=args.episodes, progress=False)
        backbone = build_backbone(cfg)
        device = cfg.resolved_device()

        source = open_dataset(dataset)
        chosen = set(parse_episodes(args.episodes, [e.index for e in source.episodes]))
        frames = []
        for ep in source.episodes:
            if ep.index not in chosen:
                continue
            for camera in source.cameras:
                frames += list(torch.from_numpy(source.read_frames(ep.index, camera)).split(args.batch_size))
        n = sum(len(b) for b in frames)

        bare = bare_forward_fps(backbone, frames, device)
        summary = extract(cfg, backbone=backbone)
        assert summary.frames * len(source.cameras) >= n
        pipe = summary.frames * len(source.cameras) / summary.seconds
        name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
        print(f"device      {device} ({name}), {torch.get_num_threads()} torch threads")
        print(f"backbone    {args.backbone} @ {args.image_size}, batch {args.batch_size}, precision {cfg.resolved_precision()}")
        print(f"dataset     {dataset} ({n} camera-frames)")
        print(f"bare        {bare:8.1f} frames/s  (decoded frames already in memory)")
        print(f"pipeline    {pipe:8.1f} frames/s  (decode + preprocess + forward + write, wall clock)")
        print(f"ratio       {pipe / bare:8.3f}")
        print(summary.format())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
