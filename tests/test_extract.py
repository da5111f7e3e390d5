"""Stage one end to end on real files: generated video datasets, real Zarr stores, real subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from click.testing import CliRunner

from dinocache.cli import main
from dinocache.encoders.backbone import create_backbone
from dinocache.pipeline.extract import ExtractConfig, extract
from dinocache.datasets import open_dataset
from dinocache.pipeline.store import FeatureStore

from _devices import DEVICES

BACKBONE = "dinov2_vits14"
SIZE = "56"


def cli(*args: str):
    """Run the command in-process (a real click invocation, without paying a Python start-up)."""
    return CliRunner().invoke(main, list(args))


def config(dataset: Path, out: Path, **overrides) -> ExtractConfig:
    """The in-process twin of :func:`extract_args`."""
    options = dict(backbone=BACKBONE, weights="random", image_size=SIZE, unit_frames=8, chunk_frames=4,
                   batch_size=4, progress=False)
    return ExtractConfig(dataset=dataset, out=out, **{**options, **overrides})


def extract_args(dataset: Path, out: Path, *extra: str, backbone: str = BACKBONE) -> list[str]:
    return ["extract", str(dataset), "--backbone", backbone, "--weights", "random", "--image-size", SIZE,
            "--out", str(out), "--unit-frames", "8", "--chunk-frames", "4", "--batch-size", "4",
            "--no-progress", *extra]


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_features_match_direct_forward(store_path: Path, dataset: Path, episodes: list[int] | None = None,
                                         bf16: bool = False) -> None:
    """The store's features equal a float32 forward of the decoded frames: to float16 rounding, or with
    ``bf16`` (a bfloat16-autocast extraction) within 2 % mean relative error."""
    store = FeatureStore(store_path)
    assert store.done_units().all()
    backbone = create_backbone(BACKBONE, weights="random", image_size=int(SIZE), seed=0)
    source = open_dataset(dataset)
    for index, start, length, _ in store.episodes():
        for camera in store.cameras:
            with torch.no_grad():
                grid, cls = backbone(torch.from_numpy(source.read_frames(index, camera)))
            pairs = [(store.patch(camera, slice(start, start + length)), grid.permute(0, 2, 3, 1).numpy()),
                     (store.cls(camera, slice(start, start + length)), cls.numpy())]
            for got, want in pairs:
                got = got.astype(np.float32)
                if bf16:
                    assert np.abs(got - want).mean() < 0.02 * np.abs(want).mean(), (index, camera)
                else:
                    np.testing.assert_allclose(got, want, rtol=4e-3, atol=4e-3)


@pytest.fixture(scope="module")
def reference(small_dataset: Path, tmp_path_factory) -> SimpleNamespace:
    """``small_dataset`` extracted in one process with :func:`config`'s options: the store other ways of
    extracting it must equal (read-only; a test that changes it works on a copy)."""
    path = tmp_path_factory.mktemp("reference") / "f.zarr"
    return SimpleNamespace(path=path, summary=extract(config(small_dataset, path)))


def test_store_equals_backbone_on_decoded_frames(small_dataset: Path, reference: SimpleNamespace, tmp_path: Path):
    assert reference.summary.frames == 42 and reference.summary.units == 6
    assert_features_match_direct_forward(reference.path, small_dataset)
    shutil.copytree(reference.path, tmp_path / "f.zarr")
    store = FeatureStore(tmp_path / "f.zarr")
    source = open_dataset(small_dataset)
    np.testing.assert_array_equal(store.read("action"), np.concatenate([source.read_lowdim(e.index)["action"]
                                                                        for e in source.episodes]))
    assert store.record.to_dict()["weights"]["source"] == "random"
    assert store.record.to_dict()["source"]["fingerprint"] == source.fingerprint()
    # idempotent: a second run does nothing and changes no byte
    before = store_files(tmp_path / "f.zarr")
    again = extract(config(small_dataset, tmp_path / "f.zarr"))
    assert again.units == 0 and again.units_skipped == 6
    assert store_files(tmp_path / "f.zarr") == before


@pytest.mark.parametrize("device", DEVICES)
def test_host_buffers_are_allocated_once_and_reused(small_dataset: Path, tmp_path: Path, device: str, monkeypatch):
    """Stage one hands its batches to the device through at most two host buffers per frame shape
    (pinned on CUDA: one being filled while the other's copy is in flight), allocated once and reused
    for every batch, not one per batch."""
    from dinocache.pipeline import units as units_module

    handed: list[torch.Tensor] = []
    original = units_module._Forward.slot

    def slot(self, frame_shape):
        taken = original(self, frame_shape)
        handed.append(taken.tensor)
        return taken

    monkeypatch.setattr(units_module._Forward, "slot", slot)
    summary = extract(config(small_dataset, tmp_path / "f.zarr", device=device, batch_size=4))
    assert summary.frames == 42 and len(handed) >= 2 * 42 // 4  # two cameras, a batch of 4 at a time
    assert len({t.data_ptr() for t in handed}) <= 2
    assert all(t.is_pinned() == (device == "cuda") for t in handed)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_extraction_on_the_device_matches_float32(small_dataset: Path, tmp_path: Path, device: str):
    """The CUDA path (pinned host buffers, asynchronous copies, bf16 autocast) and its CPU twin (the
    same autocast on the CPU): the store is complete, says what precision made it, and its features
    are the float32 forward's within bfloat16's rounding."""
    summary = extract(config(small_dataset, tmp_path / "f.zarr", device=device, precision="bf16"))
    assert summary.frames == 42
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.done_units().all() and store.record.to_dict()["precision"] == "bf16"
    assert_features_match_direct_forward(tmp_path / "f.zarr", small_dataset, bf16=True)


def zero_tail_of_mdat(file: Path, fraction: float) -> None:
    """Zero the last ``fraction`` of an mp4's media data (a bad copy), keeping its size and its index."""
    data = bytearray(file.read_bytes())
    start = data.find(b"mdat") + 8
    end = data.find(b"moov") if data.find(b"moov") > start else len(data)
    data[end - int((end - start) * fraction):end] = bytes(int((end - start) * fraction))
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("mistake", ["path", "camera", "episodes", "out"])
def test_a_mistake_in_the_command_is_said_before_any_weights_are_looked_for(tmp_path: Path, monkeypatch, mistake):
    """The cheap checks come first: with the default --weights auto and no network, a mistyped path,
    camera or episode, or an --out that is not a store, is named at once (not after a weights lookup,
    nor as a weights problem), and nothing is created."""
    from dinocache.datasets.synthetic import write_synthetic_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.delenv("DINOCACHE_WEIGHTS", raising=False)
    dataset = write_synthetic_dataset(tmp_path / "data", num_episodes=2, episode_length=4, image_size=(28, 28),
                                      cameras=("top",), seed=0)
    out = tmp_path / "f.zarr"
    args, said = {"path": ([str(tmp_path / "nope")], "nope: no such file or directory"),
                  "camera": ([str(dataset), "--cameras", "nocam"], "camera 'nocam' does not exist"),
                  "episodes": ([str(dataset), "--episodes", "7"], "episode(s) [7] are not in the dataset"),
                  "out": ([str(dataset)], "not a feature store")}[mistake]
    if mistake == "out":
        (out / "notes").mkdir(parents=True)
    result = cli("extract", *args, "--out", str(out))
    assert result.exit_code == 2 and said in result.output, result.output
    assert "weights" not in result.output
    assert sorted(p.name for p in out.rglob("*")) == (["notes"] if mistake == "out" else []) and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".f.zarr")]


