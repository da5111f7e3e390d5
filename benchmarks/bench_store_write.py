"""How fast does the feature store take features? ``FeatureStore.write_unit`` against Zarr's default write.

On a GPU host the extraction's writer, not decoding or the forward, was the limit (issue 15: busy 74 %
of the pipeline at about 180 MiB/s, float16 ViT-B/14 grids, 393 KiB a frame). Most of that time was
Zarr comparing every chunk with the fill value before storing it (its default ``write_empty_chunks=False``),
which features never equal; the store now writes with that comparison off. This benchmark writes the
same features into fresh stores both ways, in turn, for each backbone's grid: frames/s and MiB/s.

Each store is laid out by the extraction itself (``prepare`` on a generated dataset of ``--frames``
tiny frames, with the backbone's real grid), so units, chunks, shards and checksums are the
extraction's; the features are random values in the store's dtype, one unit's worth written to every unit.

    python benchmarks/bench_store_write.py
    python benchmarks/bench_store_write.py --backbones dinov2_vitb14_reg --frames 2048 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from _machine import describe_machine

from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.pipeline.extract import ExtractConfig, build_backbone, open_source, prepare
from dinocache.pipeline.store import FeatureStore

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def zarr_default_write(store: FeatureStore, unit: int, features: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """What ``write_unit`` did before: plain Zarr assignment, arrays with Zarr's default configuration."""
    start, stop = store.unit_range(unit)
    for camera, (patch, cls) in features.items():
        store.root[f"cameras/{camera}/patch"][start:stop] = patch
        store.root[f"cameras/{camera}/cls"][start:stop] = cls
    store.root["units/done"][unit] = 1


def timed_writes(cfg: ExtractConfig, backbone: Any, work: Path, how: str = "write_unit") -> tuple[float, int, int]:
    """Seconds to write every unit of a fresh store for ``cfg`` ``how`` (``write_unit`` or ``zarr_default``),
    the bytes of features written, and the camera-frames."""
    out = work / f"{how}-{time.monotonic_ns()}.zarr"
    store, _ = prepare(dataclasses.replace(cfg, out=out), backbone, open_source(cfg))
    rng = np.random.default_rng(0)
    most = max(b - a for a, b in map(store.unit_range, range(store.num_units)))
    unit_features = {camera: (rng.standard_normal((most, *store.grid_shape(camera)), np.float32).astype(cfg.dtype),
                              rng.standard_normal((most, store.grid_shape(camera)[-1]), np.float32).astype(cfg.dtype))
                     for camera in store.cameras}
    write = store.write_unit if how == "write_unit" else lambda u, f: zarr_default_write(store, u, f)
    nbytes = 0
    t0 = time.perf_counter()
    for unit in range(store.num_units):
        n = store.unit_range(unit)[1] - store.unit_range(unit)[0]
        features = {camera: (patch[:n], cls[:n]) for camera, (patch, cls) in unit_features.items()}
        write(unit, features)
        nbytes += sum(patch.nbytes + cls.nbytes for patch, cls in features.values())
    seconds = time.perf_counter() - t0
    written = FeatureStore(out)
    assert written.done_units().all() and np.isfinite(written.cls(store.cameras[0], slice(0, 4))).all()
    shutil.rmtree(out)
    return seconds, nbytes, store.num_frames * len(store.cameras)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="dinov2_vits14_reg,dinov2_vitb14_reg,dinov2_vitl14_reg")
    parser.add_argument("--image-size", default="224")
    parser.add_argument("--frames", type=int, default=1024, help="frames of the store (4 units of 256 by default)")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of both writes (best kept)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_store_write_cpu.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dinocache-bench-write-"))
    rows: list[dict[str, Any]] = []
    try:
        dataset = write_synthetic_dataset(work / "data", num_episodes=4, episode_length=args.frames // 4,
                                          image_size=(16, 16), seed=0)
        for name in args.backbones.split(","):
            cfg = ExtractConfig(dataset=dataset, out=work / "unused.zarr", backbone=name, weights="random",
                                image_size=args.image_size, dtype=args.dtype, device="cpu", progress=False)
            backbone = build_backbone(cfg)
            best = {"write_unit": float("inf"), "zarr_default": float("inf")}
            timed_writes(cfg, backbone, work)  # untimed: the first store written pays for cold caches
            for _ in range(args.repeat):
                for how in best:  # in turn, so that a busy neighbour hurts both alike
                    seconds, nbytes, _ = timed_writes(cfg, backbone, work, how)
                    best[how] = min(best[how], seconds)
            row = {"backbone": name, "image_size": args.image_size, "dtype": args.dtype, "frames": args.frames,
                   "mib": round(nbytes / 2**20, 1), "kib_per_frame": round(nbytes / args.frames / 1024, 1)}
            for how, seconds in best.items():
                row[how] = {"frames_per_s": round(args.frames / seconds, 1), "mib_per_s": round(nbytes / 2**20 / seconds, 1)}
            row["speed_up"] = round(best["zarr_default"] / best["write_unit"], 2)
            rows.append(row)
            print(f"{name:22s} {row['kib_per_frame']:7.1f} KiB/frame  write_unit {row['write_unit']['frames_per_s']:8.1f} "
                  f"frames/s ({row['write_unit']['mib_per_s']:6.1f} MiB/s)  Zarr default "
                  f"{row['zarr_default']['frames_per_s']:8.1f} frames/s ({row['zarr_default']['mib_per_s']:6.1f} MiB/s)  "
                  f"x{row['speed_up']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "bench_store_write", "date": date.today().isoformat(),
                                     "command": "python benchmarks/bench_store_write.py " + " ".join(
                                         f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
                                     "machine": describe_machine("cpu"), "store_path": "a fresh folder under "
                                     f"{tempfile.gettempdir()}", "rows": rows}, indent=1) + "\n")
    print(f"recorded in {args.json}")


if __name__ == "__main__":
    main()
