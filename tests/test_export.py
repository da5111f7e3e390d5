"""Stage three end to end on real files: a generated dataset with real video, a real extraction, a few
training steps, then the fused policy: export (.pt2 and .onnx), its parity check, the live runtime,
`bench-policy`.

Everything is built once per module (a ViT-S/14 with random weights at 56 px, a tiny head, two
cameras, an environment state, CLS tokens on) so the whole file runs in about a minute on 2 cores.
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
from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.encoders.record import WeightsRecord
from dinocache.errors import BackboneError, DatasetError, DinocacheError
from dinocache.pipeline.extract import ExtractConfig, extract
from dinocache.pipeline.store import FeatureStore
from dinocache.policy.deployment import compiled
from dinocache.policy.deployment import export as export_module
from dinocache.policy.deployment.bench import bench_policy
from dinocache.policy.deployment.compiled import can_package
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.fused import FusedPolicy, build_fused_policy
from dinocache.policy.deployment.metadata import read_policy_metadata
from dinocache.policy.deployment.parity import ParityError, check_parity, open_run_store, verification_frames
from dinocache.policy.deployment.runtime import CompiledPolicyFallback, ObservationError, load_policy
from dinocache.policy.model.integrity import file_record, read_json, sealed, write_json
from dinocache.policy.model.provenance import check_weights
from dinocache.policy.training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_encoders_weights import _official_dinov2, _timm_model  # noqa: E402
from test_train import TINY  # noqa: E402
from _devices import DEVICES, needs_cuda  # noqa: E402

TOP, WRIST = "observation.images.top", "observation.images.wrist"
STATE, ENV = "observation.state", "observation.environment_state"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """dataset -> `extract` (ViT-S/14, random weights, 56 px, float16 cache) -> 30 training steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    dataset = write_synthetic_dataset(root / "data", num_episodes=4, episode_length=16, image_size=(48, 64),
                                      cameras=("top", "wrist"), with_env_state=True, seed=0)
    extract(ExtractConfig(dataset=dataset, out=root / "f.zarr", backbone="dinov2_vits14", weights="random",
                          image_size="56", unit_frames=16, chunk_frames=8, batch_size=8, progress=False))
    train(TrainConfig(store=root / "f.zarr", out=root / "run", steps=30, batch_size=8,
                      act=dict(TINY, use_cls_token=True), val_episodes="none", save_every=1000, log_every=10,
                      progress=False))
    return SimpleNamespace(root=root, dataset=dataset, store=FeatureStore(root / "f.zarr"), run=root / "run")


@pytest.fixture(scope="module")
def eager(trained) -> FusedPolicy:
    return build_fused_policy(trained.run)


@pytest.fixture(scope="module")
def pt2(trained) -> SimpleNamespace:
    """The run exported through the command line, as a user would (``--out`` without a suffix: the
    format's is added)."""
    result = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(trained.root / "policy"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    out = trained.root / "policy.pt2"
    assert out.is_file() and not (trained.root / "policy").exists() and str(out) in result.output, result.output
    return SimpleNamespace(path=out, output=result.output)


@pytest.fixture(scope="module")
def live(pt2):
    """The exported .pt2 loaded once (``torch.export.load`` takes seconds); tests derive their own
    action selection from it with ``with_action_selection``."""
    return load_policy(pt2.path)


def observations(trained, steps: int) -> list[dict]:
    """``steps`` distinct observations: the store's kept frames (cycled) with those rows' state."""
    rows, frames = trained.store.verification_frames()
    state, env = trained.store.read(STATE), trained.store.read(ENV)
    return [{TOP: frames[TOP][t % len(rows)], WRIST: frames[WRIST][t % len(rows)],
             STATE: state[rows[t % len(rows)]], ENV: env[rows[t % len(rows)]]} for t in range(steps)]


def chunk(eager: FusedPolicy, obs: dict) -> torch.Tensor:
    """The eager fused policy's ``(chunk, A)`` action chunk for one observation."""
    with torch.no_grad():
        return eager([torch.from_numpy(obs[TOP])[None], torch.from_numpy(obs[WRIST])[None]],
                     torch.from_numpy(obs[STATE])[None], torch.from_numpy(obs[ENV])[None])[0]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and "tmp" in p.name]


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


