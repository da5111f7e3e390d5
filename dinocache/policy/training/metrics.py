"""What a run reports: one metrics line per record (``metrics.jsonl``, the progress bar, trackers) and loss curves.

Metrics are a log, the checkpoints are the run's state: a line that does not parse is skipped, and
a resumed run drops the lines written after its last checkpoint so that the file reads as one run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dinocache.atomic import temporary_name
from dinocache.policy.training.processes import Processes
from dinocache.policy.training.tracking import Tracker

__all__ = ["Meter", "MetricsLog", "metric_records", "truncate_metrics", "plot_metrics", "DATA_FRACTION_TARGET"]


#: Data loading should stay below this share of the step time; above it the run says so once.
DATA_FRACTION_TARGET = 0.05


class Meter:
    """Wall clock, data wait and steps since the last record; :meth:`record` turns them into one metrics line.

    Steps per second are steps over the wall time between records, taken after :meth:`TrainStep.take`
    has waited for the device: honest on CUDA, where launching a step returns before it ran.
    Validation and checkpoint time are left out (the clock restarts after them).
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.began, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def record(self, step: int, sums: list[float], wall_s: float, val_l1: float | None, samples: int,
               procs: Processes) -> dict[str, Any]:
        loss, l1, kld, grad_norm, steps, data_s, wall_s = procs.sum([*sums, self.steps, self.data_s, wall_s])
        n = max(steps, 1.0)
        return {
            "step": step,
            "loss": loss / n,
            "l1": l1 / n,
            "kld": kld / n,
            "grad_norm": grad_norm / n,
            "val_l1": val_l1,
            "steps_per_s": n / max(wall_s, 1e-9),
            "data_fraction": data_s / max(wall_s, 1e-9),
            "samples": samples,
        }


def metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that does not parse (the half line of a run killed while
    appending, or damage) is left out: metrics are a log, the checkpoints are the run's state."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records a crashed run wrote after its last checkpoint, so the resumed file reads as one run."""
    if path.is_file():
        records = [record for record in metric_records(path) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))


def plot_metrics(metrics_path: Path, out: Path, baseline: float | None) -> None:
    """Loss curves (train loss, train L1, validation L1, the mean-action baseline) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no display needed

    records = metric_records(metrics_path)
    if not records:
        return
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="train loss (L1 + kl_weight * KL)")
    ax.plot(steps, [r["l1"] for r in records], label="train L1")
    val = [(r["step"], r["val_l1"]) for r in records if r["val_l1"] is not None]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation L1")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="validation L1 of the mean action")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("normalised action units")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    tmp = temporary_name(out)  # whole or not at all
    try:
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


class MetricsLog:
    """Rank 0's output: ``metrics.jsonl``, the progress bar, the experiment trackers asked for, and one
    warning if data loading is slow."""

    def __init__(self, path: Path, bar: tqdm, batches: str, trackers: list[Tracker]) -> None:
        self.path, self.bar, self.batches, self.trackers = path, bar, batches, trackers
        self.last: dict[str, Any] | None = None
        self.warned = False

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def write(self, record: dict[str, Any], val_l1: float | None) -> None:
        with open(self.path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", val_l1="-" if val_l1 is None else f"{val_l1:.4f}",
                             steps_s=f"{record['steps_per_s']:.1f}", data=f"{100 * record['data_fraction']:.1f}%")
        # The first record includes the warm-up (first batch, first streaming window): not judged.
        if self.last is not None and record["data_fraction"] > DATA_FRACTION_TARGET and not self.warned:
            self.warned = True
            hint = {"features streamed": "features streamed: raise --memory-budget to hold them in RAM",
                    "frames decoded": "frames decoded: more CPU cores, or a dataset whose episodes fit the cache, "
                                      "decode faster"}.get(self.batches, self.batches)
            tqdm.write(f"dinocache: data loading takes {100 * record['data_fraction']:.0f}% of the step time "
                       f"({hint})")
        self.last = record
