"""LeRobot's own training loop with the dinocache plugin, online and on the feature cache, beside ``dinocache train``.

One dataset written by LeRobot's own writer (``LeRobotDataset.create``: one 480x640 camera, AV1, 14-d
state and action, as ALOHA), one feature store of it (``dinocache extract``, float16), one head
(LeRobot's ACT defaults, the ``dinov2-reg`` preset's CLS token), batch 8, and three loops:

* ``lerobot-train --policy.type=dinocache``: the frozen backbone run on every batch (online);
* the same with ``--policy.feature_cache=STORE``: features looked up by frame index, the backbone not
  run (LeRobot's dataloader still decodes each sample's frame: its dataset has no way to skip a
  camera the policy does not read);
* ``dinocache train STORE``: dinocache's own loop on the same store.

Each loop runs as a subprocess, as a user runs it, with ``--threads`` torch threads
(``OMP_NUM_THREADS``). Two figures per loop:

* steps/s: what each loop reports per step, LeRobot's ``updt_s + data_s`` (its ``smp/s`` is the batch
  size over that), dinocache's ``metrics.jsonl`` ``steps_per_s`` (wall clock between records), the
  first ``--warmup`` steps left out;
* steps per CPU-second: each loop is run twice, for ``--warmup`` and for ``--steps`` steps, and the
  difference of the two runs' CPU time (the process and its dataloader workers) is divided by the
  difference of their steps, so start-up (imports, model, dataset) cancels out. On a CPU shared with
  other jobs this moves far less than wall time.

    python benchmarks/bench_lerobot_loop.py --json docs/results/lerobot_loop_cpu.json

Needs LeRobot and the plugin: ``pip install "lerobot[training]" -e . -e plugins/lerobot_policy_dinocache``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _machine import describe_machine

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_LEROBOT_STEP = re.compile(r"step:(\d+) .*? loss:([\d.]+) .*?updt_s:([\d.]+) data_s:([\d.]+)")


def _run(args: list[str], threads: int, log: Path) -> tuple[str, float]:
    """Run a loop; its output and the CPU seconds it (and its dataloader workers) took."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {result.returncode}); its output is in {log}")
    return result.stdout + result.stderr, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _twice(run: Callable[[int, Path], tuple[str, float]], args: argparse.Namespace, out: Path) -> tuple[str, float]:
    """``run(steps, out)`` for ``--warmup`` and for ``--steps`` steps: the long run's output, and the CPU
    seconds per step between the two."""
    _, short_cpu = run(args.warmup, out.with_name(out.name + "-short"))
    text, long_cpu = run(args.steps, out)
    return text, (long_cpu - short_cpu) / (args.steps - args.warmup)


def lerobot_loop(args: argparse.Namespace, dataset: Path, out: Path, **policy: str) -> dict[str, Any]:
    """``lerobot-train`` with the plugin: LeRobot's per-step ``updt_s`` and ``data_s`` after the warm-up."""
    options = {"pretrained_backbone_weights": "random", "vision_backbone": args.backbone, "image_size": args.image_size,
               "device": "cpu", "push_to_hub": "false", **policy}

    def run(steps: int, folder: Path) -> tuple[str, float]:
        return _run([str(BIN / "lerobot-train"), "--policy.type=dinocache",
                     *(f"--policy.{key}={value}" for key, value in options.items()),
                     "--dataset.repo_id=local/bench", f"--dataset.root={dataset}", f"--steps={steps}",
                     f"--batch_size={args.batch_size}", "--log_freq=1", "--save_checkpoint=false",
                     f"--num_workers={args.num_workers}", "--wandb.enable=false", f"--output_dir={folder}"],
                    args.threads, folder.with_suffix(".log"))

    text, cpu_per_step = _twice(run, args, out)
    steps = {int(m[1]): (float(m[3]), float(m[4])) for m in _LEROBOT_STEP.finditer(text)}
    timed = [steps[s] for s in sorted(steps) if s > args.warmup]
    seconds = sum(update + data for update, data in timed)
    return {"steps_per_s": len(timed) / seconds, "steps_per_cpu_s": 1 / cpu_per_step,
            "update_s": sum(u for u, _ in timed) / len(timed), "data_s": sum(d for _, d in timed) / len(timed),
            "timed_steps": len(timed),
            # the same seed, weights and batches: online and feature cache should train alike, step by step
            "losses": [float(m[2]) for m in _LEROBOT_STEP.finditer(text)]}