#: Largest difference (in the actions' own units) allowed between a policy computing in ``dtype`` and
#: the float32 eager policy on the CPU: kernel noise at float32, the half-precision rounding otherwise.
DTYPE_ATOL = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_on_the_device_serves_numpy_frames_there(trained, eager, device, dtype, tmp_path):
    """Trace, parity check, trace check and the live runtime on ``device``: everything that meets there
    (the normaliser's statistics, the traced program's actions, frames handed over as numpy) must be on
    one device. On the CPU this runs the same code as on CUDA, autocast regions included."""
    result = export_policy(trained.run, tmp_path / "policy.pt2", device=device, dtype=dtype, progress=False)
    assert result.parity.passed and result.trace_max_abs_diff <= result.metadata["export"]["trace_tolerance"]
    meta = read_policy_metadata(result.path)
    assert meta["dtype"] == dtype and torch.device(meta["export"]["device"]).type == device
    policy = load_policy(result.path, device=device)
    obs = observations(trained, 2)
    action = policy.select_action(obs[0])  # numpy frames and state, as a robot loop hands them over
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == (4,)
    np.testing.assert_allclose(action, chunk(eager, obs[0])[0].numpy(), rtol=0, atol=DTYPE_ATOL[dtype])
    assert np.isfinite(policy.select_action(obs[1])).all()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_onnx_agrees_with_eager_in_onnxruntime(trained, eager, device, tmp_path):
    import onnxruntime

    result = export_policy(trained.run, tmp_path / "policy.onnx", format="onnx", device=device, progress=False)
    assert result.path.is_file() and not leftovers(tmp_path)
    assert result.max_abs_diff <= result.tolerance and result.trace_max_abs_diff <= 1e-4
    meta = read_policy_metadata(result.path)
    onnx_meta = meta["export"]["onnx"]
    assert onnx_meta["input_names"] == [TOP, WRIST, STATE, ENV]
    assert [(i["name"], i["dtype"], i["shape"]) for i in onnx_meta["inputs"]] == [
        (TOP, "uint8", ["batch", 48, 64, 3]), (WRIST, "uint8", ["batch", 48, 64, 3]),
        (STATE, "float32", ["batch", 4]), (ENV, "float32", ["batch", 2])]
    assert onnx_meta["preprocessing_inside"].startswith("uint8 RGB frames") and "resize to 56x56" in onnx_meta[
        "preprocessing_inside"]
    assert meta["parity"]["max_abs_diff"] == result.max_abs_diff

    obs = observations(trained, 3)
    feed = {TOP: np.stack([o[TOP] for o in obs]), WRIST: np.stack([o[WRIST] for o in obs]),
            STATE: np.stack([o[STATE] for o in obs]), ENV: np.stack([o[ENV] for o in obs])}
    (actions,) = onnxruntime.InferenceSession(str(result.path)).run(None, feed)
    with torch.no_grad():
        expected = eager([torch.from_numpy(feed[TOP]), torch.from_numpy(feed[WRIST])], torch.from_numpy(feed[STATE]),
                         torch.from_numpy(feed[ENV]))
    np.testing.assert_allclose(actions, expected.numpy(), rtol=1e-4, atol=1e-4)
    action = load_policy(result.path, device=device).select_action(obs[0])
    np.testing.assert_allclose(action, expected[0, 0].numpy(), rtol=1e-4, atol=1e-4)



