"""`dinocache train` end to end on real stores: learning, overfitting, exact resume, DDP.

That the cached loss equals the loss with the backbone run online is in tests/test_online.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dinocache.cli import main
from dinocache.cli.train import train as train_command
from dinocache.errors import DinocacheError, StoreError
from dinocache.policy.model.act import ACTHead, act_optimizer
from dinocache.policy.model.checkpoint import load_head
from dinocache.policy.model.config import ACTConfig
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import episode_rows, open_training_store
from dinocache.policy.training.run import resolve_act_config
from dinocache.policy.training.step import GRAPH_WARMUP, TrainStep
from dinocache.policy.training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import make_store  # noqa: E402
from _devices import DEVICES, needs_cuda  # noqa: E402
from _runs import assert_same_run, metrics, train_crashing_at  # noqa: E402

TINY = dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=2, n_decoder_layers=1,
            n_vae_encoder_layers=1, latent_dim=8, chunk_size=5, dropout=0.0, optimizer_lr=1e-3, kl_weight=1.0)
METRIC_KEYS = {"step", "loss", "l1", "kld", "grad_norm", "val_l1", "steps_per_s", "data_fraction", "samples"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("learnable") / "f.zarr"
    make_store(path, num_episodes=24)
    return path


def test_head_learns_far_better_than_the_mean_action(learnable: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = train(TrainConfig(store=learnable, out=run, steps=200, batch_size=16, act=dict(TINY, use_cls_token=True),
                               val_episodes="0.2", eval_every=100, save_every=100, log_every=50, progress=False))
    records = metrics(run)
    assert all(set(r) == METRIC_KEYS for r in records)
    assert [r["step"] for r in records] == [50, 100, 150, 200]
    assert result.baseline_val_l1 > 0.5
    # the factor the test asks for: the validation L1 is under half of predicting the mean action
    assert records[-1]["val_l1"] < 0.5 * result.baseline_val_l1, (records[-1], result.baseline_val_l1)
    assert all(0 <= r["data_fraction"] < 1 for r in records) and all(r["steps_per_s"] > 0 for r in records)

    # the run folder: provenance, configuration, statistics, checkpoints, plot
    record = json.loads((run / "run.json").read_text())
    store = open_training_store(learnable)
    assert record["store"]["path"] == str(learnable.resolve())
    assert record["store"]["provenance"] == json.loads(json.dumps(store.record.to_dict()))
    assert record["act_config"]["dim_model"] == 32 and record["act_config"]["use_cls_token"] is True
    assert record["act_inputs"]["cameras"] == [["top", 16, 2, 2], ["wrist", 16, 1, 3]]
    np.testing.assert_allclose(record["normalization"]["action"]["mean"], store.stats("action")["mean"])
    assert not set(record["split"]["train"]) & set(record["split"]["val"]) and len(record["split"]["val"]) == 5
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["000100", "000200", "best", "last"]
    assert (run / "checkpoints" / "last").resolve().name == "000200"
    assert (run / "checkpoints" / "best").resolve().name in ("000100", "000200")
    for name in ("model.safetensors", "config.json", "training_state.safetensors", "training_state.json"):
        assert (run / "checkpoints" / "000200" / name).is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the checkpoint rebuilds the head that was evaluated
    head, normalizer, spec = load_head(run)
    data = CachedFeatures(store, spec.config.chunk_size, use_cls_token=True, memory_budget=1 << 30)
    rows = episode_rows(store.episodes(), record["split"]["val"])
    with torch.no_grad():
        _, info = head.compute_loss(data.gather([(data.resident, rows)]))
    assert info["l1_loss"] < 0.5 * result.baseline_val_l1
    torch.testing.assert_close(normalizer.normalize("action", torch.zeros(3)), data.normalizer.normalize("action", torch.zeros(3)))


def test_overfits_a_single_episode_through_the_command_line(tmp_path: Path):
    store = make_store(tmp_path / "one.zarr", num_episodes=1, lengths=(24, 24))
    args = [str(tmp_path / "one.zarr"), "--out", str(tmp_path / "run"), "--steps", "300", "--batch-size", "8",
            "--val-episodes", "none", "--save-every", "1000", "--no-progress"]
    for name, value in TINY.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "steps       300" in result.output
    head, _, spec = load_head(tmp_path / "run")
    assert spec.config.chunk_size == 5 and spec.config.n_action_steps == 5, "n_action_steps follows --chunk-size"
    data = CachedFeatures(store, 5, memory_budget=1 << 30)
    with torch.no_grad():  # eval mode: the zero latent the live policy uses, on every frame of the episode
        _, info = head.compute_loss(data.gather([(data.resident, np.arange(store.num_frames))]))
    assert info["l1_loss"] < 0.05, info
    assert not (tmp_path / "run" / "checkpoints" / "best").exists(), "no validation, no best checkpoint"


@pytest.mark.parametrize("memory_budget", [None, 1], ids=["in-memory", "streamed"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(learnable: Path, tmp_path: Path, monkeypatch,
                                                               memory_budget: int | None):
    options = dict(store=learnable, steps=40, batch_size=8, act=dict(TINY, dropout=0.1), val_episodes="0.2",
                   eval_every=10, save_every=20, log_every=5, progress=False, memory_budget=memory_budget,
                   window_frames=32)
    train(TrainConfig(out=tmp_path / "whole", **options))

    # The same run, crashed at step 27 (after the checkpoint at 20, with records up to 25 written).
    train_crashing_at(TrainConfig(out=tmp_path / "split", **options), 27, monkeypatch)
    assert [r["step"] for r in metrics(tmp_path / "split")][-1] == 25
    with pytest.raises(DinocacheError, match="--resume"):
        train(TrainConfig(out=tmp_path / "split", **options))
    with pytest.raises(DinocacheError, match="batch-size 4"):
        train(TrainConfig(out=tmp_path / "split", resume=True, **{**options, "batch_size": 4}))
    train(TrainConfig(out=tmp_path / "split", resume=True, **options))

    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(5, 45, 5))
    assert_same_run(tmp_path / "whole", tmp_path / "split", ("loss", "l1", "kld", "grad_norm", "val_l1", "samples"))
    state = json.loads((tmp_path / "split" / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["sampler"] == {"seed": 1000, "position": 40 * 8, "world_size": 1,
                                "window_chunks": None if memory_budget is None else 4}


def test_two_process_ddp_on_cpu_trains_and_checkpoints(learnable: Path, tmp_path: Path):
    """DDP over gloo, started as users start it: ``workflows/train_torchrun.sh`` with two processes."""
    run = tmp_path / "ddp"
    args = ["--steps", "6", "--batch-size", "4", "--save-every", "3", "--log-every", "3", "--eval-every", "3",
            "--val-episodes", "0.2", "--device", "cpu", "--no-progress"]
    for name, value in TINY.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    recipe = Path(__file__).resolve().parents[1] / "workflows" / "train_torchrun.sh"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # its `torchrun`
    # TMPDIR: torchrun leaves a torchelastic_* log folder behind in it
    env = dict(os.environ, OMP_NUM_THREADS="1", NPROC_PER_NODE="2", PATH=path, TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(recipe), str(learnable), str(run), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("steps       6") == 1, "only rank 0 reports"
    record = json.loads((run / "run.json").read_text())
    assert record["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000003", "000006", "best", "last"]
    state = json.loads((run / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["step"] == 6 and len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2
    records = metrics(run)
    assert [r["step"] for r in records] == [3, 6] and records[-1]["samples"] == 6 * 4 * 2
    assert all(np.isfinite(r["loss"]) and r["val_l1"] is not None for r in records)


@pytest.mark.parametrize("device", DEVICES)
def test_trains_on_the_device_and_resumes_there(learnable: Path, tmp_path: Path, device: str):
    """One process on ``device`` (bf16 autocast and pinned batches on CUDA): finite losses, a validation,
    checkpoints that load, and a resume on the same device that continues the run."""
    common = dict(store=learnable, batch_size=8, act=TINY, val_episodes="0.2", eval_every=4, save_every=4,
                  log_every=2, device=device, progress=False)
    train(TrainConfig(out=tmp_path / "run", steps=4, **common))
    train(TrainConfig(out=tmp_path / "run", steps=8, resume=True, **common))
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["val_l1"] is not None
    head, _, _ = load_head(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in head.state_dict().values())


@pytest.mark.parametrize("device", DEVICES)
def test_the_loop_reads_the_device_only_when_it_writes_a_record(learnable: Path, tmp_path: Path, device: str,
                                                                monkeypatch):
    """Between records the host only queues work: while a batch is gathered and a step runs, no tensor
    is read back (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``, ``cpu``), and on CUDA no
    operation synchronises (``torch.cuda.set_sync_debug_mode("error")``). Reads happen once per record."""
    from dinocache.policy.training import batches as batches_module
    from dinocache.policy.training import data as data_module
    from dinocache.policy.training import step as step_module

    reads: list[str] = []
    inside = [False]

    def guarded(call):
        def run(*args, **kwargs):
            inside[0] = True
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                return call(*args, **kwargs)
            finally:
                inside[0] = False
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        return run

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0]:
                reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    monkeypatch.setattr(step_module.TrainStep, "__call__", guarded(step_module.TrainStep.__call__))
    for batches in (data_module.ResidentBatches, batches_module.HostBatches):
        monkeypatch.setattr(batches, "__next__", guarded(batches.__next__))
    train(TrainConfig(store=learnable, out=tmp_path / "run", steps=6, batch_size=8, act=TINY, val_episodes="none",
                      log_every=3, save_every=6, device=device, progress=False))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [3, 6]
    assert reads == [], reads


@needs_cuda
def test_torchrun_on_cuda_trains_and_checkpoints(learnable: Path, tmp_path: Path):
    """torchrun on CUDA, one process per GPU (up to two): DDP over NCCL where there are two GPUs, the
    torchrun environment (``cuda:LOCAL_RANK``) alone where there is one. The CPU twin is the two-process
    gloo run above."""
    nproc = min(2, torch.cuda.device_count())
    run = tmp_path / "ddp"
    args = ["--steps", "6", "--batch-size", "4", "--save-every", "3", "--log-every", "3", "--eval-every", "3",
            "--val-episodes", "0.2", "--no-progress"]
    for name, value in TINY.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "dinocache.cli", "train", str(learnable), "--out", str(run), *args],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)),  # see the CPU twin
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["world_size"] == nproc
    assert all(np.isfinite(r["loss"]) for r in metrics(run))


def test_best_is_the_best_validation_seen_not_only_at_checkpoints(learnable: Path, tmp_path: Path):
    """Validations every 3 steps, checkpoints every 12: `best` still points at the step whose validation
    L1 was lowest, and no more than one checkpoint is kept only for having been best."""
    run = tmp_path / "run"
    train(TrainConfig(store=learnable, out=run, steps=24, batch_size=8, act=TINY, val_episodes="0.2", eval_every=3,
                      save_every=12, log_every=3, progress=False))
    records = [r for r in metrics(run) if r["val_l1"] is not None]
    best = min(records, key=lambda r: r["val_l1"])
    assert (run / "checkpoints" / "best").resolve().name == f"{best['step']:06d}"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name not in ("best", "last"))
    assert set(kept) - {f"{best['step']:06d}"} == {"000012", "000024"}
    state = json.loads((run / "checkpoints" / "best" / "training_state.json").read_text())
    assert state["best_val_l1"] == pytest.approx(best["val_l1"])


def test_log_to_tensorboard_mirrors_the_metrics_and_records_the_config(learnable: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = CliRunner().invoke(train_command, [str(learnable), "--out", str(run), "--steps", "6", "--batch-size", "4",
                                                "--log-every", "2", "--val-episodes", "0.2", "--eval-every", "3",
                                                "--log-to", "tensorboard", "--no-progress",
                                                *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = metrics(run)
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records})
    assert [e.step for e in events.Scalars("val_l1")] == [r["step"] for r in records if r["val_l1"] is not None]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"chunk_size": 5' in config and "provenance" in config


_WANDB_STAND_IN = """
import json, os

