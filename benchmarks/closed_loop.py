"""Closed loop: does a policy trained on cached backbone features succeed at ALOHA transfer-cube in simulation?

One run: scripted demonstrations -> for each backbone: extract (cache) -> train the ACT head -> export
the fused policy -> evaluate it closed loop on held-out cube positions. The success rates (Wilson 95 %
intervals), reward stages, steps, times, device, weights and seeds go to ``<work>/closed_loop.json``
and, as a section between markers, into ``docs/benchmarks.md`` (``--record``).

Every backbone is frozen and cached, ``resnet18`` included: it stands in for ACT's ResNet18 baseline
until an online, fine-tuned ResNet18 ACT can be exported, and the table says so.

Schedule: ``--steps N``; else the full LeRobot ACT schedule (100k steps, batch 8) on a GPU, and on a CPU
as many steps as fit in ``--train-minutes`` per backbone (measured by a short probe run first).

Weights: pretrained weights cannot be downloaded on the machines this was first run on, so the
default is ``--weights random`` (seeded random initialisation) and every figure is labelled with it.
With real weights:

    python benchmarks/closed_loop.py --weights auto                # from the Hugging Face cache
    python benchmarks/closed_loop.py --weights dinov2_vits14_reg=/ckpt/dinov2_vits14_reg.pth,resnet18=/ckpt/resnet18.pth

Other examples:

    # what docs/benchmarks.md records for a 2-core CPU: a narrower head, ViT-S at 112 px (an 8x8 grid,
    # close to ResNet18's 7x7 at 224), about 22 min of training per backbone
    python benchmarks/closed_loop.py --head small --image-size dinov2_vits14_reg=112x112,resnet18=224x224 --train-minutes 22
    python benchmarks/closed_loop.py --demos /tmp/sim50/demos      # reuse demos already made
    python benchmarks/closed_loop.py --smoke --work /tmp/cl_smoke --record none   # plumbing check, minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BACKBONES = ("dinov2_vits14_reg", "resnet18")
#: Head presets for backbones that have one (``dinocache train --preset``); others get LeRobot's ACT defaults.
PRESET_FOR = {"dinov2_vits14_reg": "dinov2-reg", "dinov2_vits14": "dinov2", "dinov3_vits16": "dinov3-small"}
FULL_SCHEDULE_STEPS = 100_000  # LeRobot's ACT on ALOHA sim
BEGIN, END = "<!-- closed-loop:begin -->", "<!-- closed-loop:end -->"
SMOKE = dict(demo_episodes=2, eval_episodes=2, steps=5, max_steps=40, camera_size="84x112", head="tiny")
#: ``--head``: ACT overrides on top of LeRobot's defaults (and the backbone's preset). ``small`` keeps
#: ACT's chunk of 100 and its layer structure but a narrower model, so a CPU hour buys thousands of
#: steps instead of hundreds; ``default`` is LeRobot's ACT as is (the GPU schedule).
HEADS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": dict(dim_model=256, dim_feedforward=1024, n_encoder_layers=2, n_vae_encoder_layers=2,
                  optimizer_lr=1e-4),
    "tiny": dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                 n_vae_encoder_layers=1, latent_dim=8, chunk_size=10, n_action_steps=10),
}


def per_backbone(option: str, spec: str | None, backbones: list[str]) -> dict[str, str | None]:
    """One value for every backbone, or ``name=value,name=value`` (e.g. weights files, image sizes)."""
    if spec is None or "=" not in spec:
        return {name: spec for name in backbones}
    given = dict(part.split("=", 1) for part in spec.split(","))
    missing = [name for name in backbones if name not in given]
    if missing:
        raise SystemExit(f"{option} gives no value for {', '.join(missing)}")
    return given


def weights_label(weights: str, seed: int) -> str:
    if weights == "random":
        return f"random init (seed {seed}), not pretrained"
    return "pretrained (Hugging Face cache)" if weights == "auto" else f"pretrained ({Path(weights).name})"


def choose_steps(args: argparse.Namespace, store: Path, work: Path, act: dict[str, Any], preset: str | None,
                 device: str) -> tuple[int, str]:
    """Training steps and why: given, the full schedule on a GPU, or what fits the CPU time budget."""
    from dinocache.policy.train import TrainConfig, train

    if args.steps:
        return args.steps, "--steps"
    if device.startswith("cuda"):
        return FULL_SCHEDULE_STEPS, "full LeRobot ACT schedule"
    probe = train(TrainConfig(store=store, out=work / "probe", steps=args.probe_steps, batch_size=args.batch_size,
                              preset=preset, act=act, val_episodes=None, save_every=args.probe_steps,
                              log_every=args.probe_steps, device=device, progress=False))
    shutil.rmtree(work / "probe")
    rate = args.probe_steps / probe.seconds
    steps = max(100, int(rate * args.train_minutes * 60) // 100 * 100)
    return steps, f"{args.train_minutes:g} min CPU budget at {rate:.1f} steps/s (probe)"


def run_backbone(args: argparse.Namespace, backbone: str, weights: str, image_size: str | None, demos: Path,
                 work: Path, device: str) -> dict[str, Any]:
    from dinocache.encoders.preprocess import parse_image_size
    from dinocache.encoders.registry import get_backbone_spec
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.policy.export import export_policy
    from dinocache.policy.train import TrainConfig, train
    from dinocache.sim.evaluate import evaluate

    out = work / backbone
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"backbone": backbone, "weights": weights,
                              "weights_label": weights_label(weights, args.weights_seed),
                              "training": "frozen backbone, cached features"}
    timer = time.perf_counter()
    summary = extract(ExtractConfig(dataset=demos, out=out / "features.zarr", backbone=backbone, weights=weights,
                                    seed=args.weights_seed, image_size=image_size, device=device,
                                    progress=not args.no_progress))
    result.update(extract_s=time.perf_counter() - timer, frames=summary.frames, extract_fps=summary.fps,
                  image_size=image_size or "x".join(map(str, parse_image_size(get_backbone_spec(backbone).default_image_size))))

    act = dict(HEADS[args.head])
    if args.lr:
        act["optimizer_lr"] = args.lr
    preset = None if args.head == "tiny" else PRESET_FOR.get(backbone)
    steps, why = choose_steps(args, out / "features.zarr", out, act, preset, device)
    timer = time.perf_counter()
    trained = train(TrainConfig(store=out / "features.zarr", out=out / "run", steps=steps, batch_size=args.batch_size,
                                preset=preset, act=act, val_episodes="0.1", eval_every=max(steps // 10, 1),
                                save_every=steps, log_every=max(steps // 100, 1), seed=args.train_seed,
                                device=device, progress=not args.no_progress))
    run_record = json.loads((out / "run" / "run.json").read_text())
    result.update(train_s=time.perf_counter() - timer, steps=steps, steps_reason=why, batch_size=args.batch_size,
                  head=args.head, preset=preset, act_config=run_record.get("act_config"), best_val_l1=trained.best_val_l1,
                  baseline_val_l1=trained.baseline_val_l1)

    timer = time.perf_counter()
    exported = export_policy(out / "run", out / "policy.pt2", format="pt2", device=device, dataset=demos,
                             progress=not args.no_progress)
    result["export_s"] = time.perf_counter() - timer
    result["policy"] = str(exported.path)

    evaluation = evaluate(exported.path, episodes=args.eval_episodes, seed=args.eval_seed, max_steps=args.max_steps,
                          out=out / "eval", videos=args.videos, device=device, demos=demos,
                          progress=not args.no_progress)
    record = json.loads((out / "eval" / "results.json").read_text())
    result.update(eval_s=evaluation.seconds, success_rate=record["success_rate"], successes=record["successes"],
                  episodes=record["episodes"], ci95=record["ci95"], stages=record["stages"],
                  eval_results=str(out / "eval" / "results.json"), videos=record["videos"])
    print(f"[{backbone}] {evaluation.format()}", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (between markers, so a rerun replaces it)."""
    m, d = report["machine"], report["demos"]
    device = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} cores, no GPU"
    lines = [BEGIN, "## Closed loop: ALOHA transfer-cube in simulation", "",
             "Does a policy trained on cached frozen features actually succeed? Scripted demonstrations -> "
             "`extract` -> `train` -> `export` -> `dinocache sim eval`, all measured by `benchmarks/closed_loop.py` "
             "(see `docs/sim.md` for the task, the expert and the seed scheme).", "",
             f"* Date: {report['date']}. Device: {device}; torch {m['torch']}.",
             f"* Command: `{report['command']}`; total {report['total_s'] / 60:.0f} min.",
             f"* Demonstrations: {d['kept']}/{d['attempted']} scripted episodes succeeded and were kept "
             f"(demo seeds {d['seed']}..{d['seed'] + d['attempted'] - 1}), {d['cameras']} camera(s) at "
             f"{d['camera_size']}, 400 steps at 50 Hz; made in {d['seconds'] / 60:.1f} min.",
             f"* Evaluation: {report['eval_episodes']} episodes of at most {report['max_steps']} steps on cube seeds "
             f"1000000+{report['eval_seed']}.. (disjoint from the demo seeds, checked); success = reward 4 (the left "
             f"gripper holds the cube off the table); 95 % Wilson intervals. Train seed {report['train_seed']}.",
             "", "| backbone | weights | training | extract | head | steps (batch) | best val L1 (mean action) | train time "
             "| success (95% CI) | touched | lifted | transferred | eval time |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        low, high = r["ci95"]
        s = r["stages"]
        lines.append(f"| `{r['backbone']}` ({r['image_size']}) | {r['weights_label']} | {r['training']} "
                     f"| {r['extract_s'] / 60:.1f} min "
                     f"| {r['head']} (dim {r['act_config']['dim_model']}, chunk {r['act_config']['chunk_size']}) "
                     f"| {r['steps']:,} ({r['batch_size']}) "
                     f"| {r['best_val_l1']:.3f} ({r['baseline_val_l1']:.3f}) "
                     f"| {r['train_s'] / 60:.1f} min | **{r['successes']}/{r['episodes']} = {100 * r['success_rate']:.0f}%** "
                     f"({100 * low:.0f}-{100 * high:.0f}%) | {100 * s['touched']:.0f}% | {100 * s['lifted']:.0f}% | "
                     f"{100 * s['transferred']:.0f}% | {r['eval_s'] / 60:.1f} min |")
    lines += ["", "Steps: " + "; ".join(f"`{r['backbone']}` {r['steps_reason']}" for r in report["results"]) + ".",
              "`resnet18` here is ACT's backbone *frozen and cached* like the DINO one, not ACT's fine-tuned "
              "ResNet18: the online, fine-tuned baseline cannot be exported and evaluated yet."]
    if any(r["weights"] == "random" for r in report["results"]):
        lines.append("Backbones are **randomly initialised** (pretrained weights cannot be downloaded on this "
                     "machine): these figures measure the pipeline, not what DINO features are worth. Run the same "
                     "script with `--weights` to measure that.")
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinocache_closed_loop"), help="Scratch folder (must be new).")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    parser.add_argument("--weights", default="random", help="random, auto, a path, or name=path,name=path.")
    parser.add_argument("--weights-seed", type=int, default=0, help="Seed of --weights random.")
    parser.add_argument("--demos", type=Path, default=None, help="Reuse a `dinocache sim demos` dataset.")
    parser.add_argument("--demo-episodes", type=int, default=50)
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--camera-size", default="240x320", help="HxW the demos are recorded (and the policy sees) at.")
    parser.add_argument("--image-size", default=None,
                        help="Backbone input HxW, or name=HxW,... per backbone (default: each backbone's, 224).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default: see the docstring).")
    parser.add_argument("--train-minutes", type=float, default=30.0,
                        help="CPU training budget per backbone (the two together: about an hour).")
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="Head learning rate (default: the head's).")
    parser.add_argument("--head", choices=list(HEADS), default="default",
                        help="default: LeRobot's ACT head; small: narrower, for CPU budgets; tiny: smoke runs.")
    parser.add_argument("--train-seed", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--record", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file, or 'none'.")
    parser.add_argument("--smoke", action="store_true", help="Tiny everything: checks the plumbing in minutes.")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)

    import torch

    from dinocache.encoders.preprocess import parse_image_size
    from dinocache.sim.demos import DEMOS_RECORD, generate_demos

    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbones = args.backbones.split(",")
    weights = per_backbone("--weights", args.weights, backbones)
    image_sizes = per_backbone("--image-size", args.image_size, backbones)
    args.work.mkdir(parents=True, exist_ok=True)
    demos = args.demos
    if demos is None:
        demos = args.work / "demos"
        print(generate_demos(demos, episodes=args.demo_episodes, seed=args.demo_seed,
                             image_size=parse_image_size(args.camera_size), progress=not args.no_progress).format(),
              flush=True)
    made = json.loads((demos / DEMOS_RECORD).read_text())
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python benchmarks/closed_loop.py", *sys.argv[1:]]),
        "machine": describe_machine(device),
        "demos": {"path": str(demos), "attempted": made["attempted"], "kept": made["kept"],
                  "seed": min(made["seeds"] + [f["seed"] for f in made["failed"]]), "seconds": made["seconds"],
                  "cameras": ",".join(made["cameras"]),
                  "camera_size": "x".join(str(v) for v in next(iter(made["cameras"].values())))},
        "eval_episodes": args.eval_episodes, "eval_seed": args.eval_seed, "max_steps": args.max_steps,
        "train_seed": args.train_seed, "results": []}
    for backbone in backbones:
        report["results"].append(run_backbone(args, backbone, weights[backbone], image_sizes[backbone], demos, args.work, device))
        (args.work / "closed_loop.json").write_text(json.dumps(report, indent=2) + "\n")
    report["total_s"] = time.perf_counter() - started
    (args.work / "closed_loop.json").write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    print(section)
    if args.record != "none":
        record_section(Path(args.record), section)
        print(f"recorded in {args.record}")
    return report


if __name__ == "__main__":
    main()
