"""Does fusing cost anything? The exported policy's control step vs. its backbone and head alone.

For each backbone, a run is made synthetically (no dataset, no training: a default-size ACT head,
``dim_model=512``, 4 encoder layers, chunk 100, initialised as training would, behind random-weight
backbone provenance; one 480x640 camera, a 14-d state and action), exported with
``dinocache export`` (``--skip-verify``: there is no store to check against) and timed at batch 1:

  * fused: one *query* step of the exported ``.pt2`` through ``PolicyRuntime.select_action`` (checks,
    uint8 -> preprocessing -> backbone -> head -> un-normalised chunk);
  * backbone alone: the eager ``FrozenBackbone`` (its preprocessing included) on the same frame;
  * head alone: the eager ``ACTHead`` + normaliser on features of the backbone's grid shape.

Overhead = fused query p50 / (backbone p50 + head p50) - 1 (target <= 10 %). The three are timed in
turn, one call of each per step, so that load from other processes hits them alike. Then
``dinocache bench-policy`` runs on the exported file in a fresh process: its query / queued step
figures and its peak memory (RSS high-water) are what a robot process that loads the policy sees.

    python benchmarks/bench_policy.py                                   # both backbones, CPU
    python benchmarks/bench_policy.py --backbones dinov2_vits14_reg --steps 10
    python benchmarks/bench_policy.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _child import exit_if_failed, run_child
from _machine import describe_machine
from dinocache.encoders.backbone import create_backbone
from dinocache.keys import camera_key
from dinocache.pipeline.store import SourceRecord, StoreRecord
from dinocache.policy.deployment.bench import latencies_ms, random_observation
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.runtime import load_policy
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.checkpoint import PolicySpec, load_head
from dinocache.policy.model.config import ACTION, OBS_STATE, ACTConfig, ACTInputs
from dinocache.policy.model.normalize import Normalizer
from dinocache.policy.training.checkpointing import capture_rng, save_checkpoint

CAMERA = camera_key("top")
HEIGHT, WIDTH, DIM = 480, 640, 14


def make_run(folder: Path, backbone_name: str, image_size: int) -> Path:
    """A run folder with one checkpoint: a default ACT head (fresh init) on random-weight backbone provenance."""
    backbone = create_backbone(backbone_name, weights="random", image_size=image_size)
    h, w = backbone.grid_size
    record = StoreRecord(num_frames=0, cameras=(CAMERA,), backbone=backbone.record(), precision="fp32",
                         camera_sizes={CAMERA: (HEIGHT, WIDTH)}, fps=50.0,
                         source=SourceRecord(format="synthetic", fingerprint="benchmark"),
                         lowdim_names={OBS_STATE: [f"joint_{i}" for i in range(DIM)],
                                       ACTION: [f"joint_{i}" for i in range(DIM)]})
    config = ACTConfig()
    inputs = ACTInputs(cameras=[("top", backbone.embed_dim, h, w)], state_dim=DIM, action_dim=DIM)
    rng = np.random.default_rng(0)
    stats = {key: {"mean": rng.normal(size=DIM).tolist(), "std": rng.uniform(0.5, 2, DIM).tolist()}
             for key in (OBS_STATE, ACTION)}
    torch.manual_seed(0)
    head = ACTHead(config, inputs)
    spec = PolicySpec(config, inputs, stats, "(none: benchmark)", record, {"top": CAMERA})
    save_checkpoint(folder, 0, head, Normalizer(stats), spec, torch.optim.AdamW(head.parameters()),
                    [capture_rng()], sampler={}, extra={})
    return folder


class ChildFailed(RuntimeError):
    """A child process of this benchmark exited non-zero (its stderr was shown as it ran)."""


def percentiles(values: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def measure(backbone_name: str, image_size: int, device: str, steps: int, work: Path, compile: bool,
            dtype: str) -> dict:
    """Export a synthetic run to ``work/<backbone>.pt2`` and time fused / backbone / head, interleaved.

    With ``compile`` the file carries AOTInductor kernels; the plain program inside the same file is then
    timed too (``fused_program``), in the same rounds, so the compiled form's gain is read side by side.
    """
    run = make_run(work / backbone_name, backbone_name, image_size)
    t0 = time.perf_counter()
    exported = export_policy(run, work / f"{backbone_name}.pt2", device=device, dtype=dtype, verify=False,
                             progress=False, compile=compile)
    export_s = time.perf_counter() - t0
    runtime = load_policy(exported.path, device=device, n_action_steps=100, temporal_ensemble_coeff=None)
    observation = random_observation(runtime.metadata)

    target = torch.device(device)
    amp = None if dtype == "float32" else getattr(torch, dtype)
    backbone = create_backbone(backbone_name, weights="random", image_size=image_size, device=device, amp_dtype=amp)
    frame = torch.from_numpy(observation[CAMERA])[None].to(target)
    head, normalizer, _ = load_head(run, device=device)
    h, w = backbone.grid_size
    features = {ACTInputs.feature_key("top"): torch.randn(1, backbone.embed_dim, h, w, device=target),
                OBS_STATE: torch.randn(1, DIM, device=target)}

    def head_step() -> None:
        with torch.no_grad(), torch.autocast(target.type, dtype=amp or torch.float32, enabled=amp is not None):
            normalizer.unnormalize(ACTION, head(features)[0].float()).cpu()

    kinds = {"fused": (lambda: runtime.select_action(observation), runtime.reset),
             "backbone": (lambda: backbone(frame), None), "head": (head_step, None)}
    if compile:
        plain = load_policy(exported.path, device=device, n_action_steps=100, temporal_ensemble_coeff=None,
                            compiled=False, cuda_graph=False)
        kinds["fused_program"] = (lambda: plain.select_action(observation), plain.reset)
    for step, before in kinds.values():  # warm-up (the CUDA graph is captured here)
        latencies_ms(step, 1, 2, before=before, sync=target)
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(steps):  # one of each in turn, so that background load hits all of them alike
        for name, (step, before) in kinds.items():
            samples[name].extend(latencies_ms(step, 1, 0, before=before, sync=target))
    result = {name: percentiles(np.asarray(values)) for name, values in samples.items()}
    parts = result["backbone"]["p50"] + result["head"]["p50"]
    result.update(backbone_name=backbone_name, overhead=result["fused"]["p50"] / parts - 1, export_s=export_s,
                  file_mib=exported.path.stat().st_size / 2**20, threads=torch.get_num_threads(), steps=steps,
                  runtime=runtime.metadata["runtime"], dtype=dtype,
                  compile_failed=exported.metadata["export"].get("compile_failed"),
                  compile_failed_log=exported.metadata["export"].get("compile_failed_log"),
                  cuda_graph_failed=(exported.metadata["export"].get("compiled") or {}).get("cuda_graph_failed"),
                  cuda_graph_failed_log=(exported.metadata["export"].get("compiled") or {}).get("cuda_graph_failed_log"))
    return result


def bench_in_fresh_process(policy: Path, device: str, steps: int, threads: int | None) -> tuple[str, dict]:
    """``dinocache bench-policy`` on the exported file in a process of its own (what a robot process holds)."""
    command = [sys.executable, "-m", "dinocache.cli", "bench-policy", str(policy), "--device", device,
               "--steps", str(steps), *(["--threads", str(threads)] if threads else [])]
    done = run_child(command)
    if not done.ok:
        raise ChildFailed(f"dinocache bench-policy {policy.name}: {done.error()}")
    text = done.stdout
    numbers = [float(x) for x in re.findall(r"p(?:50|99) +([\d.]+) ms", text)]
    memory = float(re.search(r"peak memory (\d+) MiB", text).group(1))
    start = re.search(r"load ([\d.]+) s, first query ([\d.]+) ms", text)
    kernels = re.search(r"GPU kernels +([\d.]+) ms", text)
    return text, {"query": numbers[0:2], "queued": numbers[2:4], "peak_mib": memory,
                  "load_s": float(start.group(1)), "first_query_ms": float(start.group(2)),
                  "kernel_ms": float(kernels.group(1)) if kernels else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="dinov2_vits14_reg,dinov2_vitb14_reg")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 [default: bfloat16 on CUDA, else float32]")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="export with AOTInductor kernels (and time the plain program beside them) [default: on CUDA]")
    parser.add_argument("--steps", type=int, default=60, help="timed calls of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.compile = cuda if args.compile is None else args.compile
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one backbone, in a process of its own; prints one JSON line
        print(json.dumps(measure(args.child, args.image_size, args.device, args.steps, args.work, args.compile,
                                 args.dtype)))
        return

    began = time.perf_counter()
    print(f"# torch {torch.__version__}, {platform.machine()}, device {args.device}, {torch.get_num_threads()} "
          f"thread(s), batch 1, one {HEIGHT}x{WIDTH} camera at {args.image_size} px, {args.dtype}, "
          f"{'compiled (AOTInductor)' if args.compile else 'torch.export program'}, {args.steps} steps of each kind")
    rows, outputs, failures, results = [], [], [], []

    def record() -> None:
        """Write what is measured so far: a run cut short by its time limit keeps the backbones it finished."""
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_policy.py " + " ".join(sys.argv[1:]),
                "machine": describe_machine(args.device, args.threads),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "total_s": time.perf_counter() - began, "results": results, "failures": failures}, indent=1))

    with tempfile.TemporaryDirectory(prefix="dinocache-bench-policy-") as work:
        for name in args.backbones.split(","):
            child = [sys.executable, __file__, "--child", name, "--work", work, "--image-size", str(args.image_size),
                     "--device", args.device, "--steps", str(args.steps), "--dtype", args.dtype,
                     "--compile" if args.compile else "--no-compile",
                     *(["--threads", str(args.threads)] if args.threads else [])]
            done = run_child(child)
            if not done.ok:
                failures.append(f"{name}: {done.error()}")
                record()
                continue
            r = json.loads(done.stdout.splitlines()[-1])
            try:
                text, fresh = bench_in_fresh_process(Path(work) / f"{name}.pt2", args.device, args.steps, args.threads)
            except ChildFailed as err:
                failures.append(str(err))
                record()
                continue
            results.append({**r, "bench_policy": fresh})
            if r.get("compile_failed"):  # export fell back to the plain program: the row times that
                failures.append(f"{name}: no compiled form ({r['compile_failed']}); its row times the plain program")
                print(f"  {name}: the compiled check's last stderr lines:\n{r.get('compile_failed_log') or '-'}",
                      file=sys.stderr, flush=True)
            if r.get("cuda_graph_failed"):  # compiled kernels kept, launched without a graph: the row times that
                failures.append(f"{name}: compiled kernels without a CUDA graph ({r['cuda_graph_failed']})")
                print(f"  {name}: the graph check's last stderr lines:\n{r.get('cuda_graph_failed_log') or '-'}",
                      file=sys.stderr, flush=True)
            outputs.append(f"$ dinocache bench-policy {name}.pt2 --steps {args.steps}\n{text}")
            program = r.get("fused_program")
            rows.append(f"| {name} | {r['fused']['p50']:.1f} / {r['fused']['p99']:.1f} | "
                        + (f"{program['p50']:.1f} / {program['p99']:.1f} | " if program else "")
                        + f"{r['backbone']['p50']:.1f} / {r['backbone']['p99']:.1f} | {r['head']['p50']:.1f} / "
                        f"{r['head']['p99']:.1f} | {100 * r['overhead']:+.1f} % | {fresh['query'][0]:.1f} / "
                        f"{fresh['query'][1]:.1f} | {fresh['queued'][0]:.2f} / {fresh['queued'][1]:.2f} | "
                        + (f"{fresh['kernel_ms']:.2f} | " if cuda else "")
                        + f"{fresh['load_s']:.1f} s / {fresh['first_query_ms']:.0f} ms | {fresh['peak_mib']:.0f} MiB | "
                        f"{r['file_mib']:.0f} MiB |")
            print(f"  done {name} (export {r['export_s']:.0f} s): {rows[-1]}", file=sys.stderr, flush=True)
            record()
    columns = ["backbone", f"fused query p50 / p99 (ms), {'compiled' if args.compile else 'program'}"]
    columns += ["fused query, plain program"] if args.compile else []
    columns += ["backbone alone p50 / p99", "head alone p50 / p99", "overhead (p50)", "bench-policy query p50 / p99",
                "bench-policy queued p50 / p99"]
    columns += ["GPU kernels per query (ms)"] if cuda else []
    columns += ["load / first query", "peak memory", ".pt2 size"]
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    print("\n".join(rows))
    print("\n" + "\n".join(outputs))
    record()
    exit_if_failed(failures)


if __name__ == "__main__":
    main()
