"""Augmentation on the cache, measured: does it help, and what does it cost?

Two parts, each a sequence of ``dinocache`` commands (run as users run them, timed one by one):

* ``g1``: the real G1 humanoid dataset (3 episodes; one held out). Extraction with ``--views K`` for
  each K of ``--views`` (time and store size), then one training run per configuration, all on the
  same schedule and seed: no augmentation, K-view sampling, a grid shift, and both; the baseline is
  trained with a second seed as well, to show how much two seeds differ. The figure is the validation
  L1 on the held-out episode (normalised action units), final and best, beside that of predicting the
  mean action.
* ``sim``: the simulator's closed loop (``benchmarks/closed_loop.py``'s task and seed scheme: scripted
  demonstrations, then ``extract`` -> ``train`` -> ``export`` -> ``sim eval``) for no augmentation and
  for the configuration with the lowest final validation L1 in the ``g1`` part (or ``--sim-config``),
  same demonstrations, seeds and steps, success rates with 95 % Wilson intervals.

Weights are seeded random (``--weights random``): no pretrained weights can be downloaded on the machines
this runs on, and every figure says so. Results go to ``--json`` (each part updates its own key) and,
as a section between markers, to ``--record``.

    python benchmarks/bench_augment.py --parts g1,sim --work /tmp/aug_bench \\
        --json docs/results/augment_cpu.json --record docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from _machine import describe_machine
from closed_loop import Phase, dinocache, record_section, run_phase

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- augment:begin -->", "<!-- augment:end -->"
G1 = ROOT.parent / "shared" / "datasets" / "g1_pick_bottle_3ep"
#: The configurations: the store's views and the `train` options. "none" is the baseline.
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "none": (1, []),
    "views": (4, ["--view-sampling", "uniform"]),
    "grid": (1, ["--grid-shift", "1"]),
    "both": (4, ["--view-sampling", "uniform", "--grid-shift", "1"]),
}
#: A head small enough for a CPU schedule (LeRobot's ACT structure, narrower), as closed_loop.py's "small".
HEAD = dict(dim_model=256, dim_feedforward=1024, n_encoder_layers=2, n_vae_encoder_layers=2, optimizer_lr=1e-4)


def head_args(chunk_size: int) -> list[str]:
    act = dict(HEAD, chunk_size=chunk_size, n_action_steps=chunk_size)
    return [item for key, value in act.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def store_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(name: str, argv: list[str], args: argparse.Namespace, logs: Path) -> Phase:
    """Run one command (closed_loop.run_phase: its log, a time budget); stop the benchmark if it fails."""
    phase = Phase(name)
    run_phase(phase, argv, args.budget, logs / f"{name}.log")
    if phase.status != "ok":
        raise SystemExit(f"{name} {phase.status}; see {phase.log}")
    return phase


def extract_views(args: argparse.Namespace, dataset: Path, out: Path, views: int, logs: Path) -> dict[str, Any]:
    """One extraction with ``views`` views: its time as the command reports it (from the dataset opened
    to the last unit written, backbone built included), frames and store size. With ``--reuse``, a
    complete store already made by this script, and its log, stand for the extraction."""
    name = f"extract-{out.stem}"
    argv = dinocache("extract", dataset, "--backbone", args.backbone, "--weights", "random", "--image-size",
                     args.image_size, "--out", out, "--device", "cpu", "--no-progress", "--overwrite",
                     *(["--views", views, "--augment", args.augment] if views > 1 else []))
    log = logs / f"{name}.log"
    if not (args.reuse and log.is_file() and "throughput" in log.read_text()):
        run(name, argv, args, logs)
    text = log.read_text()
    frames, seconds = (float(v) for v in re.search(r"frames\s+(\d+) in .*?over ([\d.]+) s", text, re.S).groups())
    forward = float(re.search(r"forward ([\d.]+) s \(", text).group(1))
    return {"views": views, "seconds": seconds, "frames": int(frames), "frames_per_s": round(frames / seconds, 1),
            "forward_s": forward, "store_mib": round(store_mib(out), 1),
            "command": " ".join(map(str, argv[2:])).replace("dinocache.cli", "dinocache", 1)}


def augment_cost(args: argparse.Namespace, dataset: Path, frames: int = 32) -> dict[str, Any]:
    """Milliseconds per augmented view of one decoded frame (the recipe alone, on the CPU, this process's
    threads), which the extraction with views pays beside the backbone's forwards."""
    import time

    import torch

    from dinocache.datasets import open_dataset
    from dinocache.encoders.augment import ViewAugmenter
    from dinocache.encoders.augment_recipe import parse_recipe

    source = open_dataset(dataset)
    camera = next(iter(source.cameras))
    images = torch.from_numpy(source.read_frames(source.episodes[0].index, camera)[:frames])
    augmenter = ViewAugmenter(parse_recipe(args.augment), views=4)
    began = time.perf_counter()
    augmenter(images, camera, range(len(images)))
    seconds = time.perf_counter() - began
    return {"frame_size": list(images.shape[1:3]), "ms_per_view": round(1000 * seconds / (3 * len(images)), 1),
            "threads": torch.get_num_threads()}


