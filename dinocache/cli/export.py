"""Stage three's commands: `export` (the fused live policy) and `bench-policy` (what one control step costs)."""

from __future__ import annotations

from pathlib import Path

import click

from dinocache.policy.deployment.formats import COMPUTE_DTYPES, FORMATS, LEROBOT_FORMAT


@click.command("export", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The policy file to write: NAME.pt2 or NAME.onnx (a name without suffix gets the format's); "
                   "with --format lerobot, a new folder.")
@click.option("--format", "fmt", type=click.Choice([*FORMATS, LEROBOT_FORMAT]), default=None,
              help="pt2 (torch.export program), onnx, or lerobot (a LeRobot pretrained-model folder for lerobot-eval / "
                   "lerobot-rollout --policy.path; needs LeRobot and the plugin, see docs/lerobot.md) "
                   "[default: from --out's suffix, else pt2].")
@click.option("--checkpoint", default="last", show_default=True, help="last, best, or a training step.")
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default="float32", show_default=True,
              help="Compute precision of backbone and head: autocast in a .pt2, weights cast in ONNX; half precision "
                   "is meant for CUDA.")
@click.option("--device", default="cpu", show_default=True, help="Device to trace and check on: cpu, cuda, cuda:1 ...")
@click.option("--weights", default=None, type=click.Path(path_type=Path),
              help="Backbone weights file [default: the recorded one, else the Hugging Face cache]; checked "
                   "against the store's recorded hashes.")
@click.option("--dataset", default=None, type=click.Path(path_type=Path),
              help="Source dataset for the check's frames [default: the recorded path, else the frames the store keeps].")
@click.option("--store", default=None, type=click.Path(path_type=Path),
              help="The feature store the head was trained on [default: the recorded path].")
@click.option("--skip-verify", is_flag=True, help="Export without the parity check (recorded as unverified).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Also compile the policy with AOTInductor for --device into the .pt2, so the robot process "
                   "loads fused kernels (the plain program stays inside as the fallback) [default: on CUDA, torch >= 2.8].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export(run: Path, out: Path, fmt: str | None, checkpoint: str, dtype: str, device: str,
           weights: Path | None, dataset: Path | None, store: Path | None, skip_verify: bool,
           compile_: bool | None, no_progress: bool) -> None:
    """Fuse backbone and trained head of RUN into one live policy file (stage three).

    The backbone is rebuilt from the run's recorded provenance and its weights checked against the
    recorded hashes; the fused policy is checked against the head on the cached features (on frames
    of the source dataset, or those the store keeps) before anything is written.

    \b
    Examples:
      dinocache export runs/act1 --out policy.pt2
      dinocache export runs/act1 --out policy.onnx --checkpoint best
      dinocache export runs/act1 --out policy.pt2 --device cuda --dtype bfloat16      # compiled for this GPU
      dinocache export runs/act1 --out policy.pt2 --compile                           # compiled for this CPU
      dinocache export runs/act1 --out policy.pt2 --weights ~/ckpt/dinov2_vits14_reg4_pretrain.pth
      dinocache export runs/act1 --format lerobot --out policies/act1                 # for lerobot-eval
    """
    import warnings

    from dinocache.policy.deployment.compiled import CompiledPolicyFallback
    from dinocache.policy.deployment.export import export_policy

    fmt = fmt or ("onnx" if out.suffix == ".onnx" else "pt2")  # a mismatching suffix is refused below
    if fmt == LEROBOT_FORMAT:
        from dinocache.errors import DinocacheError
        from dinocache.policy.deployment.lerobot_export import export_lerobot

        if dtype != "float32" or compile_:
            raise DinocacheError("--format lerobot writes the float32 policy LeRobot runs (its --policy.device and "
                                 "--policy.use_amp choose how): drop --dtype and --compile")
        click.echo(export_lerobot(run, out, checkpoint=checkpoint, device=device, weights=weights, dataset=dataset,
                                  store=store, verify=not skip_verify).format_text())
        return
    with warnings.catch_warnings():  # a compiled form that crashed is said in the summary's "compiled" line
        warnings.simplefilter("ignore", CompiledPolicyFallback)
        result = export_policy(run, out, format=fmt, checkpoint=checkpoint, dtype=dtype, device=device,
                               weights=weights, dataset=dataset, progress=not no_progress, store=store,
                               verify=not skip_verify, compile=compile_)
    click.echo(result.format_text())


@click.command("bench-policy", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("policy", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--steps", default=50, type=click.IntRange(min=1), show_default=True, help="Timed steps of each kind.")
@click.option("--warmup", default=3, type=click.IntRange(min=0), show_default=True, help="Untimed steps first.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch intra-op threads on CPU [default: torch's].")
def bench_policy(policy: Path, device: str, steps: int, warmup: int, threads: int | None) -> None:
    """Per-step latency (p50, p99) at batch 1 of a query step and a queued step, start-up, peak memory.

    POLICY is a .pt2 / .onnx from `dinocache export`, or a run folder (eager).

    \b
    Examples:
      dinocache bench-policy policy.pt2
      dinocache bench-policy policy.pt2 --device cuda --steps 200
    """
    import torch

    from dinocache.policy.deployment.bench import bench_policy as run_bench

    if threads is not None:
        torch.set_num_threads(threads)
    click.echo(run_bench(policy, device=device, steps=steps, warmup=warmup).format())
