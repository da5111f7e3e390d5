"""Pictures of the recorded benchmark results, for readers who would rather look than read tables.

Reads the JSON the benchmarks write to ``docs/results/`` and draws, into ``docs/figures/``:

* ``training_speed.png``: training steps per second of every configuration ``compare_backbones.py``
  ran (ACT's ResNet18 online, frozen DINO online, cached DINO), one panel per device, each cached bar
  labelled with its speed-up over the same backbone online;
* ``train_loop_vs_ceiling.png``: ``bench_train_step.py``'s real loop against the step's ceiling, in
  samples per second, per batch size and device, with the 0.9 target;
* ``extraction_limits.png``: ``bench_extract.py``'s latest run of each setting: decode, bare forward
  and write capacity beside the limit and the pipeline, on a log scale (they span 3 decades).

Each panel names its device, date and command source, so a picture is never read as another
device's figure. Rerun after any benchmark that updates ``docs/results/``::

    python benchmarks/plot_results.py            # docs/results -> docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: nothing global, no display needed
from matplotlib.patches import Patch

ROOT = Path(__file__).resolve().parents[1]

#: Bar colours by how the backbone meets the training step.
COLOURS = {"online, fine-tuned (ACT)": "#8c8c8c", "online, frozen": "#e08a2c", "cached": "#2c6fbb"}


def load(results: Path, name: str) -> dict[str, Any] | None:
    """``docs/results/<name>.json``, or None where that benchmark has not run on that device."""
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def device_label(machine: dict[str, Any]) -> str:
    """The device a figure was measured on, in words: the GPU's name, or the CPU and its cores."""
    if machine.get("gpu"):
        return f"{machine['gpu']} (torch {machine['torch']})"
    threads = machine.get("torch_threads")
    return f"CPU: {machine['cpu']}, {machine['cpu_count']} cores" + (f", {threads} torch thread(s)" if threads else "")


def plot_training_speed(runs: list[dict[str, Any]], out: Path) -> None:
    """One panel per device: steps/s (per CPU-second on a CPU, where the other core's load would
    otherwise show) of every row of ``compare_backbones.py``."""
    figure = Figure(figsize=(7 * len(runs), 0.45 * max(len(r["rows"]) for r in runs) + 2.2), layout="constrained")
    for ax, run in zip(figure.subplots(1, len(runs), squeeze=False)[0], runs):
        on_gpu = bool(run["machine"].get("gpu"))
        key = "steps_per_s" if on_gpu else "steps_per_cpu_s"
        rows = run["rows"][::-1]  # first row on top
        values = [r[key] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[COLOURS.get(r["training"], "#444444") for r in rows])
        ax.set_yticks(range(len(rows)), [f"{r['backbone']} ({r['input']})" for r in rows], fontsize=8)
        for bar, row in zip(bars, rows):
            label = f"{bar.get_width():.3g}"
            if row.get("speedup_vs_online"):
                label += f"  ({row['speedup_vs_online']:.1f}x online)"
            ax.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
        targets = [(i, 10 * r[key] / r["speedup_vs_online"]) for i, r in enumerate(rows)
                   if on_gpu and r.get("speedup_vs_online")]
        for i, target in targets:  # the GPU target: cached at >= 10x the same backbone online
            ax.plot([target, target], [i - 0.45, i + 0.45], color="black", linestyle="--", linewidth=1)
        if targets:
            ax.annotate("10x online (target)", (targets[-1][1], targets[-1][0] + 0.45), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=7)
        ax.set_xlim(0, max(values + [t for _, t in targets]) * 1.35)
        ax.set_xlabel("training steps per second" if on_gpu else "training steps per CPU-second")
        ax.set_title(f"{device_label(run['machine'])}\n{run['date']}, batch {run['settings']['batch_size']}",
                     fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(color=colour, label=kind) for kind, colour in COLOURS.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(COLOURS), fontsize=8)
    figure.suptitle("ACT training step, LeRobot's default head: backbone online vs. features cached "
                    "(compare_backbones.py)", fontsize=10)
    figure.savefig(out, dpi=110)