def train_run(args: argparse.Namespace, store: Path, out: Path, options: list[str], seed: int, val: str,
              logs: Path) -> dict[str, Any]:
    """One training run: its validation L1 (final, best), the mean action's, and its wall time."""
    every = max(args.steps // 10, 1)
    shutil.rmtree(out, ignore_errors=True)  # a rerun of the benchmark trains afresh
    phase = run(f"train-{out.parent.name}-{out.name}", dinocache(
        "train", store, "--out", out, "--steps", args.steps, "--batch-size", args.batch_size, "--seed", seed,
        "--val-episodes", val, "--eval-every", every, "--save-every", args.steps, "--log-every", every, "--device",
        "cpu", "--no-progress", *head_args(args.chunk_size), *options), args, logs)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_l1"] for r in records if r["val_l1"] is not None]
    record = json.loads((out / "run.json").read_text())
    return {"final_val_l1": vals[-1], "best_val_l1": min(vals), "mean_action_val_l1": record["baseline_val_l1"],
            "val_curve": vals, "seconds": round(phase.seconds, 1), "steps_per_s": records[-1]["steps_per_s"],
            "train_options": record["train"], "command": phase.command}


def part_g1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    logs = work / "logs"
    stores = {views: work / f"g1_k{views}.zarr" for views in sorted({v for v, _ in CONFIGS.values()} | set(args.views))}
    extraction = [extract_views(args, G1, store, views, logs) for views, store in stores.items()]
    cost = augment_cost(args, G1)
    runs = {}
    for name, (views, options) in CONFIGS.items():
        runs[name] = train_run(args, stores[views], work / "runs" / name, options, args.seed, args.val_episodes, logs)
    runs["none-seed2"] = train_run(args, stores[1], work / "runs" / "none-seed2", [], args.seed + 1,
                                   args.val_episodes, logs)
    return {"dataset": str(G1), "val_episodes": args.val_episodes, "extraction": extraction, "augment_cost": cost,
            "runs": runs,
            "schedule": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                         "chunk_size": args.chunk_size, "head": HEAD}}


