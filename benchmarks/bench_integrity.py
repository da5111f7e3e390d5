"""What the integrity checks of issue 34 cost: loading a ViT-B policy, and decoding video.

Two measurements, each run by the current checkout and, with ``--baseline PATH`` (a checkout of the
commit before the checks, e.g. ``git worktree add /tmp/base 27da5ca``), by that code too, in child
processes that alternate (A, B, A, B...) so that background load hits both alike:

* ``load_policy`` of a ``dinov2_vitb14_reg`` policy with random weights (exported once, ``.pt2`` and
  ``.onnx``, 343 MB each) and of its run folder; the current code recomputes the files' content
  digests before loading a weight. The digest functions are also timed alone.
* decoding every frame (``iter_frames``, batches of 32) of generated H.264 480x640 LeRobot v2.1 and
  v3.0 datasets and of the real AV1 dataset when ``../shared`` has it; the current code decodes packet
  by packet, checks each packet and frame for damage and each frame's time within 1e-4 s.

Figures are the best of ``--repeat`` runs per child: wall seconds and process CPU seconds (the
steadier figure on a shared machine).

    python benchmarks/bench_integrity.py --baseline /tmp/base --json docs/results/integrity_cost_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _child import exit_if_failed, run_child
from _machine import describe_machine

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "g1_pick_bottle_3ep"


def prepare(work: Path) -> dict[str, Path]:
    """The ViT-B run and its exports, and the datasets to decode (made once, kept in ``work``)."""
    import torch

    from dinocache.datasets.synthetic import write_synthetic_dataset
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.policy.deployment.export import export_policy
    from dinocache.policy.training.train import TrainConfig, train

    torch.set_num_threads(2)
    paths = {"run": work / "run", "pt2": work / "policy.pt2", "onnx": work / "policy.onnx"}
    if not paths["run"].exists():
        small = write_synthetic_dataset(work / "small", num_episodes=3, episode_length=12)
        extract(ExtractConfig(dataset=small, out=work / "f.zarr", backbone="dinov2_vitb14_reg", weights="random",
                              image_size="28", unit_frames=8, chunk_frames=4, batch_size=4, progress=False))
        train(TrainConfig(store=work / "f.zarr", out=paths["run"], steps=1, batch_size=4, val_episodes="none",
                          act=dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=2,
                                   n_decoder_layers=1, n_vae_encoder_layers=1, latent_dim=8, chunk_size=5),
                          progress=False))
    for fmt in ("pt2", "onnx"):
        if not paths[fmt].exists():
            export_policy(paths["run"], paths[fmt], format=fmt, progress=False, verify=False)
    video = dict(num_episodes=3, episode_length=150, image_size=(480, 640), codec="h264", pix_fmt="yuv420p",
                 crf=30, gop=2)
    for fmt in ("lerobot-v2.1", "lerobot-v3.0"):
        paths[fmt] = work / fmt
        if not paths[fmt].exists():
            write_synthetic_dataset(paths[fmt], format=fmt, **video)
    if (REAL / "meta" / "info.json").is_file():
        paths["real AV1"] = REAL
    return paths


def best(fn: Any, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return {"wall_s": round(min(r[0] for r in runs), 3), "cpu_s": round(min(r[1] for r in runs), 3)}


def child(paths: dict[str, str], repeat: int) -> dict[str, Any]:
    """The measurements, with whichever dinocache this process imports."""
    import torch

    import dinocache
    from dinocache.datasets import open_dataset
    from dinocache.policy.deployment.runtime import load_policy

    torch.set_num_threads(2)
    result: dict[str, Any] = {"code": str(Path(dinocache.__file__).parents[1])}
    for name in ("pt2", "onnx", "run"):
        result[f"load_policy {name}"] = best(lambda: load_policy(paths[name]), repeat)
    try:
        from dinocache.policy.model.integrity import archive_sha256, onnx_sha256
        from dinocache.policy.deployment.metadata import load_onnx

        result["pt2 content digest"] = best(lambda: archive_sha256(Path(paths["pt2"])), repeat)
        result["onnx content digest"] = best(
            lambda: onnx_sha256(Path(paths["onnx"]), load_onnx(Path(paths["onnx"]), external_data=False)), repeat)
    except ImportError:  # the baseline has no digests
        pass
    for name in ("lerobot-v2.1", "lerobot-v3.0", "real AV1"):
        if name not in paths:
            continue
        source = open_dataset(paths[name])

        def decode() -> None:
            for episode in source.episodes:
                for camera in source.cameras:
                    for _ in source.iter_frames(episode.index, camera, batch_size=32):
                        pass

        timing = best(decode, repeat)
        frames = source.num_frames * len(source.cameras)
        result[f"decode {name}"] = {**timing, "frames": frames, "fps_per_cpu_s": round(frames / timing["cpu_s"], 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code before the checks")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinocache-bench-integrity"),
                        help="where the policy and datasets are made (kept for the next run)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating child runs per code")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement in a child (best kept)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.repeat)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    paths = {name: str(path) for name, path in prepare(args.work).items()}
    codes = {"current": Path(__file__).resolve().parents[1]}
    if args.baseline is not None:
        codes["baseline"] = args.baseline.resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    failures, inherited = [], os.environ.get("PYTHONPATH", "")
    for _ in range(args.rounds):
        for name, code in codes.items():
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), inherited]))  # the child's dinocache
            done = run_child([sys.executable, __file__, "--child", json.dumps(paths), "--repeat", str(args.repeat)])
            if done.ok:
                runs[name].append(json.loads(done.stdout))
            else:
                failures.append(f"{name}: {done.error()}")
    results = {name: {key: min((r[key] for r in rounds), key=lambda v: v["cpu_s"]) if isinstance(rounds[0][key], dict)
                      else rounds[0][key] for key in rounds[0]} for name, rounds in runs.items() if rounds}
    report = {"benchmark": "bench_integrity", "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "benchmarks/bench_integrity.py", *sys.argv[1:]]),
              "machine": describe_machine("cpu", 2), "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    exit_if_failed(failures)


if __name__ == "__main__":
    main()