@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_float16_onnx_stores_half_weights_and_acts_as_the_autocast_policy(trained, device, tmp_path):
    import onnx
    import onnxruntime

    result = export_policy(trained.run, tmp_path / "half.onnx", format="onnx", dtype="float16", device=device,
                           progress=False)
    meta = read_policy_metadata(result.path)
    assert meta["dtype"] == "float16" and meta["export"]["onnx"]["precision"].startswith("float16 weights")
    assert 0 < result.trace_max_abs_diff <= meta["export"]["trace_tolerance"] == meta["parity"]["tolerance"]
    graph = onnx.load(str(result.path)).graph
    weight_types = {init.data_type for init in graph.initializer if len(init.dims) == 2 and min(init.dims) >= 16}
    assert weight_types == {onnx.TensorProto.FLOAT16}  # the matrices are stored in half, not cast at run time
    assert [i.type.tensor_type.elem_type for i in graph.input][2:] == [onnx.TensorProto.FLOAT] * 2  # raw state
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    obs = observations(trained, 3)
    feed = {TOP: np.stack([o[TOP] for o in obs]), WRIST: np.stack([o[WRIST] for o in obs]),
            STATE: np.stack([o[STATE] for o in obs]), ENV: np.stack([o[ENV] for o in obs])}
    (actions,) = onnxruntime.InferenceSession(str(result.path)).run(None, feed)
    half = build_fused_policy(trained.run, dtype="float16", device=device)
    with torch.no_grad():
        expected = half([torch.from_numpy(feed[TOP]).to(device), torch.from_numpy(feed[WRIST]).to(device)],
                        torch.from_numpy(feed[STATE]).to(device), torch.from_numpy(feed[ENV]).to(device))
        normalised = [half.normalizer.normalize("action", a) for a in (torch.from_numpy(actions).to(device), expected)]
    assert (normalised[0] - normalised[1]).abs().max().item() <= meta["export"]["trace_tolerance"]


@pytest.mark.slow
def test_bfloat16_onnx_is_checked_by_the_reference_evaluator_where_onnxruntime_cannot_run_it(trained, tmp_path,
                                                                                            monkeypatch):
    """onnxruntime's CPU provider has no bfloat16 kernels, so a bfloat16 graph is checked by ONNX's
    reference evaluator there: written, stored in bfloat16, said so in the summary and the metadata,
    and acting as the eager autocast policy on other observations too. Where neither runs it, nothing
    is written and the one line names both."""
    import onnx
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    result = export_policy(trained.run, tmp_path / "b.onnx", format="onnx", dtype="bfloat16", progress=False)
    meta = read_policy_metadata(result.path)
    runner = meta["export"]["onnx"]["checked_with"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert runner.startswith("onnxruntime")
    else:
        assert runner.startswith("ONNX's reference evaluator") and f"in {runner}" in result.format_text()
    assert 0 < result.trace_max_abs_diff <= meta["export"]["trace_tolerance"] == meta["parity"]["tolerance"]
    graph = onnx.load(str(result.path)).graph
    weight_types = {init.data_type for init in graph.initializer if len(init.dims) == 2 and min(init.dims) >= 16}
    assert weight_types == {onnx.TensorProto.BFLOAT16}

    obs = observations(trained, 5)[2:]  # not the rows the export checked
    feed = {TOP: np.stack([o[TOP] for o in obs]), WRIST: np.stack([o[WRIST] for o in obs]),
            STATE: np.stack([o[STATE] for o in obs]), ENV: np.stack([o[ENV] for o in obs])}
    (actions,) = ReferenceEvaluator(str(result.path)).run(None, feed)
    half = build_fused_policy(trained.run, dtype="bfloat16")
    with torch.no_grad():
        expected = half([torch.from_numpy(feed[TOP]), torch.from_numpy(feed[WRIST])], torch.from_numpy(feed[STATE]),
                        torch.from_numpy(feed[ENV]))
    diff = (half.normalizer.normalize("action", torch.from_numpy(np.asarray(actions, np.float32))) -
            half.normalizer.normalize("action", expected)).abs().max().item()
    assert diff <= meta["export"]["trace_tolerance"]

    def fails(self, *args, **kwargs):
        raise NotImplementedError("no bfloat16 Softmax")

    monkeypatch.setattr(ReferenceEvaluator, "run", fails)
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
        "Could not find an implementation for MatMul(13) node with name 'n0'")))
    with pytest.raises(DinocacheError, match=r"neither onnxruntime .*Could not find an implementation.* nor ONNX's "
                                             r"reference evaluator \(NotImplementedError: no bfloat16 Softmax\) runs the "
                                             r"bfloat16 graph.*nothing was written; --dtype float16 runs everywhere"):
        names = export_module.onnx_input_names(meta)
        export_module._run_onnx(result.path, names, tuple(torch.from_numpy(feed[n]) for n in names), torch.bfloat16)


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


