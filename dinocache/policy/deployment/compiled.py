"""The compiled deployment form: AOTInductor kernels and the plain ``torch.export`` program in one ``.pt2``.

A ``torch.export`` program run through ``.module()`` executes eagerly, kernel by kernel; at batch 1 a
ViT's few hundred small kernels are each shorter than their launch, so the query is launch-bound.
AOTInductor (``torch._inductor``) compiles the program ahead of time into a shared library of fused
kernels for one device, which the robot process loads without tracing or a compiler at start-up.

Compiled kernels are specific: to a device type, a CUDA compute capability or a CPU instruction set,
and the torch build that made them. So one archive (PyTorch's own PT2 archive format, which holds
both) carries the compiled kernels *and* the portable exported program, and the record of what the
kernels were built for sits in the policy's metadata (``export.compiled``). :func:`compiled_mismatch`
says why a machine cannot run them; the runtime then falls back to the program, saying so once.

Compiled kernels can also take their process down (a segmentation fault inside the shared library
is no Python exception), so export runs them for the first time in a child process
(:func:`run_in_child`): a crash costs the check, not the export.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dinocache.errors import DinocacheError

__all__ = ["can_package", "compile_program", "write_package", "compiled_record", "compiled_mismatch",
           "load_compiled", "run_in_child", "checks_graph", "to_cpu", "CompiledCrash", "CompiledHang",
           "CompiledPolicyFallback"]

#: What the child of :func:`run_in_child` runs: load the package as a robot process does, answer the
#: inputs, save the output (:func:`dinocache.policy.deployment.runtime.answer_in_child`).
CHILD_PROGRAM = "from dinocache.policy.deployment.runtime import answer_in_child; answer_in_child()"

#: What the child writes to stderr as it gets through loading and the first query, so that a crash
#: can be placed.
CHILD_STAGES = {"loaded": "while running its first query", "answered": "after answering"}


class CompiledPolicyFallback(UserWarning):
    """A compiled policy's kernels do not fit this machine (or crashed it); its plain program runs instead."""


class CompiledCrash(DinocacheError):
    """The compiled kernels killed the process that ran them (a signal, not an exception).

    ``log`` is the end of that process's stderr: what torch said last and, for a fatal signal, the
    Python frames faulthandler printed, which place the crash (loading, capture, replay).
    """

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class CompiledHang(CompiledCrash):
    """The compiled kernels did not answer in time; the process running them was stopped."""


def can_package() -> bool:
    """Whether this torch writes PT2 archives that hold both forms (torch >= 2.8; LeRobot pins < 2.8)."""
    try:
        from torch.export.pt2_archive._package import package_pt2  # noqa: F401
    except ImportError:
        return False
    return True


def _package_api() -> Callable[..., Any]:
    if not can_package():
        raise DinocacheError(f"--compile needs torch >= 2.8 (this is {torch.__version__}); "
                             "export with --no-compile")
    from torch.export.pt2_archive._package import package_pt2

    return package_pt2


def compile_program(program: torch.export.ExportedProgram) -> list[Any]:
    """AOTInductor's files for ``program`` (for the device its tensors are on), ready to package."""
    args, kwargs = program.example_inputs
    try:
        return torch._inductor.aot_compile(program.module(), args, kwargs, options={"aot_inductor.package": True})
    except Exception as err:  # noqa: BLE001 - the compiler raises many types; the user needs the gist
        cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DinocacheError(f"AOTInductor could not compile the policy ({type(err).__name__}: {cause}); "
                             "--no-compile writes the plain torch.export program") from err


def write_package(path: Path, program: torch.export.ExportedProgram, aoti_files: list[Any],
                  extra_files: dict[str, str]) -> None:
    """One PT2 archive with the exported program, the compiled kernels and ``extra_files``."""
    _package_api()(str(path), exported_programs=program, aoti_files=aoti_files, extra_files=extra_files)


def compiled_record(path: Path) -> dict[str, Any]:
    """What the kernels in the package at ``path`` were built for (AOTInductor's own metadata, plus torch)."""
    with zipfile.ZipFile(path) as archive:
        entry = next((n for n in archive.namelist() if n.endswith("wrapper_metadata.json")), None)
        built = json.loads(archive.read(entry)) if entry else {}
    return {"device": built.get("AOTI_DEVICE_KEY"), "compute_capability": built.get("AOTI_COMPUTE_CAPABILITY") or None,
            "cpu_isa": built.get("AOTI_CPU_ISA") or None, "platform": f"{platform.system().lower()}-{platform.machine()}",
            "torch": torch.__version__}