def dinocache_loop(args: argparse.Namespace, store: Path, out: Path) -> dict[str, Any]:
    """``dinocache train`` on the store, the same head: its per-step rate from ``metrics.jsonl``."""
    def run(steps: int, folder: Path) -> tuple[str, float]:
        return _run([str(BIN / "dinocache"), "train", str(store), "--out", str(folder), "--preset", "dinov2-reg",
                     "--steps", str(steps), "--batch-size", str(args.batch_size), "--log-every", "1",
                     "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps), "--val-episodes",
                     "none", "--device", "cpu", "--no-progress"], args.threads, folder.with_suffix(".log"))

    _, cpu_per_step = _twice(run, args, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = sum(1 / r["steps_per_s"] for r in timed)
    return {"steps_per_s": len(timed) / seconds, "steps_per_cpu_s": 1 / cpu_per_step,
            "data_fraction": sum(r["data_fraction"] for r in timed) / len(timed), "timed_steps": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_lerobot_loop"))
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--backbone", default="dinov2_vits14_reg")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=60, help="Frames per episode.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every loop (OMP_NUM_THREADS).")
    parser.add_argument("--num-workers", type=int, default=1, help="lerobot-train's dataloader workers.")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from _lerobot import write_dataset  # the tests' LeRobot writer: one way to write these datasets

    from dinocache.pipeline.extract import ExtractConfig, extract

    begin, load_start = time.perf_counter(), os.getloadavg()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "dataset"
    if not (dataset / "meta" / "info.json").is_file():
        write_dataset(dataset, image_hw=(480, 640), dim=14, episodes=args.episodes, frames=args.frames, fps=50)
    store = work / "features.zarr"
    extract(ExtractConfig(dataset=dataset, out=store, backbone=args.backbone, weights="random",
                          image_size=str(args.image_size), device="cpu", progress=False, overwrite=True))
    rows = {
        "lerobot-train, plugin online": lerobot_loop(args, dataset, work / "online"),
        "lerobot-train, plugin feature cache": lerobot_loop(args, dataset, work / "cache", feature_cache=str(store)),
        "dinocache train": dinocache_loop(args, store, work / "dinocache"),
    }
    for name in ("online", "cache", "dinocache"):  # the next run starts afresh
        for folder in (work / name, work / f"{name}-short"):
            shutil.rmtree(folder, ignore_errors=True)
    result = {
        "benchmark": "bench_lerobot_loop", "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "machine": describe_machine("cpu", args.threads),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "data": f"LeRobot v3.0 by LeRobotDataset.create: one 480x640 camera (AV1), 14-d state/action, "
                f"{args.episodes} episodes x {args.frames} frames",
        "head": "LeRobot's ACT defaults (dim_model 512, 4+4 encoder layers, 1 decoder layer, chunk 100) + CLS token",
        "total_s": time.perf_counter() - begin, "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows,
    }
    reference = rows["dinocache train"]
    print("| loop | steps/s | steps / CPU-s | vs dinocache train (CPU) | update s | data wait s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['steps_per_s']:.3f} | {row['steps_per_cpu_s']:.3f} | "
              f"{row['steps_per_cpu_s'] / reference['steps_per_cpu_s']:.2f}x | "
              f"{row.get('update_s', float('nan')):.2f} | {row.get('data_s', float('nan')):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
