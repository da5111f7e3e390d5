"""Stage three end to end on real files: a generated dataset with real video, a real extraction, a few
training steps, then the fused policy as a .pt2: export, its parity check, the live runtime,
`bench-policy`. (ONNX: tests/test_export_onnx.py; AOTInductor kernels: tests/test_export_compiled.py.)

Every test reads one run (a ViT-S/14 with random weights at 56 px, a tiny head, two cameras, an
environment state, CLS tokens on), built once per test run by the ``trained`` fixture (tests/_export.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dinocache.cli import main
from dinocache.encoders.record import WeightsRecord
from dinocache.errors import BackboneError, DatasetError, DinocacheError
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.deployment import export as export_module
from dinocache.policy.deployment.bench import bench_policy
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.fused import build_fused_policy
from dinocache.policy.deployment.metadata import read_policy_metadata, rewrite_pt2_metadata
from dinocache.policy.deployment.parity import ParityError, check_parity, open_run_store, verification_frames
from dinocache.policy.deployment.runtime import ObservationError, load_policy
from dinocache.policy.model.integrity import file_record, read_json, write_json
from dinocache.policy.model.provenance import check_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_encoders_weights import _official_dinov2, _timm_model  # noqa: E402
from _devices import DEVICES  # noqa: E402
from _export import (DTYPE_ATOL, ENV, STATE, TOP, WRIST, chunk, extract_store, leftovers, observations,  # noqa: E402
                     write_dataset)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pt2(exported) -> SimpleNamespace:
    """The run exported through the command line, as a user would (``--out`` without a suffix: the
    format's is added), once per test run (conftest.py)."""
    out = exported.pt2
    assert out.is_file() and not (exported.folder / "policy").exists() and str(out) in exported.pt2_output
    return SimpleNamespace(path=out, output=exported.pt2_output)


@pytest.fixture(scope="module")
def live(pt2):
    """The exported .pt2 loaded once (``torch.export.load`` takes seconds); tests derive their own
    action selection from it with ``with_action_selection``."""
    return load_policy(pt2.path)


# -- export ---------------------------------------------------------------------------------------


def test_export_writes_a_checked_self_describing_pt2(trained, pt2):
    assert "parity ok" in pt2.output and "policy" in pt2.output
    assert not leftovers(pt2.path.parent)
    meta = read_policy_metadata(pt2.path)  # from the zip entry: no weights loaded
    prov = trained.store.record.to_dict()
    assert meta["format"] == "dinocache-policy" and meta["dtype"] == "float32"
    assert meta["cameras"] == [TOP, WRIST] and meta["camera_names"] == ["top", "wrist"]
    assert meta["image_size"] == {TOP: [48, 64], WRIST: [48, 64]}
    assert (meta["state_dim"], meta["action_dim"], meta["env_state_dim"]) == (4, 4, 2)
    assert meta["state_names"] == prov["lowdim_names"][STATE] and meta["action_names"] == prov["lowdim_names"]["action"]
    assert meta["fps"] == 30.0 and meta["chunk_size"] == 5 and meta["n_action_steps"] == 5
    assert meta["temporal_ensemble_coeff"] is None and meta["checkpoint"]["step"] == 30
    assert meta["provenance"]["weights"] == prov["weights"] and meta["provenance"]["preprocess"] == prov["preprocess"]
    assert meta["backbone_weights"]["tensor_sha256"] == prov["weights"]["tensor_sha256"]
    parity = meta["parity"]
    assert parity["verified"] and parity["passed"] and parity["frames"] == 8
    assert parity["origin"] == f"dataset {trained.dataset}"
    assert parity["max_abs_diff"] <= parity["tolerance"] < 1e-2, parity  # float16 cache: a tight tolerance
    assert parity["feature_error"] == 2.0**-11
    assert meta["export"]["format"] == "pt2" and meta["export"]["trace_max_abs_diff"] <= 1e-6


def test_the_metadata_rewrite_leaves_every_weight_where_torch_wrote_it(trained, pt2, live, tmp_path):
    """Export writes the sealed metadata into the archive it checked (rewrite_pt2_metadata) instead of
    saving the program again: every entry before the metadata keeps its bytes and its offset (the
    alignment torch gave the weights), and the archive loads and acts as before."""
    copy = tmp_path / "policy.pt2"
    shutil.copy(pt2.path, copy)
    with zipfile.ZipFile(copy) as archive:
        before = [(i.filename, i.header_offset, i.CRC) for i in archive.infolist()]
        entry = next(n for n in archive.namelist() if n.endswith("extra/dinocache.json"))
        text = archive.read(entry).decode()
    rewrite_pt2_metadata(copy, text + " " * 1000)  # longer: what follows the metadata moves, nothing before it
    with zipfile.ZipFile(copy) as archive:
        assert archive.testzip() is None
        after = [(i.filename, i.header_offset, i.CRC) for i in archive.infolist()]
    at = next(k for k, (name, *_) in enumerate(before) if name == entry)
    assert after[:at] == before[:at] and [a[0] for a in after] == [b[0] for b in before]
    assert after[at][1] == before[at][1] and after[at][2] != before[at][2]  # the metadata, in its place
    assert read_policy_metadata(copy) == read_policy_metadata(pt2.path)
    obs = observations(trained, 1)[0]
    np.testing.assert_array_equal(load_policy(copy).select_action(obs), live.with_action_selection().select_action(obs))


@pytest.mark.slow
def test_pt2_reloaded_in_a_fresh_process_gives_the_eager_actions(trained, eager, pt2, live, tmp_path):
    obs = observations(trained, 3)
    images = [np.stack([o[TOP] for o in obs]), np.stack([o[WRIST] for o in obs])]
    state, env = np.stack([o[STATE] for o in obs]), np.stack([o[ENV] for o in obs])
    np.savez(tmp_path / "inputs.npz", top=images[0], wrist=images[1], state=state, env=env)
    script = f"""
import numpy as np, torch
torch.set_num_threads(1)
x = np.load({str(tmp_path / 'inputs.npz')!r})
module = torch.export.load({str(pt2.path)!r}).module()
with torch.no_grad():  # batch 3 and batch 1: the batch axis is exported dynamic
    three = module([torch.from_numpy(x['top']), torch.from_numpy(x['wrist'])], torch.from_numpy(x['state']),
                   torch.from_numpy(x['env']))
    one = module([torch.from_numpy(x['top'][:1]), torch.from_numpy(x['wrist'][:1])], torch.from_numpy(x['state'][:1]),
                 torch.from_numpy(x['env'][:1]))
np.savez({str(tmp_path / 'outputs.npz')!r}, three=three.numpy(), one=one.numpy())
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = np.load(tmp_path / "outputs.npz")
    with torch.no_grad():
        expected = eager([torch.from_numpy(i) for i in images], torch.from_numpy(state), torch.from_numpy(env))
    assert out["three"].shape == (3, 5, 4) and out["one"].shape == (1, 5, 4)
    np.testing.assert_allclose(out["three"], expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["one"][0], expected[0].numpy(), rtol=0, atol=1e-6)
    # and through the runtime a robot loop uses: the first action of the chunk
    action = live.with_action_selection().select_action(obs[0])
    assert action.dtype == np.float32 and action.shape == (4,)
    np.testing.assert_allclose(action, expected[0, 0].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_on_the_device_serves_numpy_frames_there(trained, eager, pt2, device, dtype, tmp_path):
    """Trace, parity check, trace check and the live runtime on ``device``: everything that meets there
    (the normaliser's statistics, the traced program's actions, frames handed over as numpy) must be on
    one device. On the CPU this runs the same code as on CUDA, autocast regions included. (float32 on
    the CPU is the command line's default export: the ``pt2`` fixture's file.)"""
    if (device, dtype) == ("cpu", "float32"):
        path = pt2.path
    else:
        path = export_policy(trained.run, tmp_path / "policy.pt2", device=device, dtype=dtype, progress=False).path
    meta = read_policy_metadata(path)
    assert meta["parity"]["passed"] and meta["export"]["trace_max_abs_diff"] <= meta["export"]["trace_tolerance"]
    assert meta["dtype"] == dtype and torch.device(meta["export"]["device"]).type == device
    policy = load_policy(path, device=device)
    obs = observations(trained, 2)
    action = policy.select_action(obs[0])  # numpy frames and state, as a robot loop hands them over
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == (4,)
    np.testing.assert_allclose(action, chunk(eager, obs[0])[0].numpy(), rtol=0, atol=DTYPE_ATOL[dtype])
    assert np.isfinite(policy.select_action(obs[1])).all()


def test_half_precision_export_without_the_check_still_bounds_the_written_program(trained, tmp_path):
    """``--skip-verify --dtype float16``: no parity report to take a tolerance from (this used to end in a
    KeyError), so the allowance for the written program against the eager policy is measured on the
    example inputs, the same way the check measures it."""
    result = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(tmp_path / "h.pt2"), "--dtype", "float16",
                                       "--skip-verify", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "NOT VERIFIED (--skip-verify)" in result.output and "max |pt2 - eager|" in result.output
    meta = read_policy_metadata(tmp_path / "h.pt2")
    assert meta["parity"] == {"verified": False}
    half = build_fused_policy(trained.run, dtype="float16")
    inputs = export_module._example_inputs(half, None, None, None, meta["image_size"], torch.device("cpu"))
    measured = export_module.rounding_tolerance(half, *inputs)
    assert meta["export"]["trace_tolerance"] == pytest.approx(max(measured, export_module.TRACE_TOLERANCE))
    assert export_module.TRACE_TOLERANCE < meta["export"]["trace_tolerance"] < 0.1
    assert meta["export"]["trace_max_abs_diff"] <= meta["export"]["trace_tolerance"]


def test_cuda_graph_needs_a_cuda_device(trained, pt2):
    """The CPU side of the CUDA-graph option: asked for where it cannot run, it is refused in one line."""
    with pytest.raises(DinocacheError, match="cuda_graph=True needs a CUDA device"):
        load_policy(pt2.path, device="cpu", cuda_graph=True)
    assert load_policy(pt2.path).metadata["runtime"] == {"backend": "program", "cuda_graph": False}


def test_wrong_weights_are_refused_by_hash_and_fail_the_parity_check(trained, tmp_path):
    """Weights of the same architecture but other values: the hash check refuses them, naming both
    tensor hashes; let through, the parity check fails; either way no file is written."""
    other = tmp_path / "other_vits14.pth"
    torch.save(_official_dinov2(_timm_model("dinov2_vits14")), other)
    out = tmp_path / "policy.pt2"
    with pytest.raises(BackboneError) as info:
        export_policy(trained.run, out, weights=other, progress=False)
    message = str(info.value)
    hashes = re.findall(r"\b[0-9a-f]{64}\b", message)
    assert len(set(hashes)) == 2 and trained.store.record.to_dict()["weights"]["tensor_sha256"] in hashes, message
    assert str(other) in message and "\n" not in message

    with pytest.raises(ParityError, match=r"parity FAILED.*other backbone weights or preprocessing\?\); nothing was written"):
        export_policy(trained.run, out, weights=other, progress=False, check_weights=False)
    assert not out.exists() and not leftovers(tmp_path)

    result = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(out), "--weights", str(other),
                                       "--no-progress"])
    assert result.exit_code == 2 and result.output.startswith("dinocache: error: ") and "tensor_sha256" in result.output
    assert not out.exists()


def test_a_head_with_nan_weights_fails_the_parity_check_as_not_finite(trained, tmp_path):
    """A checkpoint whose weights hold NaN (copied and damaged here) makes NaN actions: the check says
    so rather than blaming the backbone's weights or preprocessing, and writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(trained.run, run, symlinks=True)
    weights = (run / "checkpoints" / "last" / "model.safetensors").resolve()
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    config = weights.parent / "config.json"  # recorded as training would have written it
    recorded = read_json(config)
    write_json(config, {**recorded, "files": {**recorded["files"], weights.name: file_record(weights)}})
    out = tmp_path / "policy.pt2"
    with pytest.raises(ParityError, match=r"parity FAILED.*not finite: NaN or inf in the weights.*nothing was written"):
        export_policy(run, out, progress=False)
    assert not out.exists() and not leftovers(tmp_path)


def test_check_weights_names_both_file_hashes():
    recorded = {"source": "file", "sha256": "a" * 64, "seed": None, "tensor_sha256": "b" * 64}
    old = WeightsRecord.from_dict({**recorded, "path": "/old/w.pth"})
    check_weights(WeightsRecord.from_dict({**recorded, "path": "/w/same.pth"}), old, "/w/same.pth")  # equal: accepted
    with pytest.raises(BackboneError, match=rf"/w/x.pth.*sha256 {'c' * 64}.*/old/w.pth, sha256 {'a' * 64}.*--weights PATH"):
        check_weights(WeightsRecord.from_dict({**recorded, "path": "/w/x.pth", "sha256": "c" * 64}), old, "/w/x.pth")
    with pytest.raises(BackboneError, match=rf"tensor_sha256 {'d' * 64}.*tensor_sha256 {'b' * 64}"):
        check_weights(WeightsRecord.from_dict({**recorded, "path": "/w/x.pth", "tensor_sha256": "d" * 64}),
                      WeightsRecord.from_dict(recorded), "/w/x.pth")


def test_without_the_dataset_the_check_uses_the_frames_the_store_keeps(trained, eager, tmp_path):
    """The dataset moved away after extraction. The shared run's dataset stays where it is (other tests
    read it meanwhile): a copy of it is extracted here as the run's was (the same features) and moved."""
    dataset = shutil.copytree(trained.dataset, tmp_path / "data")
    store = FeatureStore(extract_store(dataset, tmp_path / "f.zarr"))
    from_dataset = verification_frames(store)
    assert from_dataset.origin.startswith("dataset") and len(from_dataset.rows) == 8
    reference = check_parity(eager, store, from_dataset)
    assert reference.passed

    other = write_dataset(tmp_path / "other", seed=1)
    with pytest.raises(DatasetError, match="not the dataset the store was extracted from"):
        verification_frames(store, dataset=other)

    no_frames = tmp_path / "old.zarr"  # a store from before stores kept frames
    shutil.copytree(store.path, no_frames)
    shutil.rmtree(no_frames / "verification")
    dataset.rename(tmp_path / "moved")
    kept = verification_frames(store)
    assert kept.origin == "store's kept frames"
    np.testing.assert_array_equal(kept.rows, from_dataset.rows)
    for a, b in zip(kept.images, from_dataset.images):  # the very frames extraction decoded
        np.testing.assert_array_equal(a, b)
    report = check_parity(eager, store, kept)
    assert report.passed and report.max_abs_diff == reference.max_abs_diff
    with pytest.raises(DinocacheError, match=r"is not there.*keeps no raw frames.*--dataset PATH.*--skip-verify"):
        verification_frames(FeatureStore(no_frames))


def test_half_precision_is_checked_with_a_wider_tolerance(trained, eager):
    store = open_run_store(eager)
    frames = verification_frames(store)
    full = check_parity(eager, store, frames)
    half = check_parity(build_fused_policy(trained.run, dtype="bfloat16"), store, frames)
    assert half.passed and half.tolerance > 10 * full.tolerance
    assert half.feature_error == pytest.approx(2.0**-11 + 4 * 2.0**-8)
    assert half.max_abs_diff > full.max_abs_diff  # bfloat16 really is less precise


def test_the_file_is_named_for_its_format_and_errors_come_alone(trained, tmp_path):
    """A ``.pth`` holding a ``.pt2`` archive misleads every tool that goes by the name: refused, in one
    line, before any work; an error met midway is one line too, with no progress fragment before it."""
    runner = CliRunner()
    for out, fmt, expected in [("policy.pth", [], "a pt2 policy is written as .pt2; name it policy.pt2"),
                               ("policy.onnx", ["--format", "pt2"], "name it policy.pt2 or give --format onnx"),
                               ("policy.pt2", ["--format", "onnx"], "a onnx policy is written as .onnx")]:
        result = runner.invoke(main, ["export", str(trained.run), "--out", str(tmp_path / out), *fmt])
        assert result.exit_code != 0 and expected in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
    midway = runner.invoke(main, ["export", str(trained.run), "--out", str(tmp_path / "p.pt2"), "--checkpoint", "best"])
    assert midway.exit_code != 0 and "no checkpoint 'best'" in midway.output
    assert "export 0/" not in midway.output and "rebuild backbone" not in midway.output, midway.output
    assert not list(tmp_path.iterdir())


def test_checkpoints_are_chosen_by_name_or_step(trained, tmp_path):
    assert build_fused_policy(trained.run, checkpoint=30).step == 30
    assert build_fused_policy(trained.run, checkpoint=15).step == 15
    with pytest.raises(DinocacheError, match=r"no checkpoint 'best' \(the run has: 000015, 000030, last\)"):
        export_policy(trained.run, tmp_path / "p.pt2", checkpoint="best", progress=False)


# -- live runtime ---------------------------------------------------------------------------------


def test_queue_queries_the_model_every_n_action_steps(trained, eager, live):
    assert live.metadata["n_action_steps"] == 5  # as trained
    policy = live.with_action_selection(n_action_steps=3)
    obs = observations(trained, 10)
    queried, actions = [], []
    for o in obs:
        actions.append(policy.select_action(o))
        queried.append(policy.queried)
    assert queried == [t % 3 == 0 for t in range(10)] and policy.queries == 4
    for t, action in enumerate(actions):  # step t executes action t - t0 of the chunk predicted at t0
        t0 = 3 * (t // 3)
        np.testing.assert_allclose(action, chunk(eager, obs[t0])[t - t0].numpy(), rtol=0, atol=1e-6)
    policy.reset()
    policy.select_action(obs[5])
    assert policy.queried


def test_temporal_ensemble_is_the_weighted_average_of_every_chunk_covering_a_step(trained, eager, live):
    coeff, steps = 0.3, 9
    policy = live.with_action_selection(temporal_ensemble_coeff=coeff)
    assert policy.metadata["n_action_steps"] == 1 and policy.metadata["temporal_ensemble_coeff"] == coeff
    obs = observations(trained, steps)
    chunks = [chunk(eager, o).double() for o in obs]
    size = chunks[0].shape[0]
    for t in range(steps):
        action = policy.select_action(obs[t])
        assert policy.queried
        covering = [s for s in range(t + 1) if t - s < size]  # oldest first
        weights = [math.exp(-coeff * i) for i in range(len(covering))]
        expected = sum(w * chunks[s][t - s] for w, s in zip(weights, covering)) / sum(weights)
        np.testing.assert_allclose(action, expected.numpy(), rtol=0, atol=1e-5)
        if t >= 1:  # the average really differs from executing the newest or the oldest chunk alone
            assert not np.allclose(action, chunks[t][0].numpy(), atol=1e-4)
            assert not np.allclose(action, chunks[covering[0]][t - covering[0]].numpy(), atol=1e-4)


def test_select_action_names_the_key_and_the_expected_shape(trained):
    policy = load_policy(trained.run)  # the eager fused policy, straight from the run folder
    good = observations(trained, 1)[0]
    action = policy.select_action({"top": torch.from_numpy(good[TOP])[None], "wrist": good[WRIST],
                                   STATE: torch.from_numpy(good[STATE]), ENV: good[ENV].tolist()})
    assert action.dtype == np.float32 and action.shape == (4,)
    cases = {
        "missing camera": ({k: v for k, v in good.items() if k != WRIST},
                           rf"no '{re.escape(WRIST)}' \(nor 'wrist'\).*{re.escape(WRIST)} uint8 \(48, 64, 3\)"),
        "wrong size": ({**good, TOP: good[TOP][:40]}, r"observation.images.top'\]: expected a uint8 \(48, 64, 3\) image.*\(40, 64, 3\)"),
        "float frames": ({**good, TOP: good[TOP] / 255.0}, r"got float64 \(48, 64, 3\).*convert float frames"),
        "int64 frames": ({**good, TOP: good[TOP].astype(np.int64)}, r"got int64 \(48, 64, 3\).*cast integer frames"),
        "channels first": ({**good, TOP: good[TOP].transpose(2, 0, 1)}, r"\(3, 48, 64\) \(channels first"),
        "state width": ({**good, STATE: good[STATE][:3]}, r"observation.state'\]: expected 4 values, shape \(4,\), got shape \(3,\)"),
        "NaN state": ({**good, STATE: np.full(4, np.nan, np.float32)}, "NaN"),
        "no env state": ({k: v for k, v in good.items() if k != ENV}, "observation.environment_state"),
    }
    for name, (obs, message) in cases.items():
        with pytest.raises(ObservationError, match=message):
            policy.select_action(obs)
    assert issubclass(ObservationError, ValueError)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_policy_times_query_and_queued_steps(trained, live, device):
    result = CliRunner().invoke(main, ["bench-policy", str(trained.run), "--steps", "3", "--warmup", "1",
                                       "--device", device])
    assert result.exit_code == 0, result.output
    assert re.search(r"query step  p50 +[\d.]+ ms +p99 +[\d.]+ ms", result.output), result.output
    assert "queued step p50" in result.output and "peak memory" in result.output
    assert f"on {device}" in result.output
    if device != "cpu":
        return  # the in-process figures below are the CPU's
    numbers = bench_policy(live, steps=3, warmup=1)
    assert numbers.query_p50_ms > numbers.queued_p50_ms > 0 and numbers.query_p99_ms >= numbers.query_p50_ms
    assert numbers.peak_memory_bytes > 100 * 2**20 and numbers.memory_kind == "process RSS high-water"
    assert json.loads(json.dumps(numbers.to_dict()))["steps"] == 3