def _cpu_isas() -> set[str]:
    from torch._inductor import cpu_vec_isa

    return {token for isa in cpu_vec_isa.valid_vec_isa_list() for token in str(isa).upper().split()}


def compiled_mismatch(record: dict[str, Any], device: torch.device) -> str | None:
    """Why this machine cannot run kernels built as ``record`` says on ``device``; None when it can."""
    here = f"{platform.system().lower()}-{platform.machine()}"
    if record.get("platform") != here:
        return f"built on {record.get('platform')}, this is {here}"
    if record.get("device") != device.type:
        return f"built for {record.get('device')}, loading on {device.type}"
    if record.get("torch", "").split("+")[0] != torch.__version__.split("+")[0]:
        return f"built with torch {record.get('torch')}, this is torch {torch.__version__}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if record.get("compute_capability") not in (None, f"{major}{minor}"):
            return (f"built for compute capability {record['compute_capability']}, "
                    f"{torch.cuda.get_device_name(device)} is {major}{minor}")
    elif record.get("cpu_isa"):
        missing = set(record["cpu_isa"].split()) - _cpu_isas()
        if missing:
            return f"built for CPU instructions {record['cpu_isa']}, this CPU lacks {' '.join(sorted(missing))}"
    return None


def load_compiled(path: str | os.PathLike, device: torch.device, single_threaded: bool = False) -> Callable[..., Any]:
    """The compiled kernels of ``path`` as a callable on ``device`` (same inputs as the fused policy).

    ``single_threaded`` drops AOTInductor's own thread synchronisation, which CUDA graph capture needs.
    """
    index = device.index if device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded, device_index=index)


def checks_graph(device: torch.device) -> bool:
    """Whether the runtime replays queries on ``device`` as a CUDA graph, so the check must too."""
    return device.type == "cuda"


def run_in_child(path: str | os.PathLike, inputs: tuple, device: torch.device, timeout: float = 180.0,
                 cuda_graph: bool = False) -> Any:
    """The compiled kernels of ``path`` run on ``inputs`` (nested tuples / lists of tensors) on ``device``
    as a robot process runs them (with ``cuda_graph``: loaded for graph capture, replayed as a CUDA
    graph), in a child process; their output on the CPU.

    Raises:
        CompiledCrash: the child died of a signal (SIGSEGV, SIGABRT ...).
        CompiledHang: it hung past ``timeout``; then SIGABRT makes faulthandler say where. Loading and
            one query take seconds, a minute for the largest backbones on a CPU; the default leaves
            room, and stays under the step limits of ``benchmarks/gpu_check.sh``, so a hang there is
            reported, not cut off.
        DinocacheError: it raised; the message ends with the child's last error line.
    """
    with tempfile.TemporaryDirectory(prefix="dinocache-compiled-") as tmp:
        request, answer = Path(tmp, "inputs.pt"), Path(tmp, "output.pt")
        torch.save({"path": str(path), "device": str(device), "cuda_graph": cuda_graph, "inputs": to_cpu(inputs)},
                   request)
        with subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", CHILD_PROGRAM, str(request), str(answer)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
            try:
                _, stderr = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGABRT)  # faulthandler prints where it hangs, then the process ends
                try:
                    _, stderr = child.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    _, stderr = child.communicate()
                raise CompiledHang(f"the compiled kernels did not answer within {timeout:.0f} s on {device}",
                                   _tail(stderr)) from None
        if child.returncode < 0:
            name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else ""
            reached = [stage for marker, stage in CHILD_STAGES.items() if f"dinocache-child: {marker}" in stderr]
            raise CompiledCrash(f"the compiled kernels crashed the process running them on {device} "
                                f"({name or 'signal'} {-child.returncode}, "
                                f"{reached[-1] if reached else 'while loading the package'})", _tail(stderr))
        if child.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            raise DinocacheError(f"the compiled kernels failed on {device}: {lines[-1] if lines else child.returncode}")
        return torch.load(answer, weights_only=True)


def _tail(stderr: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a child's stderr."""
    return "\n".join(stderr.rstrip().splitlines()[-lines:])


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested in lists and tuples) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
