"""Closed loop: does a trained, exported policy succeed at ALOHA transfer-cube in simulation?

One command: scripted demonstrations, then for every configuration (``--configs``) its phases, each
one a ``dinocache`` command run with its own time budget (``--budget``), then a table. The rows:

* ``dino-cached``: the frozen DINO backbone, features cached: ``extract`` -> ``train`` -> ``export``
  -> ``sim eval``;
* ``resnet18-online``: ACT's own recipe, ResNet18 trained online with the head:
  ``dinocache train --online --backbone resnet18 DATASET --out RUN`` -> ``export`` -> ``sim eval``;
* ``dino-finetune``: the ``dino-cached`` run fine-tuned end to end from its cached warm start:
  ``dinocache finetune RUN --out RUN2 --steps N`` -> ``export`` -> ``sim eval``;
* ``resnet18-cached``: ResNet18 frozen and cached like the DINO row (the earlier stand-in for ACT's).

A configuration whose command this checkout does not have yet (``train --online``, ``finetune``) gets
a "not available" row instead of a crash; a training phase that runs out of its budget is cut there
and its last checkpoint (one every tenth of the schedule) exported and evaluated, the steps it made
counted; any other phase that fails or runs out of its budget ends its row
there, with its log. Everything goes to ``<work>/closed_loop.json`` and, as a section between markers,
into ``docs/benchmarks.md`` (``--record``); the first ``--videos`` rollouts of every row are mp4s.

Schedule: LeRobot's ACT on ALOHA sim trains 100k steps at batch 8 (800k samples). ``--batch-size B``
keeps the samples (800k / B steps) unless ``--steps`` is given; the table gives steps and samples.
Fine-tuning runs ``--finetune-steps`` on top of the cached run's schedule.

Weights: pretrained weights cannot be downloaded on the machines this was first run on, so the
default is ``--weights random`` (seeded random initialisation) and every figure is labelled with it.

    python benchmarks/closed_loop.py --device cuda --weights auto             # every row, the full schedule
    python benchmarks/closed_loop.py --device cuda --batch-size 64 --configs dino-cached
    python benchmarks/closed_loop.py --smoke --work /tmp/cl_smoke --record none   # plumbing check, minutes on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _child import exit_if_failed
from _machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- closed-loop:begin -->", "<!-- closed-loop:end -->"
FULL_SCHEDULE = dict(steps=100_000, batch_size=8)  # LeRobot's ACT on ALOHA sim: 800k samples
GOAL = 0.90  # the project's target success rate for the cached DINO policy
#: What each row is, and the phases after the demonstrations that make it.
CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dino-cached": ("frozen DINO backbone, cached features", ("extract", "train", "export", "eval")),
    "resnet18-online": ("ACT's ResNet18 trained online with the head", ("train", "export", "eval")),
    "dino-finetune": ("DINO fine-tuned end to end from the cached run", ("finetune", "export", "eval")),
    "resnet18-cached": ("frozen ResNet18, cached features", ("extract", "train", "export", "eval")),
}
DEFAULT_CONFIGS = "dino-cached,resnet18-online,dino-finetune"
#: Time budget per phase, minutes (``--budget phase=minutes,...`` overrides).
BUDGETS = dict(demos=10.0, extract=15.0, train=90.0, finetune=60.0, export=10.0, eval=20.0)
SMOKE = dict(demo_episodes=2, eval_episodes=2, steps=5, finetune_steps=2, max_steps=40, camera_size="84x112",
             head="tiny", image_size="56x56", resnet_image_size="64x96")
PRESET_FOR = {"dinov2_vits14_reg": "dinov2-reg", "dinov2_vits14": "dinov2", "dinov3_vits16": "dinov3-small"}
#: ``--head``: ACT overrides on top of LeRobot's defaults (and the backbone's preset). ``small`` keeps
#: ACT's chunk of 100 and its layer structure but a narrower model (CPU budgets); ``default`` is
#: LeRobot's ACT as is (the GPU schedule); ``tiny`` is for smoke runs.
HEADS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": dict(dim_model=256, dim_feedforward=1024, n_encoder_layers=2, n_vae_encoder_layers=2,
                  optimizer_lr=1e-4),
    "tiny": dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                 n_vae_encoder_layers=1, latent_dim=8, chunk_size=10, n_action_steps=10),
}


#: A phase's outcomes after which the row goes on: a training phase stopped by its budget leaves its last
#: checkpoint (every tenth of the schedule), which the row exports and evaluates, its steps counted.
FINISHED = ("ok", "cut by its budget")


@dataclass
class Phase:
    """One ``dinocache`` command of a row: how it went and how long it took."""

    name: str
    status: str = "not run"  # ok, failed, timed out, cut by its budget, not available, not run
    seconds: float = 0.0
    command: str = ""
    log: str = ""


@dataclass
class Row:
    config: str
    backbone: str
    description: str
    phases: list[Phase] = field(default_factory=list)
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.phases) and all(p.status in FINISHED for p in self.phases)


def dinocache(*args: Any) -> list[str]:
    return [sys.executable, "-m", "dinocache.cli", *map(str, args)]


def available(config: str) -> str | None:
    """Why this checkout cannot run ``config`` yet (its command or option is missing), else None."""
    probe = {"resnet18-online": (("train", "--help"), "--online"), "dino-finetune": (("finetune", "--help"), None)}
    if config not in probe:
        return None
    args, needle = probe[config]
    shown = subprocess.run(dinocache(*args), capture_output=True, text=True)
    if shown.returncode != 0 or (needle and needle not in shown.stdout):
        return f"`dinocache {args[0]}{' ' + needle if needle else ''}` does not exist in this checkout yet"
    return None


def run_phase(phase: Phase, argv: list[str], minutes: float, log: Path) -> None:
    """Run one command with a time budget; its output goes to ``log``; the process group dies on timeout."""
    phase.command = " ".join(argv[2:]).replace("dinocache.cli", "dinocache", 1)
    phase.log = str(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  [{phase.name}] {phase.command}  (budget {minutes:g} min)", flush=True)
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            phase.status = "ok" if proc.wait(timeout=minutes * 60) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            phase.status = "timed out"
    phase.seconds = time.perf_counter() - began
    if phase.status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-25:]  # the traceback, when it died of one
        print("\n".join(f"  | {line}" for line in tail), flush=True)
        print(f"  [{phase.name}] {phase.status} after {phase.seconds:.0f} s; log: {log}", flush=True)


def head_options(args: argparse.Namespace) -> list[str]:
    act = dict(HEADS[args.head], **({"optimizer_lr": args.lr} if args.lr else {}))
    return [item for key, value in act.items() for item in (f"--{key.replace('_', '-')}", value)]


def phase_commands(args: argparse.Namespace, row: Row, demos: Path, work: Path) -> dict[str, list[str]]:
    """The command of every phase of ``row`` (its folder: ``work/<config>``)."""
    out, device = work / row.config, args.device
    weights = ["--weights", args.weights, "--seed", args.weights_seed]
    chosen = args.resnet_image_size if row.backbone == "resnet18" else args.image_size
    size = ["--image-size", chosen] if chosen else []
    schedule = ["--steps", args.steps, "--batch-size", args.batch_size, "--seed", args.train_seed,
                "--eval-every", max(args.steps // 10, 1), "--save-every", max(args.steps // 10, 1),
                "--log-every", max(args.steps // 100, 1), "--device", device]
    preset = PRESET_FOR.get(row.backbone) if args.head != "tiny" else None
    policy = out / "policy.pt2"
    commands = {
        "extract": dinocache("extract", demos, "--backbone", row.backbone, "--out", out / "features.zarr",
                             *weights, *size, "--device", device, "--no-progress"),
        "train": dinocache("train", out / "features.zarr", "--out", out / "run", *schedule,
                           *(["--preset", preset] if preset else []), *head_options(args), "--no-progress"),
        "finetune": dinocache("finetune", work / "dino-cached" / "run", "--out", out / "run",
                              "--steps", args.finetune_steps, "--save-every", max(args.finetune_steps // 10, 1),
                              "--device", device, "--no-progress"),
        "export": dinocache("export", out / "run", "--out", policy, "--device", device, "--dataset", demos),
        "eval": dinocache("sim", "eval", policy, "--episodes", args.eval_episodes, "--seed", args.eval_seed,
                          "--max-steps", args.max_steps, "--out", out / "eval", "--videos", args.videos,
                          "--demos", demos, "--device", device, "--no-progress",
                          *(["--num-envs", args.num_envs] if args.num_envs else [])),
    }
    if row.config == "resnet18-online":
        commands["train"] = dinocache("train", "--online", "--backbone", "resnet18", demos, "--out", out / "run",
                                      *schedule, *weights[:2], *size, *head_options(args), "--no-progress")
    return commands


def run_row(args: argparse.Namespace, config: str, demos: Path, work: Path, done: dict[str, Row]) -> Row:
    description, phases = CONFIGS[config]
    backbone = "resnet18" if config.startswith("resnet18") else args.backbone
    row = Row(config, backbone, description, [Phase(name) for name in phases])
    print(f"[{config}] {description}", flush=True)
    row.note = available(config) or ""
    if not row.note and config == "dino-finetune" and not (done.get("dino-cached") and done["dino-cached"].ok):
        row.note = "needs the dino-cached row's run (add dino-cached to --configs; it must succeed first)"
    if row.note:
        for phase in row.phases:
            phase.status = "not available"
        print(f"  not available: {row.note}", flush=True)
        return row
    commands = phase_commands(args, row, demos, work)
    for phase in row.phases:
        run_phase(phase, commands[phase.name], args.budget[phase.name], work / "logs" / f"{config}_{phase.name}.log")
        if phase.status == "timed out" and phase.name in ("train", "finetune") and \
                (work / config / "run" / "checkpoints" / "last").is_dir():
            phase.status = "cut by its budget"
        if phase.status not in FINISHED:
            break
    row.result = collect(work / config)
    return row


def collect(out: Path) -> dict[str, Any]:
    """What the phases left behind: steps and samples trained, best validation L1, the evaluation."""
    result: dict[str, Any] = {}
    metrics = out / "run" / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        last = records[-1] if records else {}
        checkpoint = out / "run" / "checkpoints" / "last"
        if checkpoint.is_dir():  # what was exported: behind the last record when a budget cut the run short
            saved = int(checkpoint.resolve().name)
            per_step = (last.get("samples") or 0) / max(last.get("step") or 1, 1)
            records = [r for r in records if r.get("step", 0) <= saved]
            last = {"step": saved, "samples": round(saved * per_step)}
        vals = [r["val_l1"] for r in records if r.get("val_l1") is not None]
        result.update(steps=last.get("step"), samples=last.get("samples"), best_val_l1=min(vals) if vals else None)
    record = out / "run" / "run.json"
    if record.is_file():
        run = json.loads(record.read_text())
        result.update(baseline_val_l1=run.get("baseline_val_l1"), act_config=run.get("act_config"),
                      batch_size=(run.get("train") or {}).get("batch_size"))
    evaluation = out / "eval" / "results.json"
    if evaluation.is_file():
        e = json.loads(evaluation.read_text())
        result.update({key: e[key] for key in ("episodes", "successes", "success_rate", "ci95", "stages", "eval_seeds",
                                                "videos", "num_envs", "workers")})
        result["gap_to_goal"] = GOAL - e["success_rate"]
    return result


def make_demos(args: argparse.Namespace, work: Path) -> tuple[Path, Phase]:
    phase = Phase("demos")
    if args.demos is not None:
        phase.status, phase.command = "ok", f"reused {args.demos}"
        return args.demos, phase
    demos = work / "demos"
    run_phase(phase, dinocache("sim", "demos", "--episodes", args.demo_episodes, "--seed", args.demo_seed,
                               "--image-size", args.camera_size, "--out", demos, "--no-progress",
                               *(["--workers", args.workers] if args.workers else [])),
              args.budget["demos"], work / "logs" / "demos.log")
    if phase.status != "ok":
        raise SystemExit(f"the demonstrations {phase.status}; see {phase.log}")
    return demos, phase


def markdown(report: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (between markers, so a rerun replaces it)."""
    m, d = report["machine"], report["demos"]
    device = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} cores, no GPU"
    lines = [BEGIN, "## Closed loop: ALOHA transfer-cube in simulation", "",
             "Does a trained, exported policy succeed? Scripted demonstrations -> each configuration's "
             "`dinocache` commands -> `dinocache sim eval`, all run by `benchmarks/closed_loop.py` "
             "(see `docs/sim.md` for the task, the expert and the seed scheme).", "",
             f"* Date: {report['date']}. Device: {device}; torch {m['torch']}. Total {report['total_s'] / 60:.1f} min.",
             f"* Command: `{report['command']}`.",
             f"* Demonstrations: {d['kept']}/{d['attempted']} kept (seeds {d['seed']}..{d['seed'] + d['attempted'] - 1}), "
             f"{d['camera_size']} top camera, 400 steps at 50 Hz, {d['seconds'] / 60:.1f} min.",
             f"* Evaluation: {report['eval_episodes']} episodes of at most {report['max_steps']} steps on cube seeds "
             f"1000000+{report['eval_seed']}.. (disjoint from the demo seeds, checked); success = reward 4; 95 % Wilson "
             f"intervals. Schedule: {report['schedule']}. Weights: {report['weights_label']}.", "",
             "| configuration | backbone | steps (samples) | best val L1 (mean action) | success (95% CI) | to the 90% goal "
             "| touched | lifted | transfer attempted | transferred | time per phase |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        r = row["result"]
        times = ", ".join(f"{p['name']} {p['seconds'] / 60:.1f} min" + ("" if p["status"] == "ok" else f" ({p['status']})")
                          for p in row["phases"] if p["status"] != "not run")
        if "success_rate" not in r:
            failed = next((p for p in row["phases"] if p["status"] != "ok"), None)
            why = (f"**not available**: {row['note']}" if row["note"] else
                   f"**{failed['name']} {failed['status']}** (`{Path(failed['log']).name}`)" if failed else "no result")
            lines.append(f"| {row['config']}: {row['description']} | `{row['backbone']}` | | | {why} | | | | | | {times} |")
            continue
        low, high = r["ci95"]
        s = r["stages"]
        val = f"{r['best_val_l1']:.3f} ({r['baseline_val_l1']:.3f})" if r.get("best_val_l1") is not None and \
            r.get("baseline_val_l1") is not None else "-"
        lines.append(f"| {row['config']}: {row['description']} | `{row['backbone']}` | {r['steps']:,} ({r['samples']:,}) "
                     f"| {val} | **{r['successes']}/{r['episodes']} = {100 * r['success_rate']:.0f}%** "
                     f"({100 * low:.0f}-{100 * high:.0f}%) | {100 * r['gap_to_goal']:+.0f} points "
                     f"| {100 * s['touched']:.0f}% | {100 * s['lifted']:.0f}% | {100 * s['transfer_attempted']:.0f}% "
                     f"| {100 * s['transferred']:.0f}% | {times} |")
    lines += ["", f"Rollout videos of the first {report['videos']} episodes of every row: `<work>/<config>/eval/videos/`; "
              "per-episode results: `<work>/<config>/eval/results.json`; phase logs: `<work>/logs/`.",
              "\"to the 90% goal\": percentage points the success rate is short of the project's goal for the "
              "cached DINO policy (negative: above it)."]
    if report["weights"] == "random":
        lines.append("Backbones are **randomly initialised** (pretrained weights cannot be downloaded on this machine): "
                     "these figures measure the pipeline, not what the backbones are worth.")
    lines += [END, ""]
    return "\n".join(lines)


def record_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) in place of the one between those
    markers in ``path``, or at its end; so a rerun replaces its figures and leaves the commentary."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parse_budgets(spec: str | None) -> dict[str, float]:
    budgets = dict(BUDGETS)
    for part in filter(None, (spec or "").split(",")):
        name, minutes = part.split("=", 1)
        if name not in budgets:
            raise SystemExit(f"--budget: unknown phase {name!r}; phases: {', '.join(budgets)}")
        budgets[name] = float(minutes)
    return budgets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinocache_closed_loop"), help="Scratch folder.")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"Comma list of: {', '.join(CONFIGS)}.")
    parser.add_argument("--backbone", default="dinov2_vits14_reg", help="The DINO backbone of the dino-* rows.")
    parser.add_argument("--weights", default="random", help="random, auto (Hugging Face cache) or a checkpoint path.")
    parser.add_argument("--weights-seed", type=int, default=0, help="Seed of --weights random.")
    parser.add_argument("--demos", type=Path, default=None, help="Reuse a `dinocache sim demos` dataset.")
    parser.add_argument("--demo-episodes", type=int, default=50)
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--camera-size", default="240x320", help="HxW the demos are recorded (and the policy sees) at.")
    parser.add_argument("--image-size", default=None,
                        help="Input HxW of the DINO rows' backbone (default: its own).")
    parser.add_argument("--resnet-image-size", default="224x320",
                        help="Input HxW of the ResNet18 rows: a multiple of 32 (the 240x320 frames' nearest).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Training steps (default: LeRobot's 800k samples at --batch-size: 100k steps of 8).")
    parser.add_argument("--batch-size", type=int, default=FULL_SCHEDULE["batch_size"])
    parser.add_argument("--finetune-steps", type=int, default=2000, help="dino-finetune: steps on top of the cached run.")
    parser.add_argument("--lr", type=float, default=None, help="Head learning rate (default: the head's).")
    parser.add_argument("--head", choices=list(HEADS), default="default")
    parser.add_argument("--train-seed", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--videos", type=int, default=3, help="Rollout mp4s of the first episodes of every row.")
    parser.add_argument("--workers", type=int, default=None, help="sim demos workers (default: one per core).")
    parser.add_argument("--num-envs", type=int, default=None, help="sim eval environments (default: sim eval's, two per available core).")
    parser.add_argument("--budget", default=None,
                        help="Minutes per phase, e.g. train=30,eval=10 (defaults: "
                             + ", ".join(f"{k} {v:g}" for k, v in BUDGETS.items()) + ").")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available).")
    parser.add_argument("--record", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file, or 'none'.")
    parser.add_argument("--json", type=Path, default=None, help="Also copy closed_loop.json here (docs/results/).")
    parser.add_argument("--smoke", action="store_true", help="Tiny everything: checks the plumbing in minutes.")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    schedule = "given (--steps)" if args.steps else (
        f"LeRobot's 800k samples (100k steps of 8) at batch {args.batch_size}")
    args.steps = args.steps or FULL_SCHEDULE["steps"] * FULL_SCHEDULE["batch_size"] // args.batch_size
    args.budget = parse_budgets(args.budget)
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    demos, demo_phase = make_demos(args, args.work)
    made = json.loads((demos / "sim_demos.json").read_text())
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python benchmarks/closed_loop.py", *sys.argv[1:]]),
        "machine": describe_machine(args.device), "device": args.device, "weights": args.weights,
        "weights_label": ("random init (seed %d), not pretrained" % args.weights_seed if args.weights == "random"
                          else f"pretrained ({args.weights})"),
        "schedule": f"{args.steps:,} steps at batch {args.batch_size} ({schedule})",
        "demos": {"path": str(demos), "attempted": made["attempted"], "kept": made["kept"],
                  "seed": min(made["seeds"] + [f["seed"] for f in made["failed"]]), "seconds": demo_phase.seconds or made["seconds"],
                  "camera_size": "x".join(str(v) for v in next(iter(made["cameras"].values()))),
                  "workers": made.get("workers")},
        "eval_episodes": args.eval_episodes, "eval_seed": args.eval_seed, "max_steps": args.max_steps, "videos": args.videos,
        "train_seed": args.train_seed, "budgets_min": args.budget, "goal": GOAL, "rows": []}
    done: dict[str, Row] = {}
    for config in configs:
        done[config] = run_row(args, config, demos, args.work, done)
        report["rows"].append({**done[config].__dict__, "phases": [p.__dict__ for p in done[config].phases]})
        (args.work / "closed_loop.json").write_text(json.dumps(report, indent=2) + "\n")
    report["total_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2) + "\n"
    (args.work / "closed_loop.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    section = markdown(report)
    print(section)
    if args.record != "none":
        record_section(Path(args.record), section)
        print(f"recorded in {args.record}")
    exit_if_failed(failed_phases(report["rows"]))
    return report


def failed_phases(rows: list[dict[str, Any]]) -> list[str]:
    """The phases that failed or ran out of time (a training phase cut by its budget did its job)."""
    return [f"{row['config']}: {p['name']} {p['status']} (log: {p['log']})" for row in rows
            for p in row["phases"] if p["status"] in ("failed", "timed out")]


if __name__ == "__main__":
    main()
