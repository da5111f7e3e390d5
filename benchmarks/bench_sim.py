"""Simulator throughput: scripted demonstrations and closed-loop evaluation, one process against N workers.

Side by side in one run, at the default image size (one 240x320 camera, LeRobot v2.1 with H.264):

* **demos**: ``generate_demos(workers=1)`` (``sim demos --workers 1``: one episode after the other in
  this process) against ``workers=N`` (spawned workers make the episodes, this process writes them
  in seed order, encoding the videos in background threads in both runs); the two datasets' episode
  tables must be identical;
* **eval**: ``run_episodes(num_envs=1, workers=0)`` against ``num_envs=N, workers=N`` (environments
  stepped and rendered in N processes, the policy queried once per step for all of them) and against
  ``num_envs=2N, workers=N, waves=2`` (two halves taking turns: the policy answers one while the
  other steps); the per-episode outcomes (seed, best reward, steps) must be identical.

The policy is :class:`~dinocache.sim.replay.PlanReplay` (the expert's joint plans, computed before
the clock starts, every episode a success after ~300 steps), so the evaluation rows time the
simulator alone: stepping, rendering and moving frames between processes. ``--policy`` evaluates an
exported ``.pt2`` instead (``evaluate()``, its backbone on this process's device).

Wall time is what a user waits; the load average before and after each phase says how much of the
machine other jobs had. Before each part, N pure-Python processes are timed against one
(:func:`parallel_capacity`): the speedup the machine itself offered N processes at that moment, which
no program can beat (N on an idle machine with N free cores). CPU seconds (this process, its threads
and its workers) show what the workers cost on top (start-up, moving frames).

    python benchmarks/bench_sim.py --workers 2 --episodes 8 --json docs/results/bench_sim_cpu.json --record docs/benchmarks.md
    python benchmarks/bench_sim.py --workers 16 --episodes 32 --eval-episodes 32    # a 16-core host
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing.forkserver
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import describe_machine
from closed_loop import record_section

BEGIN, END = "<!-- bench-sim:begin -->", "<!-- bench-sim:end -->"


def cpu_seconds() -> float:
    """CPU time of this process, of its children that have ended, and of the fork server that starts the
    simulator's workers, with its ended children (the workers: their time is the server's to collect)."""
    own = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if server is None:
        return own
    fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
    return own + sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


_SPIN = "import time; t = time.perf_counter(); x = sum(range(30_000_000)); print(time.perf_counter() - t)"


def parallel_capacity(workers: int) -> float:
    """How much more pure-Python work ``workers`` processes get done at once than one alone, right now.

    On an idle machine with that many free cores it is ``workers``; on a shared one (or vCPUs that are
    SMT siblings on the host) it can be far less, and no program can beat it. Measured before each part.
    """
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(proc.communicate()[0]) for proc in procs)

    return workers * run(1) / run(workers)


def timed(label: str, run) -> tuple[Any, dict[str, float]]:
    """Run ``run()``; its result, wall and CPU seconds, and the 1-minute load average before and after."""
    load, cpu = os.getloadavg()[0], cpu_seconds()
    began = time.perf_counter()
    result = run()
    seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
    print(f"{label}: {seconds:.1f} s, {cpu:.1f} CPU-s (load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    return result, {"seconds": seconds, "cpu_seconds": cpu, "load_before": round(load, 2),
                    "load_after": round(os.getloadavg()[0], 2)}


def bench_demos(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dinocache.sim.demos import generate_demos

    rows, tables = {}, {}
    capacity = parallel_capacity(args.workers)
    for workers in (1, args.workers):
        out = work / f"demos_{workers}"
        summary, rows[workers] = timed(f"demos, {workers} worker(s)", lambda: generate_demos(
            out, episodes=args.episodes, seed=args.seed, image_size=args.size, workers=workers, progress=False))
        rows[workers]["kept"] = summary.kept
        tables[workers] = sorted(p.read_bytes() for p in out.rglob("*.parquet"))
    return {"episodes": args.episodes, "serial": rows[1], "parallel": rows[args.workers], "capacity": capacity,
            "speedup": rows[1]["seconds"] / rows[args.workers]["seconds"],
            "episode_tables_identical": tables[1] == tables[args.workers]}


def bench_eval(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dinocache.sim.env import eval_seeds
    from dinocache.sim.evaluate import evaluate, run_episodes
    from dinocache.sim.expert import plan_joint_actions
    from dinocache.sim.replay import PlanReplay

    seeds = eval_seeds(args.seed, args.eval_episodes)
    plans = [] if args.policy else [plan_joint_actions(seed) for seed in seeds]
    rows, outcomes = {}, {}
    capacity = parallel_capacity(args.workers)
    n = args.workers
    setups = {"serial": (1, 0, 1), "parallel": (n, n, 1), "overlapped": (2 * n, n, 2)}
    for name, (num_envs, workers, waves) in setups.items():
        if args.policy:
            def run():
                return evaluate(args.policy, episodes=args.eval_episodes, seed=args.seed, out=work / f"eval_{name}",
                                videos=0, device=args.device, num_envs=num_envs, workers=workers, waves=waves,
                                progress=False).episodes
        else:
            def run():
                return run_episodes(PlanReplay(plans, {"top": args.size}), seeds, num_envs=num_envs, workers=workers,
                                    waves=waves, progress=False)
        episodes, rows[name] = timed(f"eval, {num_envs} env(s) in {workers} worker(s), {waves} wave(s)", run)
        rows[name].update(num_envs=num_envs, workers=workers, waves=waves, steps=sum(e.steps for e in episodes),
                          successes=sum(e.success for e in episodes))
        rows[name]["steps_per_s"] = rows[name]["steps"] / rows[name]["seconds"]
        outcomes[name] = [(e.seed, e.max_reward, e.steps) for e in episodes]
    return {"episodes": args.eval_episodes, "policy": args.policy or "PlanReplay (the expert's joint plans)",
            "capacity": capacity, **rows,
            "speedup": rows["serial"]["seconds"] / rows["parallel"]["seconds"],
            "speedup_overlapped": rows["serial"]["seconds"] / rows["overlapped"]["seconds"],
            "outcomes_identical": outcomes["serial"] == outcomes["parallel"] == outcomes["overlapped"]}


def markdown(report: dict[str, Any]) -> str:
    m, d, e = report["machine"], report["demos"], report["eval"]
    n = report["workers"]
    same = "per-episode seed, reward, steps identical" if e["outcomes_identical"] else "**outcomes differ**"

    def row(what: str, part: dict[str, Any], check: str, parallel: str = "parallel", speedup: str = "speedup") -> str:
        s, p = part["serial"], part[parallel]
        return (f"| {what} | {part['episodes']} | {s['seconds']:.1f} s ({s['cpu_seconds']:.1f}) "
                f"| {p['seconds']:.1f} s ({p['cpu_seconds']:.1f}) | **{part[speedup]:.2f}x** "
                f"| {part['capacity']:.2f}x | {s['load_before']:.1f} / {p['load_before']:.1f} | {check} |")

    return "\n".join([
        BEGIN, "## Simulator: parallel demonstrations and vectorised evaluation (`benchmarks/bench_sim.py`)", "",
        f"* Date: {report['date']}. Machine: {m['cpu']}, {m['cpu_count']} cores, no GPU; {report['note']}",
        f"* Command: `{report['command']}`.",
        f"* One {report['image_size']} camera (the default), 400-step episodes. Demos: LeRobot v2.1 with H.264, "
        f"encoded in background threads of the writing process (the serial run's too). Eval policy: {e['policy']}, "
        "so the eval rows time the simulator alone.", "",
        f"| what | episodes | one process: wall (CPU-s) | {n} workers: wall (CPU-s) | speedup (wall) "
        f"| machine's {n}-process capacity then | load at start (serial / {n} workers) | same result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        row("`sim demos`", d, "episode tables byte-identical" if d["episode_tables_identical"] else "**tables differ**"),
        row(f"`sim eval` ({n} envs, queried together)", e, same),
        row(f"`sim eval` ({2 * n} envs in 2 waves: the policy answers one while the other steps)", e, same,
            "overlapped", "speedup_overlapped"),
        "", END, ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=8, help="Demonstrations made by each of the two runs.")
    parser.add_argument("--eval-episodes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", default="240x320", help="HxW of the one (top) camera.")
    parser.add_argument("--policy", type=Path, default=None, help="An exported .pt2 to evaluate instead of PlanReplay.")
    parser.add_argument("--device", default="cpu", help="Where --policy runs.")
    parser.add_argument("--parts", default="demos,eval")
    parser.add_argument("--note", default="", help="A word on the machine's state (e.g. shared with other jobs).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--record", default=None, help="Markdown file to put the section in (between markers).")
    args = parser.parse_args(argv)

    from dinocache.encoders.image_size import parse_image_size

    args.size = parse_image_size(args.image_size)
    work = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    report: dict[str, Any] = {
        "benchmark": "bench_sim", "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/bench_sim.py", *sys.argv[1:]]), "machine": describe_machine(args.device),
        "workers": args.workers, "image_size": args.image_size, "note": args.note}
    try:
        parts = args.parts.split(",")
        if "demos" in parts:
            report["demos"] = bench_demos(args, work)
        if "eval" in parts:
            report["eval"] = bench_eval(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["mujoco_gl"] = os.environ.get("MUJOCO_GL")  # as dinocache.sim set it (egl) unless given
    print(json.dumps({k: report[k] for k in ("demos", "eval") if k in report}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.record and {"demos", "eval"} <= report.keys():
        record_section(Path(args.record), markdown(report), BEGIN, END)
        print(f"recorded in {args.record}")
    return report


if __name__ == "__main__":
    main()