def test_a_mistyped_dataset_path_is_said_without_importing_torch(tmp_path: Path):
    script = ("import sys\nfrom click.testing import CliRunner\nfrom dinocache.cli import main\n"
              f"result = CliRunner().invoke(main, ['extract', {str(tmp_path / 'nope')!r}, '--out', 'f.zarr'])\n"
              "print(result.exit_code, 'torch' in sys.modules, result.output.strip())")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.startswith("2 False ") and "nope: no such file or directory" in shown, shown


def _kill_midway(args: list[str], store: Path, at_least: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "dinocache.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    marks = store / "units" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if marks.is_dir() and len(list(marks.iterdir())) >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory) -> Path:
    from dinocache.datasets.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("long") / "long", format="lerobot-v2.1", num_episodes=4,
                                   episode_length=60, image_size=(48, 64), cameras=("top",), seed=3)


@pytest.fixture(scope="module")
def long_reference(long_dataset: Path, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of an uninterrupted single-process extraction of ``long_dataset`` with one decode worker."""
    out = tmp_path_factory.mktemp("reference") / "clean.zarr"
    extract(config(long_dataset, out, decode_workers=1))
    return store_files(out)


def test_sigkill_then_rerun_is_byte_identical_to_clean_run(long_dataset: Path, long_reference, tmp_path: Path):
    """Killed while four workers decode four episodes at once, resumed with the default workers: the
    bytes of one uninterrupted single-worker run."""
    resumed = tmp_path / "resumed.zarr"
    _kill_midway(extract_args(long_dataset, resumed, "--decode-workers", "4"), resumed, at_least=2)
    done = FeatureStore(resumed).done_units()
    assert 0 < done.sum() < len(done), "the kill must land part-way"
    rerun = cli(*extract_args(long_dataset, resumed))
    assert rerun.exit_code == 0, rerun.output
    assert f"({int(done.sum())} already done)" in rerun.stdout
    assert store_files(resumed) == long_reference


def test_a_kill_between_write_and_rename_leaves_nothing_after_the_rerun(long_dataset: Path, long_reference,
                                                                         tmp_path: Path):
    """Zarr writes each file to ``<file>.<uuid>.partial`` and renames it: a kill in between leaves the
    temporary. The unit is not done, so the rerun redoes it, and removes what the kill left."""
    out = tmp_path / "f.zarr"
    extract(config(long_dataset, out, decode_workers=1))
    camera = FeatureStore(out).cameras[0]
    (out / "units" / "done" / "c" / "2").unlink()  # killed before unit 2's marker was renamed into place
    orphans = [out / "units" / "done" / "c" / "2.0123456789abcdef0123456789abcdef.partial",
               out / "cameras" / camera / "patch" / "c" / "2" / "0" / "0" / "0.fedcba9876543210fedcba9876543210.partial"]
    for orphan in orphans:
        orphan.write_bytes(b"half a write")
    assert cli(*extract_args(long_dataset, out)).exit_code == 0
    assert not any(orphan.exists() for orphan in orphans)
    assert store_files(out) == long_reference


def test_decode_workers_do_not_change_a_byte(small_dataset: Path, tmp_path: Path):
    """Two cameras, episodes straddling units, a batch size that divides neither: one decode worker
    and four give the same store, byte for byte, and the summary says which stage set the pace."""
    one = extract(config(small_dataset, tmp_path / "one.zarr", decode_workers=1, batch_size=3))
    four = extract(config(small_dataset, tmp_path / "four.zarr", decode_workers=4, batch_size=3))
    assert (one.decode_workers, four.decode_workers) == (1, 4) and one.frames == four.frames == 42
    assert store_files(tmp_path / "one.zarr") == store_files(tmp_path / "four.zarr")
    assert_features_match_direct_forward(tmp_path / "four.zarr", small_dataset)
    assert four.limit in ("decode", "forward", "write") and f"limited by  {four.limit}" in four.format()


def test_a_decode_error_in_one_worker_stops_the_run_keeping_what_was_written(tmp_path: Path):
    """Episode 3's video is corrupt while other workers decode the episodes around it: the run stops
    with one line naming the file and the episode, every unit before the episode is written, and
    once the file is repaired a rerun keeps them and ends as a clean run would. (Ten episodes of 16
    frames: the store's 8 verification frames, decoded when it is created, miss episode 3.)"""
    from _datasets import v21_video

    from dinocache.datasets.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "data", format="lerobot-v2.1", num_episodes=10, episode_length=16,
                                      image_size=(48, 64), cameras=("top",), seed=5)
    extract(config(dataset, tmp_path / "clean.zarr", decode_workers=1))
    video = v21_video(dataset, 3)
    original = video.read_bytes()
    zero_tail_of_mdat(video, 0.3)  # same size: the dataset's fingerprint does not change
    out = tmp_path / "f.zarr"
    failed = cli(*extract_args(dataset, out, "--decode-workers", "4"))
    assert failed.exit_code == 2, failed.output
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and str(video) in lines[0] and "episode 3: " in lines[0], failed.stderr
    done = FeatureStore(out).done_units()
    assert done[:6].all() and not done.all(), done  # units 0-5 hold rows 0-47: episodes 0-2
    video.write_bytes(original)
    rerun = cli(*extract_args(dataset, out))
    assert rerun.exit_code == 0, rerun.output
    assert f"({int(done.sum())} already done)" in rerun.stdout
    assert store_files(out) == store_files(tmp_path / "clean.zarr")


def test_slurm_array_recipe_fills_one_store_equal_to_single_process(long_dataset: Path, long_reference,
                                                                      tmp_path: Path):
    """``workflows/extract_slurm_array.sbatch`` as SLURM runs it for ``--array=3-4``: two tasks at once,
    each its own ``--shard`` from the array variables, racing to create the store."""
    sharded = tmp_path / "sharded.zarr"
    recipe = Path(__file__).resolve().parents[1] / "workflows" / "extract_slurm_array.sbatch"
    options = extract_args(long_dataset, sharded, "--device", "cpu")[4:]  # after the dataset and the backbone
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # its `dinocache`
    procs = [subprocess.Popen(["bash", str(recipe), str(long_dataset), str(sharded), BACKBONE, *options],
                              env=dict(os.environ, PATH=path, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="3",
                                       SLURM_ARRAY_TASK_COUNT="2", HF_HUB_OFFLINE="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in (3, 4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(re.search(r"\(shard (\d/\d)\)", out).group(1) for out, _ in outs) == ["0/2", "1/2"], outs
    assert store_files(sharded) == long_reference


ONE_NODE_SLURM = {
    # Runs each job script at once, in its own process group, as a one-node SLURM would start it; the
    # script is copied first, as dask-jobqueue deletes it when sbatch returns.
    "sbatch": """#!/usr/bin/env bash
set -e
job="$SLURM_SHIM/job.$RANDOM.sh"; cp "$1" "$job"; echo "$*" >> "$SLURM_SHIM/submitted"
setsid bash "$job" > "$job.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
""",
    "scancel": """#!/usr/bin/env bash
echo "$1" >> "$SLURM_SHIM/cancelled"; kill -TERM -- "-$1" 2>/dev/null || true
""",
}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the SLURM shim uses setsid")
def test_dask_jobqueue_recipe_fills_the_store_and_cancels_its_jobs(small_dataset: Path, reference: SimpleNamespace,
                                                                   tmp_path: Path):
    """``workflows/extract_dask_jobqueue.py`` as users run it, its two SLURM jobs started by a one-node
    sbatch: the store equals the single-process one, and every job is cancelled at the end. ``--wait``
    is too short for the jobs to start: the run begins with the first worker and says so."""
    pytest.importorskip("dask_jobqueue")
    shim = tmp_path / "slurm"
    shim.mkdir()
    for name, script in ONE_NODE_SLURM.items():
        (shim / name).write_text(script)
        (shim / name).chmod(0o755)
    jobs = tmp_path / "jobs.zarr"
    recipe = Path(__file__).resolve().parents[1] / "workflows" / "extract_dask_jobqueue.py"
    args = extract_args(small_dataset, jobs)
    at = args.index("--out")  # the recipe's own argument
    options = args[2:at] + args[at + 2:]
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", SLURM_SHIM=str(shim))
    done = subprocess.run([sys.executable, str(recipe), str(small_dataset), str(jobs), "--jobs", "2", "--gpus", "0",
                           "--cores", "1", "--memory", "4GB", "--wait", "0.01", "--", *options],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr + "".join(p.read_text() for p in shim.glob("*.log"))
    assert re.search(r"frames\s+42 in 6 units", done.stdout), done.stdout
    assert re.search(r"^[01] of 2 jobs started within 0.01 s; starting with those$", done.stderr, re.M), done.stderr
    assert store_files(jobs) == store_files(reference.path)
    submitted = (shim / "submitted").read_text().splitlines()
    assert len(submitted) == 2
    script = next(shim.glob("job.*.sh")).read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "--gres" not in script and "HF_HUB_OFFLINE=1" in script
    cancelled = (shim / "cancelled").read_text().split()
    assert len(cancelled) == 2
    deadline = time.monotonic() + 30
    while any(_alive(int(pid)) for pid in cancelled) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(int(pid)) for pid in cancelled), "a worker job outlived the recipe"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dask_local_cluster_equals_single_process(small_dataset: Path, reference: SimpleNamespace, tmp_path: Path):
    from dinocache.pipeline.distributed import extract_with_dask

    dasked = tmp_path / "dask.zarr"
    summary = extract_with_dask(config(small_dataset, dasked), n_workers=2)
    assert summary.frames == 42
    assert store_files(dasked) == store_files(reference.path)


def test_other_backbone_into_same_store_is_refused(small_dataset: Path, tmp_path: Path):
    out = tmp_path / "f.zarr"
    extract(config(small_dataset, out, episodes="0:1"))
    before = store_files(out)
    refused = cli(*extract_args(small_dataset, out, "--episodes", "0:1", backbone="dinov2_vits14_reg"))
    assert refused.exit_code == 2
    assert "dinov2_vits14_reg" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert store_files(out) == before, "a refused extraction must not touch the store"
    assert cli(*extract_args(small_dataset, out, "--episodes", "0:1", "--overwrite",
                             backbone="dinov2_vits14_reg")).exit_code == 0


def test_inspect_reports_completeness_and_draws_pca(reference: SimpleNamespace, tmp_path: Path):
    out = tmp_path / "f.zarr"
    shutil.copytree(reference.path, out)  # its units are unmarked below
    report = cli("inspect", str(out), "--pca", str(tmp_path / "pca.png"))
    assert report.exit_code == 0, report.output
    assert "6/6 units" in report.stdout and "no NaN" in report.stdout
    assert (tmp_path / "pca.png").stat().st_size > 10_000
    from dinocache.pipeline.inspect import pca_figure

    figure = pca_figure(FeatureStore(out), num_frames=3)
    title = figure._suptitle.get_text()
    assert f"{BACKBONE} patch features" in title and "RANDOM weights (seed 0)" in title, title
    frames, pca = figure.axes[:3], figure.axes[3:]
    assert frames[0].get_images()[0].get_array().shape == (48, 64, 3)  # the camera's frame, as recorded
    assert [ax.get_aspect() for ax in pca] == [pytest.approx(48 / 64)] * 3  # a square 4x4 grid drawn at 3:4
    # an unfinished store is reported as such and fails the check
    (out / "units" / "done" / "c" / "3").unlink()
    camera = FeatureStore(out).cameras[0]
    shard = out / "cameras" / camera / "patch" / "c" / "3" / "0" / "0" / "0"
    shard.unlink()
    report = cli("inspect", str(out))
    assert report.exit_code == 1 and "5/6 units" in report.stdout
    assert f"camera {camera!r}: 8 frame(s) contain NaN" in report.stdout


def test_real_dataset_features_and_kill_resume(real_dataset: Path, tmp_path: Path):
    """A real AV1 episode (the shortest), killed mid-way and resumed: the units written after the restart
    begin with a seek into the video, and every frame's features still equal a forward of the frames
    decoded in one pass from the start (a seek landing one frame off would not). That a resumed store
    is the uninterrupted one byte for byte is tested on generated video above."""
    resumed = tmp_path / "resumed.zarr"
    args = [*extract_args(real_dataset, resumed, "--episodes", "1:2"), "--unit-frames", "32"]
    _kill_midway(args, resumed, at_least=2)
    assert 2 <= int(FeatureStore(resumed).done_units().sum()) < FeatureStore(resumed).done_units().size
    assert cli(*args).exit_code == 0
    assert_features_match_direct_forward(resumed, real_dataset)


def test_decoders_share_the_cores_among_the_streams_that_run_together(monkeypatch):
    import dinocache.pipeline.decoding as stage_one

    monkeypatch.setattr(stage_one, "available_cores", lambda: 16)
    assert [stage_one.decoder_threads(w, s) for w, s in [(16, 100), (4, 100), (16, 3), (1, 1), (32, 100)]] == \
        [1, 4, 5, 16, 1]


def test_dask_work_is_cut_so_that_workers_joining_later_find_tasks():
    from dinocache.pipeline.distributed import MAX_UNITS_PER_TASK, plan_tasks

    pending = [u for u in range(240) if u % 7]  # 205 units, some already done
    for workers in (1, 2, 64):
        blocks = plan_tasks(pending, workers)
        assert [u for block in blocks for u in block] == pending
        assert max(map(len, blocks)) <= MAX_UNITS_PER_TASK and max(map(len, blocks)) - min(map(len, blocks)) <= 1
        assert len(blocks) >= min(len(pending), 4 * workers)
    assert len(plan_tasks(pending, 1)) == 26 and plan_tasks([], 3) == [] and plan_tasks([5], 3) == [[5]]