def _with_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of the .pt2 archive ``src`` whose dinocache metadata went through ``edit`` (entries kept as they are)."""
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("extra/dinocache.json"):
                meta = read_policy_metadata(src)  # its digest checked and removed
                edit(meta)
                data = json.dumps(sealed(meta)).encode()  # sealed again, as export writes it
            out.writestr(info, data)
    return dst


@pytest.mark.slow
def test_compiled_pt2_runs_its_kernels_and_falls_back_where_they_do_not_fit(trained, eager, tmp_path):
    """``--compile``: AOTInductor kernels and the plain program in one archive. Here the kernels run
    (checked against the eager policy at export and again here); a package whose kernels were built
    for another device (a CUDA build, as its record says) runs its program instead, saying why once."""
    result = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(tmp_path / "c.pt2"), "--compile",
                                       "--no-progress"])
    if not can_package():  # torch < 2.8, as LeRobot pins it: one clear line, and no file
        assert result.exit_code == 2 and "--compile needs torch >= 2.8" in result.output, result.output
        assert not (tmp_path / "c.pt2").exists()
        pytest.skip(f"AOTInductor packages need torch >= 2.8 (this is {torch.__version__}); the refusal was checked")
    assert result.exit_code == 0, result.output
    assert "max |AOTInductor for cpu - eager|" in result.output
    meta = read_policy_metadata(tmp_path / "c.pt2")
    compiled = meta["export"]["compiled"]
    assert compiled["device"] == "cpu" and compiled["torch"] == torch.__version__ and compiled["cpu_isa"]
    assert meta["export"]["trace_max_abs_diff"] <= meta["export"]["trace_tolerance"]
    # Every op runs as a generated kernel or through a C shim: none goes through AOTInductor's proxy
    # executor (the path of the antialiased resize just before the H200's compiled policy crashed).
    with zipfile.ZipFile(tmp_path / "c.pt2") as archive:
        wrappers = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp")]
    assert wrappers and not any("proxy_executor_call_function" in source for source in wrappers)

    obs = observations(trained, 3)
    live = load_policy(tmp_path / "c.pt2")
    assert live.metadata["runtime"] == {"backend": "aoti", "cuda_graph": False}
    for o in obs:
        np.testing.assert_allclose(live.select_action(o), chunk(eager, o)[0].numpy(), rtol=0, atol=1e-4)
        live.reset()

    def built_for_a_gpu(meta: dict) -> None:
        meta["export"]["compiled"].update(device="cuda", compute_capability="90", cpu_isa=None)

    foreign = _with_metadata(tmp_path / "c.pt2", tmp_path / "gpu.pt2", built_for_a_gpu)
    with pytest.warns(CompiledPolicyFallback, match=r"gpu.pt2: not running its compiled kernels \(built for cuda, "
                                                    r"loading on cpu\); running the plain torch.export program"):
        fallback = load_policy(foreign)
    assert fallback.metadata["runtime"]["backend"] == "program"
    np.testing.assert_allclose(fallback.select_action(obs[0]), chunk(eager, obs[0])[0].numpy(), rtol=0, atol=1e-5)

    refused = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(tmp_path / "c.onnx"), "--compile"])
    assert refused.exit_code != 0 and "--compile makes an AOTInductor .pt2" in refused.output


@pytest.mark.slow
def test_compiled_kernels_that_crash_their_process_leave_the_plain_program(trained, eager, tmp_path, monkeypatch):
    """Export runs the compiled kernels for the first time in a child process. One that dies of a real
    SIGSEGV (as a faulty kernel library does) costs the compiled form, not the export: the plain
    program is written and checked, and the summary and the metadata say why."""
    if not can_package():
        pytest.skip(f"AOTInductor packages need torch >= 2.8 (this is {torch.__version__})")
    # the child says it got as far as the H200's did (the package loaded), then dies of a real SIGSEGV;
    # it never reads the kernels, so none are compiled for it (the compile has a test of its own)
    monkeypatch.setattr(compiled, "CHILD_PROGRAM", "import faulthandler, sys; "
                        "print('dinocache-child: loaded', file=sys.stderr, flush=True); faulthandler._sigsegv()")
    monkeypatch.setattr(export_module, "compile_program", lambda program: [])
    out = tmp_path / "c.pt2"
    result = CliRunner().invoke(main, ["export", str(trained.run), "--out", str(out), "--compile", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert ("compiled    no: the compiled kernels crashed the process running them on cpu (SIGSEGV 11, while running "
            "its first query); the plain program was written") in result.output
    assert "max |pt2 - eager|" in result.output
    meta = read_policy_metadata(out)
    assert meta["export"]["compiled"] is None and "SIGSEGV" in meta["export"]["compile_failed"]
    # the child's last words travel with the file: its marker, then faulthandler's report of the fault
    log = meta["export"]["compile_failed_log"]
    assert log.index("dinocache-child: loaded") < log.index("Fatal Python error: Segmentation fault"), log
    live = load_policy(out)
    assert live.metadata["runtime"]["backend"] == "program"
    obs = observations(trained, 1)[0]
    np.testing.assert_allclose(live.select_action(obs), chunk(eager, obs)[0].numpy(), rtol=0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt2"]  # no temporary left behind


#: The check's child as export starts it, except that it dies of a real SIGSEGV once the package is
#: loaded when asked to replay the kernels as a CUDA graph (as the H200's first compiled policy died).
CRASH_UNDER_A_GRAPH = ("import faulthandler, sys, torch\n"
                       "if torch.load(sys.argv[1], weights_only=True)['cuda_graph']:\n"
                       "    print('dinocache-child: loaded', file=sys.stderr, flush=True)\n"
                       "    faulthandler._sigsegv()\n" + compiled.CHILD_PROGRAM)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernels_that_crash_under_a_cuda_graph_run_without_one(trained, eager, device, tmp_path,
                                                                         monkeypatch):
    """Kernels whose check dies under a CUDA graph are checked once more launched one by one; passing,
    they are kept, the record says ``cuda_graph: False`` and why, and the runtime runs them without a
    graph unless asked for one. On the CPU the check is made to ask for the graph as on CUDA. In
    bfloat16, as ``bench_policy.py`` compiles on CUDA: AOTInductor meets the autocast regions too."""
    if not can_package():
        pytest.skip(f"AOTInductor packages need torch >= 2.8 (this is {torch.__version__})")
    monkeypatch.setattr(compiled, "CHILD_PROGRAM", CRASH_UNDER_A_GRAPH)
    monkeypatch.setattr(export_module, "checks_graph", lambda device: True)
    with pytest.warns(CompiledPolicyFallback, match=rf"crashed the process running them on {device}(:0)? \(SIGSEGV 11, "
                      r"while running its first query\) replaying them as a CUDA graph; checking them without a graph"):
        result = export_policy(trained.run, tmp_path / "c.pt2", device=device, dtype="bfloat16", compile=True,
                               progress=False)
    record = read_policy_metadata(result.path)["export"]["compiled"]
    assert record["device"] == device and record["cuda_graph"] is False and "SIGSEGV" in record["cuda_graph_failed"]
    assert "Fatal Python error: Segmentation fault" in record["cuda_graph_failed_log"]
    assert "compiled    yes, without a CUDA graph: the compiled kernels crashed" in result.format_text()
    assert result.trace_max_abs_diff <= result.metadata["export"]["trace_tolerance"]

    live = load_policy(result.path, device=device)
    assert live.metadata["runtime"] == {"backend": "aoti", "cuda_graph": False}
    obs = observations(trained, 1)[0]
    np.testing.assert_allclose(live.select_action(obs), chunk(eager, obs)[0].numpy(), rtol=0,
                               atol=DTYPE_ATOL["bfloat16"])
    if device == "cuda":  # asked for explicitly, the graph is tried all the same
        assert load_policy(result.path, device=device, cuda_graph=True).metadata["runtime"]["cuda_graph"] is True


def test_kernels_that_crash_with_and_without_a_graph_say_both(monkeypatch, tmp_path):
    """Where the retry without a graph dies too, the one error says both deaths, and its log holds both
    children's last words."""
    monkeypatch.setattr(compiled, "CHILD_PROGRAM", "import faulthandler, sys; "
                        "print('dinocache-child: loaded', file=sys.stderr, flush=True); faulthandler._sigsegv()")
    monkeypatch.setattr(export_module, "checks_graph", lambda device: True)
    record: dict = {}
    with pytest.warns(CompiledPolicyFallback), pytest.raises(compiled.CompiledCrash) as caught:
        export_module._check_in_child(tmp_path / "p.pt2", (torch.zeros(1),), torch.device("cpu"), record)
    assert re.fullmatch(r"the compiled kernels crashed .*\(SIGSEGV 11, while running its first query\), and the "
                        r"compiled kernels crashed .*SIGSEGV 11.* as a CUDA graph", str(caught.value)), caught.value
    assert caught.value.log.count("Fatal Python error: Segmentation fault") == 2
    assert "--- as a CUDA graph ---" in caught.value.log and record["cuda_graph"] is False