def plot_loop_vs_ceiling(runs: list[dict[str, Any]], out: Path) -> None:
    """Per device, per batch size: samples/s of the step alone (ceiling) and of the real loop (per
    CPU-second on a CPU, as docs/benchmarks.md compares them there)."""
    figure = Figure(figsize=(5.5 * len(runs), 4.2), layout="constrained")
    for ax, run in zip(figure.subplots(1, len(runs), squeeze=False)[0], runs):
        on_gpu = bool(run["machine"].get("gpu"))
        key = "steps_per_s" if on_gpu else "steps_per_cpu_s"
        rows = [r for r in run["rows"] if "ceiling" in r and "loop" in r]
        x = range(len(rows))
        ceiling = [r["ceiling"][key] * r["batch_size"] for r in rows]
        loop = [r["loop"][key] * r["batch_size"] for r in rows]
        ax.bar([i - 0.2 for i in x], ceiling, width=0.4, color="#b9cfe8", label="ceiling: the step alone")
        bars = ax.bar([i + 0.2 for i in x], loop, width=0.4, color="#2c6fbb", label="dinocache train (real loop)")
        for bar, top, bottom in zip(bars, loop, ceiling):
            ax.annotate(f"{top / bottom:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(list(x), [f"batch {r['batch_size']}" for r in rows])
        ax.set_ylim(0, max(ceiling + loop) * 1.3)
        ax.set_ylabel("samples per second" if on_gpu else "samples per CPU-second")
        ax.set_title(f"{device_label(run['machine'])}\n{run['date']} (labels: loop / ceiling, target >= 0.9)",
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    figure.suptitle("The training loop against its step's ceiling (bench_train_step.py)", fontsize=10)
    figure.savefig(out, dpi=110)


def latest_extraction_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last run of each (device, dataset, backbone, image size), oldest setting first."""
    latest: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        latest[(run["machine"]["device"], run["dataset"], run["backbone"], run["image_size"])] = run
    return list(latest.values())


def plot_extraction(runs: list[dict[str, Any]], out: Path) -> None:
    """Per setting: each stage's capacity alone, the limit they set and what the pipeline ran at."""
    stages = [("decode_fps", "decode alone", "#e08a2c"), ("bare_forward_fps", "bare forward", "#7a5195"),
              ("write_fps", "write alone", "#58a05c"), ("limit_fps", "limit", "#b9cfe8"),
              ("pipeline_fps", "pipeline (extract)", "#2c6fbb")]
    figure = Figure(figsize=(max(7.0, 2.3 * len(runs)), 5.2), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(stages)
    for s, (key, label, colour) in enumerate(stages):
        xs = [i - 0.4 + (s + 0.5) * width for i, run in enumerate(runs) if run.get(key)]
        ax.bar(xs, [run[key] for run in runs if run.get(key)], width=width, color=colour, label=label)
    for i, run in enumerate(runs):  # above the pipeline's bar (the last of each group)
        ax.annotate(f"{run['ratio']:.2f} of limit,\n{run.get('limited_by', '?')}-bound",
                    (i + 0.4 - width / 2, run["pipeline_fps"]), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=7)
    names = []
    for run in runs:
        where = run["machine"].get("gpu") or f"{run['machine']['cpu_count']}-core CPU"
        data = "real AV1 640x480" if "g1_pick_bottle" in run["dataset"] else "generated H.264 480x640"
        names.append(f"{where}\n{run['backbone']} {run['image_size']} px\n{data}\n{run['precision']}, {run['date']}")
    ax.set_xticks(range(len(runs)), names, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("camera frames per second")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    figure.legend(fontsize=8, ncols=len(stages), loc="outside lower center")
    figure.suptitle("Stage one against its limit (bench_extract.py; limit = min(decode, forward) on a GPU, "
                    "1/(1/decode + 1/forward) on a CPU)", fontsize=9)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    devices = ("cuda", "cpu")  # the GPU first: that is where users train

    compare = [r for r in (load(args.results, f"compare_backbones_{d}") for d in devices) if r]
    if compare:
        plot_training_speed(compare, args.out / "training_speed.png")
    steps = [r for r in (load(args.results, f"bench_train_step_{d}") for d in devices) if r]
    if steps:
        plot_loop_vs_ceiling(steps, args.out / "train_loop_vs_ceiling.png")
    extraction = [run for d in devices for run in (load(args.results, f"bench_extract_{d}") or {"runs": []})["runs"]]
    if extraction:
        plot_extraction(latest_extraction_runs(extraction), args.out / "extraction_limits.png")
    for path in sorted(args.out.glob("*.png")):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main()
