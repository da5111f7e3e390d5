"""Decode throughput of the dataset readers: frames per second, total and per CPU core.

Measures what `dinocache extract` asks of a reader: every frame of every episode, decoded to
uint8 RGB in batches of 32 (``DatasetSource.iter_frames``), plus the low-dimensional arrays.
Datasets:

* the shared real LeRobot v2.1 dataset (G1 humanoid, AV1 640x480), when ``../shared`` exists;
* generated 480x640 data: LeRobot v2.1 and v3.0 with H.264 encoded as LeRobot does by default
  (yuv420p, crf 30, a keyframe every 2 frames), ALOHA raw HDF5 and ALOHA JPEG-compressed HDF5
  (quality 50, as ALOHA's recorder), and a two-camera v2.1 set read with the background
  per-camera decoder (``iter_episode_batches``).

"fps" is frames over wall time (best of ``--repeat`` runs, the least disturbed by other load);
"fps / CPU-s" is frames per second of CPU time used by the process, i.e. what one fully busy
core delivers, which does not depend on how many cores the machine has.

    python benchmarks/bench_decode.py                 # about two minutes on 2 cores
    python benchmarks/bench_decode.py --frames 60 --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_model

from dinocache.datasets import DatasetSource, iter_episode_batches, open_dataset
from dinocache.datasets.synthetic import write_synthetic_dataset

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "g1_pick_bottle_3ep"
SIZE = (480, 640)
LEROBOT_VIDEO = dict(codec="h264", pix_fmt="yuv420p", crf=30, gop=2)


@dataclass
class Result:
    name: str
    frames: int
    wall: list[float]
    cpu: list[float]

    @property
    def fps(self) -> float:
        return self.frames / min(self.wall)

    @property
    def fps_median(self) -> float:
        return self.frames / statistics.median(self.wall)

    @property
    def fps_per_cpu_second(self) -> float:
        return self.frames / min(self.cpu)


def read_all(source: DatasetSource) -> int:
    """Every frame of every camera, one camera after the other, plus the lowdim arrays."""
    frames = 0
    for ep in source.episodes:
        source.read_lowdim(ep.index)
        for camera in source.cameras:
            for batch in source.iter_frames(ep.index, camera, batch_size=32):
                frames += len(batch)
    return frames


def read_all_prefetched(source: DatasetSource) -> int:
    """Every frame, all cameras of an episode decoded concurrently in background threads."""
    frames = 0
    for ep in source.episodes:
        source.read_lowdim(ep.index)
        for batch in iter_episode_batches(source, ep.index, batch_size=32):
            frames += sum(len(b) for b in batch.values())
    return frames


def measure(name: str, path: Path, repeat: int,
            reader: Callable[[DatasetSource], int] = read_all) -> Result:
    source = open_dataset(path)
    wall, cpu, frames = [], [], 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        frames = reader(source)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    expected = source.num_frames * len(source.cameras)
    assert frames == expected, (name, frames, expected)
    result = Result(name, frames, wall, cpu)
    print(f"  {name}: {result.fps:.0f} fps", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=3, help="generated episodes per dataset")
    parser.add_argument("--frames", type=int, default=150, help="frames per generated episode")
    parser.add_argument("--repeat", type=int, default=3, help="runs per dataset (best is kept)")
    parser.add_argument("--real", type=Path, default=REAL, help="the real LeRobot dataset")
    args = parser.parse_args()

    import av
    print(f"# {cpu_model()}, {os.cpu_count()} logical CPUs, PyAV {av.__version__}, "
          f"Python {platform.python_version()}", file=sys.stderr)
    results: list[Result] = []
    if (args.real / "meta" / "info.json").is_file():
        results.append(measure("real LeRobot v2.1, AV1 640x480 (libdav1d)", args.real,
                               args.repeat))
    else:
        print(f"  (no real dataset at {args.real}; skipped)", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="dinocache-bench-"))
    try:
        common = dict(num_episodes=args.episodes, episode_length=args.frames, image_size=SIZE)
        generated = [
            ("generated LeRobot v2.1, H.264 480x640", "lerobot-v2.1", LEROBOT_VIDEO, read_all),
            ("generated LeRobot v3.0, H.264 480x640 (1 file)", "lerobot-v3.0", LEROBOT_VIDEO,
             read_all),
            ("generated ALOHA HDF5 raw 480x640", "aloha-hdf5", {}, read_all),
            ("generated ALOHA HDF5 JPEG q50 480x640", "aloha-hdf5",
             dict(aloha_compressed=True, jpeg_quality=50), read_all),
            ("generated LeRobot v2.1, H.264, 2 cameras, one after the other", "lerobot-v2.1",
             dict(LEROBOT_VIDEO, cameras=("top", "wrist")), read_all),
            ("generated LeRobot v2.1, H.264, 2 cameras, iter_episode_batches", "lerobot-v2.1",
             dict(LEROBOT_VIDEO, cameras=("top", "wrist")), read_all_prefetched),
        ]
        made: dict[str, Path] = {}
        for name, fmt, options, reader in generated:
            key = f"{fmt}-{sorted(options.items())}"
            if key not in made:
                t0 = time.perf_counter()
                made[key] = write_synthetic_dataset(work / f"d{len(made)}", format=fmt,
                                                    **common, **options)
                print(f"  (wrote {name} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            results.append(measure(name, made[key], args.repeat, reader))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("| dataset | frames | fps (best) | fps (median) | fps / CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.frames} | {r.fps:.0f} | {r.fps_median:.0f} | "
              f"{r.fps_per_cpu_second:.0f} |")


if __name__ == "__main__":
    main()