def test_compiled_kernels_that_hang_are_stopped_and_say_where(monkeypatch, tmp_path):
    """A check whose child hangs is stopped after its timeout with SIGABRT, so that faulthandler
    reports the frame it hung in, and the parent raises CompiledCrash with that report."""
    monkeypatch.setattr(compiled, "CHILD_PROGRAM", "import sys, time\n"
                        "print('dinocache-child: loaded', file=sys.stderr, flush=True)\n"
                        "def first_query():\n    time.sleep(600)\nfirst_query()")
    with pytest.raises(compiled.CompiledCrash, match=r"did not answer within 3 s on cpu") as caught:
        compiled.run_in_child(tmp_path / "p.pt2", (torch.zeros(1),), torch.device("cpu"), timeout=3)
    assert "dinocache-child: loaded" in caught.value.log
    assert "Fatal Python error: Aborted" in caught.value.log and "in first_query" in caught.value.log, caught.value.log


@needs_cuda
def test_cuda_graph_replay_gives_the_actions_of_plain_launches(trained, tmp_path):
    """The runtime's batch-1 CUDA graph (captured once, inputs copied into static buffers, replayed)
    against the same compiled policy launched kernel by kernel, over distinct observations."""
    path = export_policy(trained.run, tmp_path / "policy.pt2", device="cuda", progress=False).path
    graphed = load_policy(path, device="cuda", temporal_ensemble_coeff=0.1)
    plain = load_policy(path, device="cuda", temporal_ensemble_coeff=0.1, cuda_graph=False)
    assert graphed.metadata["runtime"] == {"backend": "aoti", "cuda_graph": True}
    for o in observations(trained, 6):
        np.testing.assert_allclose(graphed.select_action(o), plain.select_action(o), rtol=0, atol=1e-5)
    assert graphed.queries == plain.queries == 6


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
    store = open_run_store(eager)
    from_dataset = verification_frames(store)
    assert from_dataset.origin.startswith("dataset") and len(from_dataset.rows) == 8
    reference = check_parity(eager, store, from_dataset)
    assert reference.passed

    other = write_synthetic_dataset(tmp_path / "other", num_episodes=4, episode_length=16, image_size=(48, 64),
                                    cameras=("top", "wrist"), with_env_state=True, seed=1)
    with pytest.raises(DatasetError, match="not the dataset the store was extracted from"):
        verification_frames(store, dataset=other)

    no_frames = tmp_path / "old.zarr"  # a store from before stores kept frames
    shutil.copytree(store.path, no_frames)
    shutil.rmtree(no_frames / "verification")
    moved = trained.dataset.with_name("moved")
    trained.dataset.rename(moved)
    try:
        kept = verification_frames(store)
        assert kept.origin == "store's kept frames"
        np.testing.assert_array_equal(kept.rows, from_dataset.rows)
        for a, b in zip(kept.images, from_dataset.images):  # the very frames extraction decoded
            np.testing.assert_array_equal(a, b)
        report = check_parity(eager, store, kept)
        assert report.passed and report.max_abs_diff == reference.max_abs_diff
        with pytest.raises(DinocacheError, match=r"is not there.*keeps no raw frames.*--dataset PATH.*--skip-verify"):
            verification_frames(FeatureStore(no_frames))
    finally:
        moved.rename(trained.dataset)


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
    with pytest.raises(DinocacheError, match=r"no checkpoint 'best' \(the run has: 000030, last\)"):
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
