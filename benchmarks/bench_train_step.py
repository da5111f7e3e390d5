"""How close does `dinocache train` come to the head's own step? The ceiling against the real loop.

For each batch size (8, 64 and 256 by default), on a real feature store and LeRobot's default ACT head:

* **ceiling**: :class:`~dinocache.policy.training.step.TrainStep`, the training step itself (forward,
  backward, clipping, fused AdamW; on CUDA one CUDA graph replayed, as ``train()`` runs it), called
  over and over on one batch already on the device: no data, no records, no Python loop around it.
  What the hardware allows this head.
* **loop**: the real ``train()`` on the store (no validation), its steps/s and data wait read from
  its ``metrics.jsonl`` (wall clock between records, after waiting for the device).

Steps per CPU-second are recorded too (the process's CPU time over the timed steps): on a CPU shared
with other jobs they move far less than wall time, so compare CPU runs by them.

Each one runs in its own process, so peak memory (``torch.cuda.max_memory_allocated`` on CUDA, peak
RSS on the CPU) is its own. The target on a GPU: the loop at >= 0.9 of the ceiling.

The store is ``--store`` (``benchmarks/gpu_check.sh`` passes the one it extracted from the real
dataset), else one extracted here from a generated dataset (``--backbone``, random weights: speed
does not depend on weight values).

    python benchmarks/bench_train_step.py --device cuda --store features.zarr --json docs/results/bench_train_step_cuda.json
    python benchmarks/bench_train_step.py --device cpu --batch-sizes 8,64 --steps 4 --warmup 1 --threads 2
    python benchmarks/bench_train_step.py --kinds loop ...   # the loop alone (e.g. against an older checkout)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _child import exit_if_failed, run_child
from _machine import describe_machine
from compare_backbones import RecordClock, peak_memory, sync

RESULT = "RESULT "


def child_ceiling(task: dict[str, Any]) -> dict[str, Any]:
    """TrainStep on one batch on the device, ``warmup`` untimed calls then ``steps`` timed ones."""
    import numpy as np
    import torch

    from dinocache.policy.model.act import ACTHead, act_optimizer
    from dinocache.policy.training.data import CachedFeatures
    from dinocache.policy.training.episodes import open_training_store
    from dinocache.policy.training.run import resolve_act_config
    from dinocache.policy.training.step import TrainStep

    device = torch.device(task["device"])
    store = open_training_store(task["store"])
    config = resolve_act_config(None, {}, store)
    data = CachedFeatures(store, config.chunk_size, config.use_cls_token, memory_budget=1 << 40, device=device)
    torch.manual_seed(0)
    head = ACTHead(config, data.inputs).to(device)
    inputs = data.batch_buffers(task["batch_size"], device)
    rows = np.random.default_rng(0).choice(store.num_frames, task["batch_size"])
    with data.train_batches(data.sample_order(rows, seed=0), task["batch_size"], out=inputs) as batches:
        next(batches)
    del data  # only the batch stays on the device, as a step's inputs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if task["compile"]:
        head.compile()
    step = TrainStep(head, act_optimizer(list(head.parameters()), config), inputs, graph=device.type == "cuda")
    head.train()
    for _ in range(task["warmup"]):
        step()
    step.take()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(task["steps"]):
        step()
    sums, bad = step.take()  # waits for the device
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    assert bad is None and math.isfinite(sums[0]), (sums, bad)
    return {"steps_per_s": task["steps"] / seconds, "steps_per_cpu_s": task["steps"] / cpu_s, "data_fraction": 0.0,
            "peak_memory": peak_memory(task["device"])}


def child_loop(task: dict[str, Any]) -> dict[str, Any]:
    """The real train() loop; steps/s and data wait over the records after the warm-up."""
    import torch

    from dinocache.policy.training.train import TrainConfig, train

    if task["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warmup, steps = task["warmup"], task["steps"]
    every = math.gcd(warmup, steps)
    run = Path(task["run"])
    clock = RecordClock(run / "metrics.jsonl")  # process CPU time at each record: steadier than wall on a busy CPU
    try:
        train(TrainConfig(store=Path(task["store"]), out=run, steps=warmup + steps, batch_size=task["batch_size"],
                          val_episodes="none", eval_every=10**9, save_every=10**9, log_every=every, seed=0,
                          device=task["device"], compile=task["compile"], progress=False))
    finally:
        clock.stop()
    sync(task["device"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if r["step"] > warmup]
    previous = [warmup] + [r["step"] for r in timed[:-1]]
    seconds = [(r["step"] - p) / r["steps_per_s"] for r, p in zip(timed, previous)]
    data_s = sum(r["data_fraction"] * s for r, s in zip(timed, seconds))
    cpu_s = clock.cpu_at[(warmup + steps) // every] - clock.cpu_at[warmup // every]
    return {"steps_per_s": steps / sum(seconds), "steps_per_cpu_s": steps / cpu_s,
            "data_fraction": data_s / sum(seconds), "peak_memory": peak_memory(task["device"])}


CHILDREN = {"ceiling": child_ceiling, "loop": child_loop}


def child_main(spec: str) -> None:
    import torch

    task = json.loads(spec)
    if task["threads"]:
        torch.set_num_threads(task["threads"])
    print(RESULT + json.dumps(CHILDREN[task["kind"]](task)), flush=True)


def measure(task: dict[str, Any]) -> dict[str, Any]:
    print(f"[{time.strftime('%H:%M:%S')}] {task['kind']} batch {task['batch_size']} ...", file=sys.stderr, flush=True)
    done = run_child([sys.executable, __file__, "--child", json.dumps(task)])
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if not done.ok or not lines:
        return {"error": done.error() if not done.ok else "exit 0 without a result line"}
    result = json.loads(lines[-1][len(RESULT):])
    result["samples_per_s"] = result["steps_per_s"] * task["batch_size"]
    print(f"    {result}", file=sys.stderr, flush=True)
    return result


def make_store(work: Path, args: argparse.Namespace) -> Path:
    """A store extracted here: generated LeRobot v2.1 video, ``--backbone`` at ``--image-size``, random weights."""
    from dinocache.datasets.synthetic import write_synthetic_dataset
    from dinocache.pipeline.extract import ExtractConfig, extract

    dataset = write_synthetic_dataset(work / "data", format="lerobot-v2.1", num_episodes=args.episodes,
                                      episode_length=args.episode_length, image_size=(96, 128), cameras=("top",),
                                      state_dim=14, action_dim=14, seed=0)
    store = work / "features.zarr"
    extract(ExtractConfig(dataset=dataset, out=store, backbone=args.backbone, weights="random",
                          image_size=str(args.image_size), device=args.device, progress=False))
    return store


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    memory = "peak GPU memory (GiB)" if device.startswith("cuda") else "peak RSS (GiB)"
    lines = [f"| batch | ceiling steps/s | ceiling samples/s | loop steps/s | loop samples/s | loop / ceiling | "
             f"loop data wait | steps / CPU-s: ceiling / loop | {memory}: ceiling / loop |", "|---:" * 9 + "|"]

    def get(part: dict[str, Any] | None, key: str, spec: str, scale: float = 1.0) -> str:
        if part is None:
            return "-"
        return "failed" if "error" in part else format(part[key] * scale, spec)

    for row in rows:
        ceiling, loop = row.get("ceiling"), row.get("loop")
        ratio = "-" if row.get("loop_vs_ceiling") is None else f"{row['loop_vs_ceiling']:.2f}"
        lines.append(f"| {row['batch_size']} | {get(ceiling, 'steps_per_s', '.2f')} | "
                     f"{get(ceiling, 'samples_per_s', '.0f')} | {get(loop, 'steps_per_s', '.2f')} | "
                     f"{get(loop, 'samples_per_s', '.0f')} | {ratio} | {get(loop, 'data_fraction', '.1f', 100)} % | "
                     f"{get(ceiling, 'steps_per_cpu_s', '.3f')} / {get(loop, 'steps_per_cpu_s', '.3f')} | "
                     f"{get(ceiling, 'peak_memory', '.2f', 2**-30)} / {get(loop, 'peak_memory', '.2f', 2**-30)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--store", type=Path, default=None, help="a feature store (default: extract one here)")
    parser.add_argument("--backbone", default="dinov2_vitb14_reg", help="backbone of the store made here")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--episodes", type=int, default=4, help="generated episodes of the store made here")
    parser.add_argument("--episode-length", type=int, default=40)
    parser.add_argument("--batch-sizes", default="8,64,256")
    parser.add_argument("--kinds", default="ceiling,loop", help="which of ceiling,loop to measure")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (CUDA: graph capture included)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    parser.add_argument("--compile", action="store_true",
                        help="train --compile: the head's Inductor kernels (on CUDA inside the step's graph)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_main(args.child)
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dinocache-bench-step-"))
    work.mkdir(parents=True, exist_ok=True)
    began, load_began = time.perf_counter(), os.getloadavg()
    store = args.store or make_store(work, args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        row: dict[str, Any] = {"batch_size": batch_size}
        for kind in kinds:
            row[kind] = measure(dict(kind=kind, store=str(store), device=args.device, batch_size=batch_size,
                                     warmup=args.warmup, steps=args.steps, threads=args.threads, compile=args.compile,
                                     run=str(work / f"run-{batch_size}-{time.monotonic_ns()}")))
        if all(k in row and "error" not in row[k] for k in ("ceiling", "loop")):
            row["loop_vs_ceiling"] = row["loop"]["steps_per_s"] / row["ceiling"]["steps_per_s"]
        rows.append(row)

    from dinocache.pipeline.store import FeatureStore

    opened = FeatureStore(store)
    camera = opened.cameras[0]
    store_info = {"path": str(store), "backbone": opened.record.backbone.name,
                  "frames": opened.num_frames, "cameras": len(opened.cameras), "grid": list(opened.grid_shape(camera))}
    info = describe_machine(args.device, args.threads)
    command = "python benchmarks/bench_train_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = markdown_table(rows, args.device)
    total_s = time.perf_counter() - began
    print(table)
    print(f"\nstore: {store_info}; {total_s / 60:.1f} min; load average {load_began[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "bench_train_step", "date": time.strftime("%Y-%m-%d"), "command": command,
            "device": args.device, "machine": info, "store": store_info, "head": "LeRobot's ACT defaults",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "child", "work_dir")},
            "total_s": total_s, "load_average_start": load_began, "load_average_end": os.getloadavg(), "rows": rows,
        }, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    exit_if_failed([f"{kind} batch {row['batch_size']}: {row[kind]['error']}"
                    for row in rows for kind in kinds if "error" in row[kind]])


if __name__ == "__main__":
    main()