def _write(entry):
    with open(os.environ["STAND_IN_WANDB_CALLS"], "a") as calls:
        calls.write(json.dumps(entry, default=str) + "\\n")

class Run:
    def log(self, data, step=None):
        _write({"log": data, "step": step})

    def finish(self):
        _write({"finish": True})

def init(**kwargs):
    _write({"init": kwargs})
    return Run()
"""


def test_log_to_wandb_sends_every_record_and_the_config_and_resumes_the_same_run(learnable: Path, tmp_path: Path,
                                                                                monkeypatch):
    """W&B is not installed here and needs an account, so a stand-in ``wandb`` module on the path
    records the calls dinocache makes (wandb's own signatures: ``init(project=, name=, id=, resume=,
    dir=, config=)``, ``run.log(dict, step=)``, ``run.finish()``): the run's configuration once per
    process, every metrics record at its step, and the same W&B run id when the folder is resumed."""
    (tmp_path / "site" / "wandb").mkdir(parents=True)
    (tmp_path / "site" / "wandb" / "__init__.py").write_text(_WANDB_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # undone by removing whatever module this test imports
    del sys.modules["wandb"]
    monkeypatch.setenv("STAND_IN_WANDB_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("WANDB_PROJECT", "act-cache")
    run = tmp_path / "run"
    args = [str(learnable), "--out", str(run), "--batch-size", "4", "--log-every", "2", "--val-episodes", "0.2",
            "--eval-every", "3", "--log-to", "wandb", "--no-progress",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    for steps, resume in ((4, []), (6, ["--resume"])):
        result = CliRunner().invoke(train_command, [*args, "--steps", str(steps), *resume])
        assert result.exit_code == 0, result.output
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    inits = [c["init"] for c in calls if "init" in c]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "act-cache" and inits[0]["name"] == "run" and inits[0]["dir"] == str(run)
    assert inits[0]["config"]["act_config"]["chunk_size"] == TINY["chunk_size"] and "provenance" in inits[0]["config"]["store"]
    logged = [c for c in calls if "log" in c]
    assert [c["step"] for c in logged] == [r["step"] for r in metrics(run)]
    assert [c["log"]["loss"] for c in logged] == pytest.approx([r["loss"] for r in metrics(run)])
    assert "step" not in logged[0]["log"] and sum("finish" in c for c in calls) == 2


def test_log_to_a_tracker_that_is_not_installed_is_refused_before_the_run(learnable: Path, tmp_path: Path):
    import importlib.util

    missing = [kind for kind in ("wandb", "tensorboard") if importlib.util.find_spec(kind) is None]
    if not missing:
        pytest.skip("every tracker is installed here")
    result = CliRunner().invoke(main, ["train", str(learnable), "--out", str(tmp_path / "run"), "--log-to", missing[0]])
    assert result.exit_code != 0 and f"pip install 'dinocache[{missing[0]}]'" in result.output
    assert not (tmp_path / "run").exists()


def test_presets_check_the_backbone_and_set_the_head(learnable: Path):
    store = open_training_store(learnable)  # extracted with dinov2_vits14
    with pytest.raises(DinocacheError, match="dinov2_vits14_reg"):
        resolve_act_config("dinov2-reg", {}, store)
    config = resolve_act_config("dinov2", {"chunk_size": 10, "use_cls_token": True}, store)
    assert config.chunk_size == 10 and config.n_action_steps == 10 and config.use_cls_token
    assert config.dim_model == ACTConfig().dim_model
    with pytest.raises(DinocacheError, match="n_heads"):
        resolve_act_config(None, {"dim_model": 36, "n_heads": 8}, store)


def test_an_incomplete_store_is_refused_before_anything_is_written(tmp_path: Path):
    make_store(tmp_path / "f.zarr", num_episodes=4, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        train(TrainConfig(store=tmp_path / "f.zarr", out=tmp_path / "run", steps=2, act=TINY, progress=False))
    assert not (tmp_path / "run").exists()



class _FakeCudaGraphs:
    """torch.cuda's graph API as ``_Replayed`` uses it, recording the calls (CUDA graphs need a GPU;
    the CUDA twins of the tests above run the real ones)."""

    def __init__(self, events: list[str], fail_capture: bool = False) -> None:
        self.events, self.fail_capture = events, fail_capture
        self.capturing = False
        fake = self

        class Graph:
            def replay(self) -> None:
                fake.events.append("replay")

        class Capture:
            def __init__(self, graph) -> None:
                pass

            def __enter__(self) -> None:
                fake.capturing = True
                fake.events.append("capture begins")

            def __exit__(self, *exc) -> None:
                fake.capturing = False
                fake.events.append("capture ends")
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        class Stream:
            def wait_stream(self, other) -> None:
                pass

        self.CUDAGraph, self.graph = Graph, Capture
        self.Stream, self.current_stream = Stream, Stream
        self.stream = lambda s: contextlib.nullcontext()


@pytest.mark.parametrize("fail_capture", [False, True], ids=["replayed", "capture-fails"])
def test_a_replayed_step_runs_eagerly_then_is_captured_once_and_replayed(monkeypatch, fail_capture: bool):
    """The CPU twin of the CUDA graph's order: GRAPH_WARMUP eager calls (each followed by
    ``eager_after``), then ``before_capture`` once and one capture of ``fn`` (without ``eager_after``),
    then replays that run no Python of ``fn``; a capture that fails names --no-cuda-graph in one line."""
    from dinocache.errors import TrainingError
    from dinocache.policy.training.step import Replayed

    events: list[str] = []
    fake = _FakeCudaGraphs(events, fail_capture)
    for name in ("CUDAGraph", "graph", "Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    step = Replayed(lambda: events.append("fn captured" if fake.capturing else "fn"), graph=True,
                                  eager_after=lambda: events.append("eager_after"),
                                  before_capture=lambda: events.append("before_capture"))
    for _ in range(GRAPH_WARMUP):
        step()
    assert events == ["fn", "eager_after"] * GRAPH_WARMUP
    events.clear()
    if fail_capture:
        with pytest.raises(TrainingError, match=r"could not be captured as a CUDA graph \(operation not permitted "
                                                r"when stream is capturing\); --no-cuda-graph runs it without$"):
            step()
        return
    step()
    step()
    assert events == ["before_capture", "capture begins", "fn captured", "capture ends", "replay", "replay"]


def _step_setup(learnable: Path, device: str, **act):
    """A tiny head on ``device``, its twin for the textbook loop, and batches written into fixed device buffers."""
    store = open_training_store(learnable)
    data = CachedFeatures(store, TINY["chunk_size"], memory_budget=1 << 30, device=device)
    config = resolve_act_config(None, dict(TINY, **act), store)
    torch.manual_seed(0)
    head = ACTHead(config, data.inputs).to(device)
    twin = copy.deepcopy(head)
    inputs = data.batch_buffers(8, device)
    batches = data.train_batches(data.sample_order(np.arange(store.num_frames), seed=0), 8, out=inputs)
    return head, twin, inputs, batches


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow, id="compiled")])
@pytest.mark.parametrize("device", DEVICES)
def test_the_step_equals_the_textbook_step(learnable: Path, device: str, compiled: bool):
    """TrainStep (sums on the device, the found_inf flag, and on CUDA the whole step as one CUDA graph,
    captured after GRAPH_WARMUP eager steps and replayed) against forward, backward, clip, AdamW written
    out, on the same batches and noise (dropout, CVAE). The CPU twin runs the same step without the graph.
    ``compiled`` (``train --compile``): the head's forward and backward are Inductor's kernels (on CUDA
    captured in the step's graph); without dropout and the CVAE's sampling there, since Inductor draws
    its own random numbers (``fallback_random`` makes them eager's on torch 2.14, not on 2.7)."""
    noise = dict(dropout=0.0, use_vae=False) if compiled else dict(dropout=0.1)
    head, twin, inputs, batches = _step_setup(learnable, device, **noise)
    if compiled:
        head.compile()
    step = TrainStep(head, act_optimizer(list(head.parameters()), head.config), inputs, graph=device == "cuda")
    optimizer = act_optimizer(list(twin.parameters()), twin.config)
    expected = np.zeros(4)
    with batches:
        for index in range(GRAPH_WARMUP + 3):
            batch = {key: value.clone() for key, value in next(batches).items()}
            torch.manual_seed(index)
            step()
            torch.manual_seed(index)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss, info = twin.compute_loss(batch)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), twin.config.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad()
            expected += [float(info["loss"]), float(info["l1_loss"]), float(info["kld_loss"]), float(norm)]
    sums, bad = step.take()
    assert bad is None
    tolerance = dict(rtol=2e-2, atol=1e-3) if device == "cuda" else \
        dict(rtol=1e-4, atol=1e-5) if compiled else dict(rtol=1e-5, atol=1e-6)  # Inductor sums in its own order
    np.testing.assert_allclose(sums, expected, **tolerance)
    # Compiled, the attention's key biases drift (1e-4 on the CPU): their gradient is zero but for rounding
    # (a softmax ignores a shift shared by all keys), and AdamW scales such noise up to its step size
    # (lr 1e-3 here, so at most 6e-3 over these steps).
    weights = dict(tolerance, atol=1e-2 if device == "cuda" else 2e-4) if compiled else tolerance
    for (name, a), b in zip(head.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, **weights, msg=name)
    assert step.take()[0] == [0.0] * 4, "take() starts new sums"


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_step_is_skipped_on_the_device_and_reported(learnable: Path, device: str):
    """A NaN feature at step 5 (on CUDA, a replay of the captured graph): that update and every later one
    are skipped without the host reading anything, and take() names the step."""
    head, _, inputs, batches = _step_setup(learnable, device)
    step = TrainStep(head, act_optimizer(list(head.parameters()), head.config), inputs, graph=device == "cuda")
    with batches:
        for index in range(1, 8):
            next(batches)
            if index == 5:
                inputs["features.top"][0, 0, 0, 0] = float("nan")
            step()
            if index == 4:
                before = {name: value.clone() for name, value in head.state_dict().items()}
    sums, bad = step.take()
    assert bad is not None and bad[0] == 5 and math.isnan(bad[1]) and math.isnan(bad[2]), bad
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_with_the_graph_equals_one_without(learnable: Path, tmp_path: Path, device: str):
    """train() with --cuda-graph (the default) and --no-cuda-graph: the same metrics within float tolerance
    (on the CPU, where there is no graph, the flag changes nothing: identical)."""
    common = dict(store=learnable, steps=8, batch_size=8, act=TINY, val_episodes="0.2", eval_every=4, save_every=8,
                  log_every=4, device=device, progress=False)
    for graph in (True, False):
        train(TrainConfig(out=tmp_path / f"graph-{graph}", cuda_graph=graph, **common))
    with_graph, without = metrics(tmp_path / "graph-True"), metrics(tmp_path / "graph-False")
    for a, b in zip(with_graph, without):
        for key in ("loss", "l1", "kld", "grad_norm", "val_l1"):
            assert a[key] == pytest.approx(b[key], rel=0 if device == "cpu" else 2e-2, abs=0 if device == "cpu" else 1e-3)
