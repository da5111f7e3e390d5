"""Does caching pay? ACT training speed on the cache vs the same head behind a backbone run online.

One run, one generated dataset, one ACT head (LeRobot's defaults), one batch size. For each backbone:

* **online**: what training costs without a cache, the way LeRobot trains an ACT: every step
  takes decoded frames, runs the backbone, then the head's forward, backward and AdamW step
  (:mod:`dinocache.policy.training.online`). DINO backbones run frozen (no grad); ``resnet18`` is ACT's
  own backbone fine-tuned as ACT does (FrozenBatchNorm2d, ``optimizer_lr_backbone``). Frames come
  from the library's one online data path (:class:`dinocache.policy.training.frames.DecodedFrames`, what
  ``dinocache train --online`` and ``dinocache finetune`` use): decoded ahead in a background
  thread (4 batches ahead), the episodes of a batch by a thread pool (PyAV releases the GIL), each
  decoded episode kept while it fits a quarter of the free RAM (this benchmark's dataset does), so
  decoding overlaps the step and is mostly paid once: the strongest online baseline. The frozen
  backbone runs in bfloat16 on CUDA, the head under the same autocast, and the step is taken as
  ``train()`` takes it (fused AdamW, foreach clipping, nothing read back until the timing ends).
* **cached**: the real ``extract`` into a real store (timed: frames/s, bytes per 1000 frames), then
  the real ``train()`` loop on it (steps/s and the share of the step spent waiting for data, from
  its ``metrics.jsonl``), then the live latency at batch 1 of the fused policy built from that run.

Every configuration runs in its own subprocess, so peak memory (RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is that configuration's own. Backbone weights are
random (nothing is downloaded); speed does not depend on weight values.

Derived columns: speed relative to ResNet18 online (= 100 %), the cache's speed-up over the same
backbone online, and the break-even: extraction seconds / (online step s - cached step s), the
training steps after which the cache has paid for its extraction. On a CPU they are computed from
process CPU time (steps per CPU-second, extraction CPU-seconds), which stays put when other jobs
share the machine, unlike wall time; run with ``--threads 1`` and CPU time is what one core takes.
On CUDA they use wall time.

    python benchmarks/compare_backbones.py --threads 1        # all backbones, about 25 min on a CPU core
    python benchmarks/compare_backbones.py --backbones resnet18,dinov2_vitb14 --json out.json
    python benchmarks/compare_backbones.py --device cuda --steps 50 --markdown section.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _child import exit_if_failed, run_child as run_child_process
from _machine import describe_machine

DEFAULT_BACKBONES = ("resnet18", "dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg", "dinov3_vits16",
                     "dinov2_vitb14_reg", "dinov3_vitb16")
RESNET = "resnet18"
CAMERA_SIZE = (480, 640)  # ACT / ALOHA cameras
LEROBOT_VIDEO = dict(codec="h264", pix_fmt="yuv420p", crf=30, gop=2)  # LeRobot's encoding defaults
LOWDIM = 14  # ALOHA: two 7-DoF arms
RESULT = "RESULT "


# --------------------------------------------------------------------------------------------------
# Measurement helpers (child processes)
# --------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> int:
    """Bytes: the CUDA allocator's high-water mark, or this process's peak RSS on CPU."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def latency_ms(run: Callable[[], Any], device: str, runs: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time and median process CPU time of ``run()``, in milliseconds."""
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(runs):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        sync(device)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"latency_ms": statistics.median(wall), "latency_cpu_ms": statistics.median(cpu)}


class RecordClock:
    """Process CPU time at each line ``train()`` appends to ``metrics.jsonl`` (one per ``log_every`` steps).

    ``train()`` reports wall-clock step times only; on a machine shared with other jobs the CPU time
    a step costs is the steadier figure, and the difference between two records brackets the steps
    between them (the record is written right after its step). Polls every few milliseconds.
    """

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.cpu_at = path, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        size = -1
        while not self._stop.wait(0.005):
            if self.path.is_file() and self.path.stat().st_size != size:
                cpu = time.process_time()
                text = self.path.read_text()
                size = len(text.encode())
                self.cpu_at.setdefault(text.count("\n"), cpu)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# Child processes: one configuration each
# --------------------------------------------------------------------------------------------------