def part_sim(args: argparse.Namespace, work: Path, g1: dict[str, Any] | None) -> dict[str, Any]:
    """The closed loop for no augmentation and the best other configuration (by the G1 part's final L1)."""
    if args.sim_config:
        best = args.sim_config
    elif g1 is not None:
        best = min(("views", "grid", "both"), key=lambda name: g1["runs"][name]["final_val_l1"])
    else:
        raise SystemExit("--parts sim needs the g1 part's results (in --json) or --sim-config")
    logs, demos = work / "logs", work / "demos"
    if not (demos / "sim_demos.json").is_file():
        run("demos", dinocache("sim", "demos", "--episodes", args.demo_episodes, "--seed", 0, "--image-size",
                               args.camera_size, "--out", demos, "--no-progress"), args, logs)
    rows = {}
    for name in ("none", best):
        views, options = CONFIGS[name]
        store, folder, policy = work / f"sim_k{views}.zarr", work / "sim_runs" / name, work / "sim_runs" / f"{name}.pt2"
        if not (store / "zarr.json").is_file():
            extract_views(args, demos, store, views, logs)
        trained = train_run(args, store, folder, options, args.seed, "0.1", logs)
        run(f"export-{name}", dinocache("export", folder, "--out", policy, "--device", "cpu", "--dataset", demos),
            args, logs)
        evaluation = work / "sim_eval" / name
        phase = run(f"eval-{name}", dinocache(
            "sim", "eval", policy, "--episodes", args.eval_episodes, "--seed", 0, "--max-steps", 400, "--out",
            evaluation, "--videos", 0, "--demos", demos, "--device", "cpu", "--no-progress"), args, logs)
        result = json.loads((evaluation / "results.json").read_text())
        rows[name] = {**trained, **{key: result[key] for key in ("episodes", "successes", "success_rate", "ci95",
                                                                 "stages")}, "eval_seconds": round(phase.seconds, 1)}
    made = json.loads((demos / "sim_demos.json").read_text())
    return {"best_other": best, "demos": {"kept": made["kept"], "attempted": made["attempted"],
                                          "camera_size": args.camera_size}, "eval_episodes": args.eval_episodes,
            "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [BEGIN, "## Augmentation on the cache (`benchmarks/bench_augment.py`)", "",
             f"* Date: {report['date']}. Machine: {m['cpu']}, {m['cpu_count']} cores shared with other jobs, **no GPU** "
             f"(CPU figures only), {m['torch_threads']} torch thread(s) per command; torch {m['torch']}.",
             *(f"* Command ({part} part): `{report[part]['command']}`." for part in ("g1", "sim") if part in report),
             f"* Backbone `{report['backbone']}` at {report['image_size']} px with **random-initialised weights** "
             "(seed 0; no pretrained weights can be downloaded here): the features carry no learned semantics, so "
             "these figures say what augmentation does to a head on such features, not on DINO's.",
             f"* Views: recipe `{report['augment']}` (LeRobot's `image_transforms` defaults: 3 of brightness, "
             "contrast, saturation, hue, sharpness, affine per view). Grid shift: up to 1 patch each way, edges "
             "replicated.", ""]
    g1 = report.get("g1")
    if g1:
        s = g1["schedule"]
        runs = [("first run", g1["extraction"]), *([("rerun", g1["extraction_rerun"])] if "extraction_rerun" in g1 else [])]
        lines += [f"**Extraction of the real G1 dataset** (1 camera, 480x640 AV1, {g1['extraction'][0]['frames']} "
                  "frames, one thread, CPU; the rerun made K=1 then K=4 back to back with fewer other jobs on the "
                  "cores, and wrote the same bytes):", "",
                  "| views K | store | x K=1 | " + " | ".join(f"time, {name} (x K=1)" for name, _ in runs) + " |",
                  "|---:|---:|---:|" + "---:|" * len(runs)]
        for i, e in enumerate(g1["extraction"]):
            times = " | ".join(f"{made[i]['seconds']:.0f} s ({made[i]['seconds'] / made[0]['seconds']:.1f}x)"
                               for _, made in runs)
            lines.append(f"| {e['views']} | {e['store_mib']:.1f} MiB | {e['store_mib'] / g1['extraction'][0]['store_mib']:.2f} "
                         f"| {times} |")
        cost = g1["augment_cost"]
        lines += ["", f"The recipe alone costs {cost['ms_per_view']:.0f} ms per augmented view of a "
                      f"{cost['frame_size'][0]}x{cost['frame_size'][1]} frame on one thread of this CPU (applied at the "
                      "camera's native size, before the resize, as LeRobot applies it)."]
        lines += ["", f"**Validation L1 on the held-out episode {g1['val_episodes']}** (normalised action units; "
                      f"{s['steps']} steps at batch {s['batch_size']}, seed {s['seed']}, chunk {s['chunk_size']}, "
                      "head dim 256 / 2 encoder layers; lower is better):", "",
                  "| configuration | store, train options, seed | final val L1 | best val L1 | mean action | train time |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, r in g1["runs"].items():
            views, options = CONFIGS[name.removesuffix("-seed2")]
            seed = f"seed {s['seed'] + 1}" if name.endswith("-seed2") else f"seed {s['seed']}"
            lines.append(f"| {name} | K={views} store, {' '.join(options) or 'none'}, {seed} | {r['final_val_l1']:.3f} "
                         f"| {r['best_val_l1']:.3f} | {r['mean_action_val_l1']:.3f} | {r['seconds'] / 60:.1f} min |")
    sim = report.get("sim")
    if sim:
        lines += ["", f"**Closed loop** (ALOHA transfer-cube in simulation, {sim['demos']['kept']} scripted "
                      f"demonstrations at {sim['demos']['camera_size']}, {sim['eval_episodes']} evaluation episodes on "
                      "held-out cube seeds 1000000+0.., same steps and seeds for both rows; 95 % Wilson intervals):", "",
                  "| configuration | final val L1 | success (95% CI) | touched | lifted | transferred |",
                  "|---|---:|---:|---:|---:|---:|"]
        notes = [f"`{sim['best_other']}` is the augmented configuration with the lowest final validation L1 on G1; "
                 "schedule and head as there, validated on one of the demonstrations."]
        if "extraction" in sim:
            k1, *more = sim["extraction"]
            notes += [f"Extraction of the {k1['frames']} demonstration frames: K=1 {k1['seconds']:.0f} s, {k1['store_mib']:.0f} MiB"
                      + "".join(f"; K={e['views']} {e['seconds']:.0f} s, {e['store_mib']:.0f} MiB" for e in more)
                      + (f" ({sim['extraction_note']})" if "extraction_note" in sim else "") + "."]
        for name, r in sim["rows"].items():
            low, high = r["ci95"]
            st = r["stages"]
            lines.append(f"| {name} | {r['final_val_l1']:.3f} | **{r['successes']}/{r['episodes']} = "
                         f"{100 * r['success_rate']:.0f}%** ({100 * low:.0f}-{100 * high:.0f}%) | {100 * st['touched']:.0f}% "
                         f"| {100 * st['lifted']:.0f}% | {100 * st['transferred']:.0f}% |")
        lines += ["", " ".join(notes)]
    lines += [END, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="g1,sim",
                        help="Comma list of: g1, sim; empty to write the section again from --json.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinocache_augment"))
    parser.add_argument("--backbone", default="dinov2_vits14_reg")
    parser.add_argument("--image-size", default="112")
    parser.add_argument("--augment", default="lerobot", help="The recipe of the views.")
    parser.add_argument("--views", default="1,4", help="The K of the extraction table (1 and 4 are always made).")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--val-episodes", default="1", help="The G1 episode(s) held out.")
    parser.add_argument("--sim-config", choices=["views", "grid", "both"], default=None)
    parser.add_argument("--demo-episodes", type=int, default=10)
    parser.add_argument("--camera-size", default="240x320")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--budget", type=float, default=30.0, help="Minutes any one command may take.")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every command (on a CPU shared with other jobs, 1 runs several "
                             "times faster than a thread per core: two threads spin-wait on each other).")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the stores (and their extraction logs) an earlier run of this script made.")
    parser.add_argument("--json", type=Path, default=None, help="Results file (docs/results/augment_cpu.json).")
    parser.add_argument("--record", default="none", help="Markdown file to put the section in, or 'none'.")
    args = parser.parse_args(argv)
    args.views = [int(v) for v in args.views.split(",")]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every command
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    report.update(date=datetime.date.today().isoformat(), machine=describe_machine("cpu", args.threads),
                  backbone=args.backbone,
                  image_size=args.image_size, augment=args.augment, weights="random (seed 0)",
                  command=" ".join(["python benchmarks/bench_augment.py", *(argv if argv is not None else sys.argv[1:])]))
    for part in filter(None, args.parts.split(",")):  # none: the section again, from --json
        report[part] = part_g1(args, args.work) if part == "g1" else part_sim(args, args.work, report.get("g1"))
        report[part]["command"] = report["command"]
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    print(section)
    if args.record != "none":
        record_section(Path(args.record), section, BEGIN, END)
    return report


if __name__ == "__main__":
    main()
