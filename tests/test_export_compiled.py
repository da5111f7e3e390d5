"""``dinocache export --compile``: AOTInductor kernels packaged with the plain program, checked in a child
process, and every way they can fail to run (another device's build, a crash, a crash only under a
CUDA graph, a hang) ending in the plain program or in one clear error.

Every test reads the run the ``trained`` fixture builds once per test run (tests/_export.py). A real
compile takes most of a minute on 2 cores: the CPU's one is made once, by :func:`compiled_export`, and
the tests that run kernels read it. These tests live apart from the other export tests so that a second
pytest-xdist worker can take them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dinocache.cli import main
from dinocache.errors import DinocacheError
from dinocache.policy.deployment import compiled
from dinocache.policy.deployment import export as export_module
from dinocache.policy.deployment.compiled import can_package
from dinocache.policy.deployment.export import export_policy
from dinocache.policy.deployment.metadata import read_policy_metadata, rewrite_pt2_metadata
from dinocache.policy.deployment.runtime import CompiledPolicyFallback, load_policy
from dinocache.policy.model.integrity import sealed

sys.path.insert(0, str(Path(__file__).parent))
from _devices import DEVICES, needs_cuda  # noqa: E402
from _export import DTYPE_ATOL, chunk, observations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: How far the compiled kernels may be from the plain program in bfloat16 (action units; 0.0014 measured): both round to
#: bfloat16, at different places.
KERNELS_ATOL = 0.02


def _with_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of the .pt2 archive ``src`` whose dinocache metadata went through ``edit`` (other entries as they are)."""
    shutil.copy(src, dst)
    meta = read_policy_metadata(src)  # its digest checked and removed
    edit(meta)
    rewrite_pt2_metadata(dst, json.dumps(sealed(meta)))  # sealed again, as export writes it
    return dst


#: The check's child as export starts it, except that it dies of a real SIGSEGV once the package is
#: loaded when asked to replay the kernels as a CUDA graph (as the H200's first compiled policy died).
CRASH_UNDER_A_GRAPH = ("import faulthandler, sys, torch\n"
                       "if torch.load(sys.argv[1], weights_only=True)['cuda_graph']:\n"
                       "    print('dinocache-child: loaded', file=sys.stderr, flush=True)\n"
                       "    faulthandler._sigsegv()\n" + compiled.CHILD_PROGRAM)
#: What export warns when that child dies under the graph on ``device``.
GRAPH_CRASH_WARNING = (r"crashed the process running them on {device}(:0)? \(SIGSEGV 11, while running its first "
                       r"query\) replaying them as a CUDA graph; checking them without a graph")


@pytest.fixture(scope="module")
def compiled_export(trained, tmp_path_factory) -> SimpleNamespace:
    """The trained run exported with ``compile=True`` on the CPU, in bfloat16 as policies are compiled on
    CUDA (AOTInductor meets the autocast regions too), made once for this module. Its check is made to
    ask for a CUDA graph, as on CUDA, and its child dies of a real SIGSEGV under the graph
    (:data:`CRASH_UNDER_A_GRAPH`): export checks the kernels once more without the graph and keeps
    them. ``summary`` is what the command line prints, ``warnings`` what export warned; ``refusal`` the
    one line where this torch cannot package kernels (the ``--compile`` option itself is run by
    :func:`test_compiled_kernels_that_crash_their_process_leave_the_plain_program`)."""
    out = tmp_path_factory.mktemp("compiled") / "c.pt2"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch.setattr(compiled, "CHILD_PROGRAM", CRASH_UNDER_A_GRAPH)
            patch.setattr(export_module, "checks_graph", lambda device: True)
            result = export_policy(trained.run, out, dtype="bfloat16", compile=True, progress=False)
    except DinocacheError as error:
        return SimpleNamespace(path=out, refusal=str(error))
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(path=out, refusal=None, summary=result.format_text(),
                           warnings=[str(w.message) for w in caught if issubclass(w.category, CompiledPolicyFallback)])