def child_extract(task: dict[str, Any]) -> dict[str, Any]:
    """The real `extract` into a real store: one-off cost and size."""
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.pipeline.store import store_bytes

    cfg = ExtractConfig(dataset=Path(task["dataset"]), out=Path(task["store"]), backbone=task["backbone"],
                        weights="random", image_size=str(task["image_size"]), batch_size=task["extract_batch"],
                        device=task["device"], progress=False)
    c0 = time.process_time()
    summary = extract(cfg)
    cpu_s = time.process_time() - c0
    frames = summary.frames * task["cameras"]
    size = store_bytes(Path(task["store"]))
    return {"extract_s": summary.seconds, "extract_cpu_s": cpu_s, "frames": frames,
            "extract_fps": frames / summary.seconds, "extract_fps_cpu": frames / cpu_s,
            "store_bytes": size, "store_mb_per_1000": size / frames * 1000 / 1e6,
            "forward_s": summary.forward_s, "decode_s": summary.decode_s, "precision": cfg.resolved_precision(),
            "peak_memory": peak_memory(task["device"])}


def child_cached(task: dict[str, Any]) -> dict[str, Any]:
    """The real `train()` on the store, then the fused live policy built from the run."""
    import torch

    from dinocache.policy.training.train import TrainConfig, train

    device = task["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = Path(task["run"])
    warmup, steps = task["warmup"], task["warmup"] + task["steps"]
    # A record waits for the device (train() reads its sums then): one every `every` steps, not every step.
    every = math.gcd(warmup, task["steps"])
    clock = RecordClock(run / "metrics.jsonl")
    try:
        train(TrainConfig(store=Path(task["store"]), out=run, steps=steps, batch_size=task["batch_size"],
                          val_episodes="none", eval_every=10**9, save_every=steps, log_every=every, seed=0,
                          device=device, compile=task["compile"], progress=False))
    finally:
        clock.stop()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if r["step"] > warmup]  # one record per `every` steps
    step_s = sum(every / r["steps_per_s"] for r in timed)
    data_s = sum(every * r["data_fraction"] / r["steps_per_s"] for r in timed)
    result = {"steps_per_s": task["steps"] / step_s, "data_fraction": data_s / step_s, "timed_steps": task["steps"],
              "steps_per_cpu_s": task["steps"] / (clock.cpu_at[steps // every] - clock.cpu_at[warmup // every]),
              "peak_memory": peak_memory(device)}
    result.update(fused_latency(run, task))
    return result


def fused_latency(run: Path, task: dict[str, Any]) -> dict[str, Any]:
    """Live latency at batch 1 of the fused policy (backbone + normaliser + head) built from ``run``."""
    import torch

    from dinocache.policy.deployment.fused import build_fused_policy

    device = task["device"]
    image = torch.randint(0, 256, (1, *task["camera_size"], 3), dtype=torch.uint8, device=device)
    state = torch.zeros(1, LOWDIM, device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    policy = build_fused_policy(run, device=device, dtype=dtype)
    with torch.no_grad():
        measured = latency_ms(lambda: policy([image], state), device, task["latency_runs"])
    return {**measured, "latency_source": f"FusedPolicy, {str(dtype).removeprefix('torch.')}"}


def online_latency(model: Any, task: dict[str, Any]) -> dict[str, float]:
    """Backbone + head in eval mode at batch 1, as a live ACT runs (the head's zero latent)."""
    import torch

    from dinocache.keys import camera_key
    from dinocache.policy.model.config import OBS_STATE

    device = task["device"]
    model.eval()
    batch = {camera_key(name): torch.randint(0, 256, (1, *task["camera_size"], 3), dtype=torch.uint8, device=device)
             for name in model.head.inputs.camera_names}
    batch[OBS_STATE] = torch.zeros(1, model.head.inputs.state_dim, device=device)
    cuda = device.startswith("cuda")

    def run() -> None:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            model.head({OBS_STATE: batch[OBS_STATE], **model.features(batch)})

    return latency_ms(run, device, task["latency_runs"])


def child_online(task: dict[str, Any]) -> dict[str, Any]:
    """The online baseline: decode + backbone + head step, as LeRobot trains ACT."""
    import torch
    from torch import nn

    from dinocache.policy.model.config import ACTConfig
    from dinocache.policy.training.frames import DecodedFrames
    from dinocache.policy.training.online import build_online_act

    device = task["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    config = ACTConfig()
    data = DecodedFrames.from_dataset(Path(task["dataset"]), config.chunk_size, device=device,
                                      decode_threads=task["decode_workers"])
    finetune = task["backbone"] == RESNET
    model = build_online_act(config, task["backbone"], list(data.camera_keys), data.state_dim, data.action_dim,
                             finetune=finetune, weights="random", image_size=task["image_size"], seed=0,
                             device=device, amp_dtype=torch.bfloat16 if cuda else None)
    optimizer = model.optimizer()
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda)  # as train.py
    order = data.sample_order(np.arange(len(data.episode_end)), seed=0)
    stream = data.train_batches(order, task["batch_size"], prefetch=4)
    model.train()

    def step() -> float:
        """One step as train.py takes it (fused AdamW, foreach clipping, nothing read back); returns the data wait."""
        t0 = time.perf_counter()
        batch = next(stream)  # decoded ahead, copied into the step's buffers on the device
        waited = time.perf_counter() - t0
        with autocast:
            loss, _ = model(batch)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return waited

    try:
        for _ in range(task["warmup"]):
            step()
        sync(device)
        waits: list[float] = []
        began, cpu_began = time.perf_counter(), time.process_time()
        while len(waits) < task["steps"] and (len(waits) < 3 or time.perf_counter() - began < task["online_budget_s"]):
            waits.append(step())
        sync(device)  # nothing is read back per step: the wall clock covers the queued work only after this
        step_s, cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
    finally:
        stream.close()
    result = {"steps_per_s": len(waits) / step_s, "data_fraction": sum(waits) / step_s,
              "steps_per_cpu_s": len(waits) / cpu_s,
              "timed_steps": len(waits), "peak_memory": peak_memory(device),
              "trainable_backbone_params": sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)}
    if finetune:  # no cache, no fused policy: ACT's live policy is this very model
        result.update(online_latency(model, task), latency_source="backbone + head (ACT), by hand")
    return result


CHILDREN = {"extract": child_extract, "cached": child_cached, "online": child_online}


def child_main(spec: str) -> None:
    import torch

    task = json.loads(spec)
    if task["threads"]:
        torch.set_num_threads(task["threads"])
    result = CHILDREN[task["kind"]](task)
    result["torch_threads"] = torch.get_num_threads()
    print(RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# The parent: plan, run the children one after the other, report
# --------------------------------------------------------------------------------------------------


def run_child(task: dict[str, Any]) -> dict[str, Any]:
    label = f"{task['kind']:8s} {task['backbone']} @{task['image_size']}"
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = run_child_process([sys.executable, __file__, "--child", json.dumps(task)])
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if not done.ok or not lines:
        error = done.error() if not done.ok else "exit 0 without a result line"
        print(f"    FAILED ({error})", file=sys.stderr, flush=True)
        return {"error": error}
    result = json.loads(lines[-1][len(RESULT):])
    result.update(wall_s=time.perf_counter() - t0, load_before=load, load_after=os.getloadavg()[0])
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    print(f"    {shown}", file=sys.stderr, flush=True)
    return result


def size_label(size: Any) -> str:
    height, width = (size, size) if isinstance(size, int) else size
    return f"{height}x{width}"


def speed_keys(device: str) -> tuple[str, str]:
    """(steps key, extraction seconds key) the derived columns use.

    On a CPU, the process CPU time: single-threaded it is what one uncontended core takes, and it
    hardly moves when other jobs share the machine, whereas configurations measured minutes apart
    under different load are not comparable by wall clock. On CUDA, wall time.
    """
    return ("steps_per_s", "extract_s") if device.startswith("cuda") else ("steps_per_cpu_s", "extract_cpu_s")


def rows_of(results: list[dict[str, Any]], frames: int, device: str) -> list[dict[str, Any]]:
    """Table rows with the derived columns (relative speed, speed-up, break-even)."""
    speed, cost = speed_keys(device)
    reference = next((r["online"] for r in results if r["backbone"] == RESNET and speed in r["online"]), None)
    latency_keys = ("latency_ms", "latency_cpu_ms", "latency_source")
    rows = []
    for r in results:
        online, cached, extract = r["online"], r.get("cached") or {}, r.get("extract") or {}
        mode = "online, fine-tuned (ACT)" if r["backbone"] == RESNET else "online, frozen"
        row = {"backbone": r["backbone"], "training": mode, "input": size_label(r["image_size"]), **online}
        row.update({k: cached[k] for k in latency_keys if k in cached})  # one live policy per backbone
        rows.append(row)
        if "cached" not in r:
            continue
        row = {"backbone": r["backbone"], "training": "cached", "input": size_label(r["image_size"]), **cached}
        row.update({k: v for k, v in extract.items() if k.startswith(("extract", "store"))})
        if speed in cached and speed in online:
            row["speedup_vs_online"] = cached[speed] / online[speed]
            saved = 1 / online[speed] - 1 / cached[speed]
            if cost in extract:
                row["break_even_steps"] = extract[cost] / saved if saved > 0 else math.inf
                row["break_even_steps_per_1000_frames"] = row["break_even_steps"] * 1000 / frames
        rows.append(row)
    for row in rows:
        if reference is not None and speed in row:
            row["relative_to_resnet18"] = row[speed] / reference[speed]
    return rows


def fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value * scale`` formatted, ``-`` when missing, ``never`` when infinite."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    return format(value * scale, spec) + suffix


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    cuda = device.startswith("cuda")
    header = ["backbone", "training", "input", "steps/s", "steps / CPU-s", "vs ResNet18", "cache speed-up",
              "peak GPU memory (GiB)" if cuda else "peak RSS (GiB)", "data wait", "live latency b1, ms (CPU ms)",
              "extraction frames/s (per CPU-s)", "store MB / 1000 frames", "break-even steps"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['backbone']}` | {row['training']} | {row['input']} | failed: {row['error']} |")
            continue
        latency = fmt(row.get("latency_ms"), ".0f")
        if row.get("latency_ms") is not None:
            latency += "" if cuda else f" ({row['latency_cpu_ms']:.0f})"
            latency += "" if str(row.get("latency_source")).startswith("FusedPolicy") else " †"
        extraction = fmt(row.get("extract_fps"), ".2f")
        if row.get("extract_fps") is not None and not cuda:
            extraction += f" ({row['extract_fps_cpu']:.2f})"
        lines.append("| " + " | ".join([
            f"`{row['backbone']}`", row["training"], row["input"], fmt(row.get("steps_per_s"), ".3f"),
            fmt(None if cuda else row.get("steps_per_cpu_s"), ".3f"),
            fmt(row.get("relative_to_resnet18"), ".0f", 100, " %"), fmt(row.get("speedup_vs_online"), ".2f", 1, "x"),
            fmt(row.get("peak_memory"), ".2f", 2**-30), fmt(row.get("data_fraction"), ".1f", 100, " %"), latency,
            extraction, fmt(row.get("store_mb_per_1000"), ".0f"), fmt(row.get("break_even_steps"), ".0f"),
        ]) + " |")
    return "\n".join(lines)


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """One line per cached backbone: its speed-up over itself online and its speed relative to ResNet18."""
    lines = []
    for row in rows:
        if row["training"] == "cached" and "speedup_vs_online" in row:
            rel = row.get("relative_to_resnet18")
            lines.append(f"{row['backbone']}: cached {row['speedup_vs_online']:.2f}x its online speed"
                         + (f", {100 * rel:.0f} % of ResNet18 online" if rel is not None else "")
                         + f"; data wait {100 * row['data_fraction']:.1f} % of the step")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES), help="comma list (registry names)")
    parser.add_argument("--image-size", type=int, default=224, help="DINO input size (square)")
    parser.add_argument("--resnet-sizes", default="native,224",
                        help="comma list of resnet18 input sizes; 'native' = the camera's 480x640, as ACT trains. "
                             "The first one is the 100 %% reference")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=4, help="generated episodes")
    parser.add_argument("--episode-length", type=int, default=40, help="frames per generated episode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (every configuration)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (cached: exactly; online: at most)")
    parser.add_argument("--online-budget-s", type=float, default=25.0,
                        help="online: stop timing after this many seconds (at least 3 timed steps)")
    parser.add_argument("--extract-batch", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on CUDA, as train.py)")
    parser.add_argument("--compile", action="store_true",
                        help="cached rows: train --compile (Inductor's kernels, on CUDA inside the step's graph)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process [torch's default]")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the dataset, stores and runs here")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the docs section here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_main(args.child)
        return

    from dinocache.datasets.synthetic import write_synthetic_dataset

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    resnet_sizes = [CAMERA_SIZE if s.strip() == "native" else int(s) for s in args.resnet_sizes.split(",")]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dinocache-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    began, load_began = time.perf_counter(), os.getloadavg()
    try:
        dataset = work / "data"
        if not dataset.exists():
            write_synthetic_dataset(dataset, format="lerobot-v2.1", num_episodes=args.episodes,
                                    episode_length=args.episode_length, image_size=CAMERA_SIZE, cameras=("top",),
                                    state_dim=LOWDIM, action_dim=LOWDIM, seed=0, **LEROBOT_VIDEO)
        frames = args.episodes * args.episode_length
        common = dict(dataset=str(dataset), device=args.device, batch_size=args.batch_size, warmup=args.warmup,
                      steps=args.steps, online_budget_s=args.online_budget_s, extract_batch=args.extract_batch,
                      latency_runs=args.latency_runs, decode_workers=args.decode_workers, threads=args.threads, cameras=1,
                      camera_size=list(CAMERA_SIZE), compile=args.compile)
        results = []
        for backbone in backbones:
            for size in resnet_sizes if backbone == RESNET else [args.image_size]:
                task = dict(common, backbone=backbone, image_size=size)
                entry: dict[str, Any] = {"backbone": backbone, "image_size": size}
                if backbone != RESNET:
                    tag = f"{backbone}-{size_label(size)}"
                    store, run = work / f"{tag}.zarr", work / f"run-{tag}"
                    entry["extract"] = run_child(dict(task, kind="extract", store=str(store)))
                    if "error" not in entry["extract"]:
                        entry["cached"] = run_child(dict(task, kind="cached", store=str(store), run=str(run)))
                    else:
                        entry["cached"] = {"error": "no store"}
                    shutil.rmtree(run, ignore_errors=True)  # checkpoints with optimiser moments: large
                entry["online"] = run_child(dict(task, kind="online"))
                results.append(entry)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = rows_of(results, frames, args.device)
    info = describe_machine(args.device, args.threads)
    command = "python benchmarks/compare_backbones.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = markdown_table(rows, args.device)
    summary = headline(rows)
    total_s = time.perf_counter() - began
    print(table)
    print()
    print("\n".join(summary))
    print(f"\n{total_s / 60:.1f} min; load average {load_began[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": command, "device": args.device, "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "child", "work_dir")},
            "frames": frames, "total_s": total_s, "load_average_start": load_began, "load_average_end": os.getloadavg(),
            "results": results, "rows": rows,
        }, indent=1, default=str))
    if args.markdown:
        where = info.get("gpu") or f"{info['cpu']}, {info['cpu_count']} cores"
        args.markdown.write_text("\n".join([
            f"* Date: {time.strftime('%Y-%m-%d')}. Device: `{args.device}` ({where}); torch {info['torch']}, "
            f"timm {info['timm']}, {info['torch_threads']} torch thread(s) per process.",
            f"* Command: `{command}` ({total_s / 60:.0f} min; load average {load_began[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end).",
            f"* Data: generated LeRobot v2.1, one camera {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} H.264 (LeRobot's encoding: "
            f"yuv420p, crf 30, GOP 2), {args.episodes} episodes x {args.episode_length} frames = {frames} frames, "
            f"{LOWDIM}-d state and action. Head: LeRobot's ACT defaults, batch {args.batch_size}. "
            f"Random backbone weights.",
            "",
            table,
            "",
            "† composed by hand (backbone + head at batch 1), not the fused policy.",
            "" if args.device.startswith("cuda") else
            "Derived columns (vs ResNet18, cache speed-up, break-even) use CPU time: steps per CPU-second and "
            "extraction CPU-seconds.",
            "",
            *[f"* {line}" for line in summary],
            "",
        ]))
    exit_if_failed([f"{kind} {entry['backbone']} @{size_label(entry['image_size'])}: {part['error']}"
                    for entry in results for kind, part in entry.items()
                    if isinstance(part, dict) and "error" in part and part["error"] != "no store"])


if __name__ == "__main__":
    main()
