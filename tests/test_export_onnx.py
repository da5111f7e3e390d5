"""The fused policy as ONNX, end to end: float32 checked in onnxruntime, float16 stored in half, bfloat16
checked by ONNX's reference evaluator where onnxruntime has no kernels for it.

Every test reads the run the ``trained`` fixture builds once per test run (tests/_export.py); each
export takes a few seconds (torch's ONNX exporter), so they live apart from the .pt2 tests and a
second pytest-xdist worker can take them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinocache.errors import DinocacheError
from dinocache.policy.deployment import export as export_module
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.fused import build_fused_policy
from dinocache.policy.deployment.metadata import read_policy_metadata
from dinocache.policy.deployment.runtime import load_policy

sys.path.insert(0, str(Path(__file__).parent))
from _devices import DEVICES  # noqa: E402
from _export import ENV, STATE, TOP, WRIST, leftovers, observations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_onnx_agrees_with_eager_in_onnxruntime(trained, eager, exported, device, tmp_path):
    """The float32 graph; on the CPU the one exported once per test run (conftest.py), which the fault
    campaign damages copies of."""
    import onnxruntime

    if device == "cpu":
        path = exported.onnx
    else:
        path = export_policy(trained.run, tmp_path / "policy.onnx", format="onnx", device=device, progress=False).path
    assert path.is_file() and not leftovers(path.parent)
    meta = read_policy_metadata(path)
    assert meta["parity"]["passed"] and meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"]
    assert meta["export"]["trace_max_abs_diff"] <= 1e-4
    onnx_meta = meta["export"]["onnx"]
    assert onnx_meta["input_names"] == [TOP, WRIST, STATE, ENV]
    assert [(i["name"], i["dtype"], i["shape"]) for i in onnx_meta["inputs"]] == [
        (TOP, "uint8", ["batch", 48, 64, 3]), (WRIST, "uint8", ["batch", 48, 64, 3]),
        (STATE, "float32", ["batch", 4]), (ENV, "float32", ["batch", 2])]
    assert onnx_meta["preprocessing_inside"].startswith("uint8 RGB frames") and "resize to 56x56" in onnx_meta[
        "preprocessing_inside"]

    obs = observations(trained, 3)
    feed = {TOP: np.stack([o[TOP] for o in obs]), WRIST: np.stack([o[WRIST] for o in obs]),
            STATE: np.stack([o[STATE] for o in obs]), ENV: np.stack([o[ENV] for o in obs])}
    (actions,) = onnxruntime.InferenceSession(str(path)).run(None, feed)
    with torch.no_grad():
        expected = eager([torch.from_numpy(feed[TOP]), torch.from_numpy(feed[WRIST])], torch.from_numpy(feed[STATE]),
                         torch.from_numpy(feed[ENV]))
    np.testing.assert_allclose(actions, expected.numpy(), rtol=1e-4, atol=1e-4)
    action = load_policy(path, device=device).select_action(obs[0])
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