@pytest.mark.slow
def test_compiled_pt2_runs_its_kernels_and_falls_back_where_they_do_not_fit(trained, eager, compiled_export, tmp_path):
    """``--compile``: AOTInductor kernels and the plain program in one archive. Here the kernels run
    (checked against the eager policy at export and again here, and against the package's own plain
    program); a package whose kernels were built for another device (a CUDA build, as its record says)
    runs its program instead, saying why once."""
    if not can_package():  # torch < 2.8, as LeRobot pins it: one clear line, and no file
        assert "--compile needs torch >= 2.8" in compiled_export.refusal and not compiled_export.path.exists()
        pytest.skip(f"AOTInductor packages need torch >= 2.8 (this is {torch.__version__}); the refusal was checked")
    assert "max |AOTInductor for cpu - eager|" in compiled_export.summary
    path = compiled_export.path
    meta = read_policy_metadata(path)
    record = meta["export"]["compiled"]
    assert record["device"] == "cpu" and record["torch"] == torch.__version__ and record["cpu_isa"]
    assert meta["export"]["trace_max_abs_diff"] <= meta["export"]["trace_tolerance"]
    # Every op runs as a generated kernel or through a C shim: none goes through AOTInductor's proxy
    # executor (the path of the antialiased resize just before the H200's compiled policy crashed).
    with zipfile.ZipFile(path) as archive:
        wrappers = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp")]
    assert wrappers and not any("proxy_executor_call_function" in source for source in wrappers)

    obs = observations(trained, 3)
    live = load_policy(path)
    assert live.metadata["runtime"] == {"backend": "aoti", "cuda_graph": False}
    kernels = []
    for o in obs:
        kernels.append(live.select_action(o))
        np.testing.assert_allclose(kernels[-1], chunk(eager, o)[0].numpy(), rtol=0, atol=DTYPE_ATOL["bfloat16"])
        live.reset()

    def built_for_a_gpu(meta: dict) -> None:
        meta["export"]["compiled"].update(device="cuda", compute_capability="90", cpu_isa=None)

    foreign = _with_metadata(path, tmp_path / "gpu.pt2", built_for_a_gpu)
    with pytest.warns(CompiledPolicyFallback, match=r"gpu.pt2: not running its compiled kernels \(built for cuda, "
                                                    r"loading on cpu\); running the plain torch.export program"):
        fallback = load_policy(foreign)
    assert fallback.metadata["runtime"]["backend"] == "program"
    for o, answer in zip(obs, kernels):  # the same bfloat16 arithmetic, fused into other kernels
        np.testing.assert_allclose(fallback.select_action(o), answer, rtol=0, atol=KERNELS_ATOL)
        fallback.reset()

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


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernels_that_crash_under_a_cuda_graph_run_without_one(trained, eager, device, compiled_export,
                                                                         tmp_path, monkeypatch):
    """Kernels whose check dies under a CUDA graph are checked once more launched one by one; passing,
    they are kept, the record says ``cuda_graph: False`` and why, and the runtime runs them without a
    graph unless asked for one. On the CPU: the module's export (:func:`compiled_export`); on CUDA an
    export of its own, its check's child crashing under the graph alike."""
    if not can_package():
        pytest.skip(f"AOTInductor packages need torch >= 2.8 (this is {torch.__version__})")
    if device == "cpu":
        path, summary, said = compiled_export.path, compiled_export.summary, compiled_export.warnings
    else:
        monkeypatch.setattr(compiled, "CHILD_PROGRAM", CRASH_UNDER_A_GRAPH)
        with pytest.warns(CompiledPolicyFallback) as caught:
            result = export_policy(trained.run, tmp_path / "c.pt2", device=device, dtype="bfloat16", compile=True,
                                   progress=False)
        path, summary, said = result.path, result.format_text(), [str(w.message) for w in caught]
    assert any(re.search(GRAPH_CRASH_WARNING.format(device=device), message) for message in said), said
    meta = read_policy_metadata(path)
    record = meta["export"]["compiled"]
    assert record["device"] == device and record["cuda_graph"] is False and "SIGSEGV" in record["cuda_graph_failed"]
    assert "Fatal Python error: Segmentation fault" in record["cuda_graph_failed_log"]
    assert "compiled    yes, without a CUDA graph: the compiled kernels crashed" in summary
    assert meta["export"]["trace_max_abs_diff"] <= meta["export"]["trace_tolerance"]

    live = load_policy(path, device=device)
    assert live.metadata["runtime"] == {"backend": "aoti", "cuda_graph": False}
    obs = observations(trained, 1)[0]
    np.testing.assert_allclose(live.select_action(obs), chunk(eager, obs)[0].numpy(), rtol=0,
                               atol=DTYPE_ATOL["bfloat16"])
    if device == "cuda":  # asked for explicitly, the graph is tried all the same
        assert load_policy(path, device=device, cuda_graph=True).metadata["runtime"]["cuda_graph"] is True


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

