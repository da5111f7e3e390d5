"""Stage three: ``dinocache export`` writes the fused policy as one self-describing file.

Order of work, each step able to stop the export before anything is written:

1. rebuild the fused policy from the run's checkpoint and the store's recorded backbone provenance
   (weights checked against the recorded hashes, :mod:`dinocache.policy.model.provenance`);
2. check it against the cache (:mod:`dinocache.policy.deployment.parity`): the fused actions on raw frames must
   match the head's actions on the cached features within a tolerance set by the cache dtype;
3. trace it: ``torch.export`` (a ``.pt2`` program, batch size dynamic) or torch's ONNX exporter;
4. run the traced program (the ``.pt2`` module, or the ``.onnx`` file in onnxruntime) on the check's
   frames and compare with the eager policy;
5. write the file under a temporary name with its metadata (:mod:`dinocache.policy.deployment.metadata`), which
   holds the digest of the file's content and its own (:mod:`dinocache.policy.model.integrity`: every
   reader checks them), and rename it into place. A failed step leaves no file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinocache.atomic import check_room, temporary_name
from dinocache.devices import resolve_device
from dinocache.errors import DinocacheError
from dinocache.policy.deployment.compiled import (
    CompiledCrash, CompiledHang, CompiledPolicyFallback, can_package, checks_graph, compile_program, compiled_record,
    run_in_child, write_package,
)
from dinocache.policy.deployment.formats import FORMATS
from dinocache.policy.deployment.fused import FusedPolicy, build_fused_policy, parse_dtype
from dinocache.policy.deployment.metadata import (
    METADATA_NAME, ONNX_METADATA_KEY, policy_metadata, rewrite_pt2_metadata,
)
from dinocache.policy.deployment.parity import ParityError, ParityReport, check_run, rounding_tolerance
from dinocache.policy.model.checkpoint import LAST
from dinocache.policy.model.config import ACTION, OBS_ENV_STATE, OBS_STATE
from dinocache.policy.model.integrity import CONTENT_KEY, archive_sha256, onnx_sha256, sealed

__all__ = ["ExportResult", "export_policy", "FORMATS", "TRACE_TOLERANCE", "onnx_input_names"]

#: Largest allowed difference (normalised action units) between the traced program and the eager
#: policy at float32: tracing changes no arithmetic, so only kernel-level noise is allowed.
TRACE_TOLERANCE = 1e-4
#: ONNX opset by compute dtype where the exporter's default will not do: bfloat16 Conv, LayerNormalization
#: and friends exist from opset 22 on.
_ONNX_OPSETS = {torch.bfloat16: 22}
#: Example batch size for tracing; the batch axis is exported dynamic (1 and up work).
_EXAMPLE_BATCH = 2


@dataclass
class ExportResult:
    """What ``export_policy`` wrote and measured (differences in normalised action units)."""

    path: Path
    format: str
    max_abs_diff: float | None  # fused vs head on the cache (None: exported unverified)
    tolerance: float | None
    trace_max_abs_diff: float  # the written program vs the eager fused policy
    metadata: dict[str, Any] = field(repr=False)
    parity: ParityReport | None = None
    seconds: float = 0.0

    def format_text(self) -> str:
        size = self.path.stat().st_size / 2**20 if self.path.exists() else 0.0
        lines = [f"policy      {self.path} ({self.format}, {size:.1f} MiB, {self.metadata['dtype']})",
                 f"inputs      {', '.join(f'{c} {h}x{w}' for c, (h, w) in self.metadata['image_size'].items())}; "
                 f"state {self.metadata['state_dim']}" +
                 (f"; env state {self.metadata['env_state_dim']}" if self.metadata['env_state_dim'] else ""),
                 f"outputs     {self.metadata['chunk_size']} x {self.metadata['action_dim']} actions at "
                 f"{self.metadata['fps']} fps"]
        lines.append(self.parity.format() if self.parity else "parity      NOT VERIFIED (--skip-verify)")
        compiled = self.metadata["export"].get("compiled")
        what = f"AOTInductor for {compiled['device']}" if compiled else self.format
        if self.metadata["export"].get("compile_failed"):
            lines.append(f"compiled    no: {self.metadata['export']['compile_failed']}; the plain program was written")
        elif compiled and compiled.get("cuda_graph") is False:
            lines.append(f"compiled    yes, without a CUDA graph: {compiled['cuda_graph_failed']} replaying them as one")
        runner = self.metadata["export"].get("onnx", {}).get("checked_with")
        lines.append(f"traced      max |{what} - eager| = {self.trace_max_abs_diff:.3g} action std"
                     f"{f' in {runner}' if runner else ''}; {self.seconds:.1f} s")
        return "\n".join(lines)


def onnx_input_names(metadata: dict[str, Any]) -> list[str]:
    """The ONNX graph's inputs: one per camera (its dataset key), then the state (and env state)."""
    return [*metadata["cameras"], OBS_STATE] + ([OBS_ENV_STATE] if metadata["env_state_dim"] else [])


class _FlatInputs(nn.Module):
    """The fused policy with one tensor per input, as ONNX wants them (images first, then state)."""

    def __init__(self, policy: FusedPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.num_cameras = len(policy.cameras)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.policy(list(inputs[:self.num_cameras]), *inputs[self.num_cameras:])


def _example_inputs(policy: FusedPolicy, frames: list[np.ndarray] | None, state: Tensor | None,
                    env: Tensor | None, image_size: dict[str, list[int]], device: torch.device) -> tuple:
    """``(images, state, env)`` of :data:`_EXAMPLE_BATCH` rows: the check's frames, or zeros unverified."""
    n = _EXAMPLE_BATCH
    if frames is None:
        frames = [np.zeros((n, *image_size[camera], 3), np.uint8) for camera in policy.cameras]
        state = torch.zeros(n, policy.inputs.state_dim)
        env = torch.zeros(n, policy.inputs.env_state_dim) if policy.has_env_state else None
    images = [torch.from_numpy(np.ascontiguousarray(f[:n])).to(device) for f in frames]
    return images, state[:n].to(device), None if env is None else env[:n].to(device)


def _all_inputs(images: list[Tensor], state: Tensor, env: Tensor | None) -> tuple:
    return (images, state) if env is None else (images, state, env)


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=4096)


def _dynamic_batch(images: list[Tensor], env: Tensor | None) -> tuple:
    batch = _batch_dim()
    return ([{0: batch}] * len(images), {0: batch}) + (({0: batch},) if env is not None else ())


@contextlib.contextmanager
def _quiet_onnx() -> Iterator[None]:
    """The ONNX exporter and its optimiser log and warn at length about things that are fine."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _normalised_diff(policy: FusedPolicy, a: Tensor, b: Tensor) -> float:
    """Largest difference of two action chunks in normalised units, computed where the normaliser's
    statistics live (the export device): the outputs compared come from anywhere (the traced program
    on the export device, onnxruntime on the host)."""
    device = policy.normalizer.device
    return (policy.normalizer.normalize(ACTION, a.float().to(device)) -
            policy.normalizer.normalize(ACTION, b.float().to(device))).abs().max().item()


def _write_pt2(policy: FusedPolicy, inputs: tuple, eager: Tensor, metadata: dict[str, Any], tmp: Path,
               compile: bool = False) -> float:
    """Trace with ``torch.export``, check the program against ``eager``, save it with its metadata.

    With ``compile`` the program is also compiled by AOTInductor for the export device and both go
    into one archive (:mod:`dinocache.policy.deployment.compiled`); the check then runs the compiled kernels
    loaded back from the written archive, i.e. what a robot process will run, in a child process.
    Kernels that crash that process cost the compiled form, not the export: the same traced program
    is then checked and written alone, and the metadata says why. The plain program too is checked
    as written: saved, loaded back and run.
    """
    images, state, env = inputs
    policy.prepare_export(images)
    with torch.no_grad():
        program = torch.export.export(policy, _all_inputs(images, state, env),
                                      dynamic_shapes=_dynamic_batch(images, env))
    if compile:
        try:
            return _write_compiled(policy, program, inputs, eager, metadata, tmp)
        except CompiledCrash as crash:  # the plain program needs no compiled kernels
            warnings.warn(f"{crash}: writing the plain torch.export program instead (--no-compile skips the "
                          "attempt)", CompiledPolicyFallback, stacklevel=3)
            metadata["export"]["compiled"] = None
            metadata["export"]["compile_failed"] = str(crash)
            metadata["export"]["compile_failed_log"] = crash.log  # the child's last words, for a bug report
    # Checked as written: saved, loaded back as load_policy will, run; then its metadata rewritten with the figure.
    torch.export.save(program, tmp, extra_files={METADATA_NAME: json.dumps(metadata)})
    with torch.no_grad():
        traced = torch.export.load(tmp).module()(*_all_inputs(images, state, env))
    diff = _normalised_diff(policy, traced, eager)
    metadata["export"]["trace_max_abs_diff"] = diff
    _check_trace(diff, metadata, "the torch.export program")
    _save_sealed(lambda text: rewrite_pt2_metadata(tmp, text), lambda: archive_sha256(tmp), metadata, tmp)
    return diff


def _write_compiled(policy: FusedPolicy, program: torch.export.ExportedProgram, inputs: tuple, eager: Tensor,
                    metadata: dict[str, Any], tmp: Path) -> float:
    """The AOTInductor kernels of ``program`` and the program in one archive, checked in a child process."""
    aoti_files = compile_program(program)
    write_package(tmp, program, aoti_files, {METADATA_NAME: json.dumps(metadata)})
    metadata["export"]["compiled"] = record = compiled_record(tmp)
    traced = _check_in_child(tmp, _all_inputs(*inputs), next(policy.parameters()).device, record)
    diff = _normalised_diff(policy, traced, eager)
    metadata["export"]["trace_max_abs_diff"] = diff
    _check_trace(diff, metadata, "the AOTInductor-compiled program")
    _save_sealed(lambda text: rewrite_pt2_metadata(tmp, text), lambda: archive_sha256(tmp), metadata, tmp)
    return diff


def _check_in_child(path: Path, inputs: tuple, device: torch.device, record: dict[str, Any]) -> Tensor:
    """The compiled kernels' answer, run as the runtime will run them (on CUDA, as a CUDA graph).

    Capturing AOTInductor's kernels in a CUDA graph is a younger path than launching them one by one,
    so a crash under the graph is given one more try without it. If the kernels pass then, ``record``
    says ``cuda_graph: False`` (and why), and :func:`~dinocache.policy.deployment.runtime.load_policy` runs them
    without a graph: fused kernels launched one by one still beat the program's eager launches.
    """
    graph = checks_graph(device)
    try:
        return run_in_child(path, inputs, device, cuda_graph=graph)
    except CompiledHang:
        raise  # a second wait of minutes would cost more than the graph-less kernels could return
    except CompiledCrash as crash:
        if not graph:
            raise
        warnings.warn(f"{crash} replaying them as a CUDA graph; checking them without a graph",
                      CompiledPolicyFallback, stacklevel=4)
        record.update(cuda_graph=False, cuda_graph_failed=str(crash), cuda_graph_failed_log=crash.log)
        try:
            return run_in_child(path, inputs, device, cuda_graph=False)
        except CompiledCrash as again:
            raise CompiledCrash(f"{again}, and {crash} as a CUDA graph",
                                f"{again.log}\n--- as a CUDA graph ---\n{crash.log}") from None


def _write_onnx(policy: FusedPolicy, inputs: tuple, eager: Tensor, metadata: dict[str, Any], tmp: Path) -> float:
    """Export through ``torch.onnx.export(dynamo=True)``, run the file in onnxruntime, compare with ``eager``."""
    images, state, env = inputs
    names = onnx_input_names(metadata)
    policy.prepare_export(images)
    flat = (*images, state) + ((env,) if env is not None else ())
    batch = _batch_dim()
    shapes = (tuple({0: batch} for _ in flat),)  # forward(*inputs) has one argument: the tuple
    graph = policy if policy.compute_dtype == torch.float32 else policy.with_weights_in(policy.compute_dtype)
    try:
        with _quiet_onnx(), torch.no_grad():
            program = torch.onnx.export(_FlatInputs(graph), flat, dynamo=True, input_names=names,
                                        output_names=[ACTION], dynamic_shapes=shapes, optimize=True, verbose=False,
                                        opset_version=_ONNX_OPSETS.get(policy.compute_dtype))
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user needs the gist
        cause = err.__cause__ or err
        raise DinocacheError(f"the ONNX exporter failed ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}); "
                             "--format pt2 does not depend on it") from err
    metadata["export"]["onnx"] = {"opset": int(program.model.opset_imports.get("", 0)), "input_names": names,
                                  "output_names": [ACTION], "inputs": _onnx_inputs(policy, names, flat),
                                  "preprocessing_inside": policy.backbone.preprocess.config.describe(),
                                  "precision": _onnx_precision(policy.compute_dtype)}
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(metadata)
    with _quiet_onnx():
        program.save(tmp)
    output, runner = _run_onnx(tmp, names, flat, policy.compute_dtype)
    metadata["export"]["onnx"]["checked_with"] = runner
    diff = _normalised_diff(policy, torch.from_numpy(output), eager)
    metadata["export"]["trace_max_abs_diff"] = diff
    _check_trace(diff, metadata, f"the ONNX file in {runner}")

    def save(text: str) -> None:  # now with the measured difference
        program.model.metadata_props[ONNX_METADATA_KEY] = text
        with _quiet_onnx():
            program.save(tmp)

    import onnx

    _save_sealed(save, lambda: onnx_sha256(tmp, onnx.load(str(tmp), load_external_data=False)), metadata, tmp)
    return diff


def _save_sealed(save: Callable[[str], None], content: Callable[[], str], metadata: dict[str, Any], path: Path) -> None:
    """Write the policy's metadata a last time, now holding the digest of the file's content (the same
    in every write, taken from the one before) and its own digest; then check both as written."""
    metadata[CONTENT_KEY] = content()
    save(json.dumps(sealed(metadata)))
    if content() != metadata[CONTENT_KEY]:
        raise DinocacheError(f"{path}: writing the policy's final metadata changed the rest of the file (torch "
                             f"{torch.__version__}); nothing was written: please report this")


def _onnx_inputs(policy: FusedPolicy, names: list[str], flat: tuple) -> list[dict[str, Any]]:
    """Each graph input's name, dtype, shape (``batch`` dynamic) and meaning, for whoever wires the
    file into another runtime (TensorRT, onnxruntime) without dinocache at hand."""
    meanings = {camera: "camera frame, uint8 RGB HWC at the camera's native size; the graph preprocesses it"
                for camera in policy.cameras}
    meanings[OBS_STATE] = "robot state as recorded (not normalised; the graph normalises it)"
    meanings[OBS_ENV_STATE] = "environment state as recorded (not normalised)"
    return [{"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": ["batch", *value.shape[1:]],
             "meaning": meanings[name]} for name, value in zip(names, flat)]


def _onnx_precision(dtype: torch.dtype) -> str:
    """What the graph computes in, for whoever builds an engine from it."""
    if dtype == torch.float32:
        return "float32 throughout"
    name = str(dtype).removeprefix("torch.")
    return (f"{name} weights and compute in backbone and head; preprocessing, state normalisation, inputs and "
            "output float32")


def _run_onnx(path: Path, names: list[str], inputs: tuple, dtype: torch.dtype) -> tuple[np.ndarray, str]:
    """The written graph's output on ``inputs``, and what ran it.

    onnxruntime where it can. Its CPU provider has almost no bfloat16 kernels, so a bfloat16 graph it
    cannot run is run by ONNX's own reference evaluator (numpy, the operators' specification; seconds
    for a ViT-S policy at batch 2): the file is checked everywhere, and TensorRT, its usual consumer,
    is not onnxruntime anyway.
    """
    import onnxruntime

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    feed = {name: value.cpu().numpy() for name, value in zip(names, inputs)}
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
        return session.run(None, feed)[0], f"onnxruntime {onnxruntime.__version__} ({session.get_providers()[0]})"
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
        gist = str(err).splitlines()[0][:300]
        if dtype != torch.bfloat16:
            raise DinocacheError(f"onnxruntime cannot run the exported graph ({gist}); "
                                 "nothing was written; --format pt2 does not depend on it") from err
    import onnx
    from onnx.reference import ReferenceEvaluator

    try:
        output = ReferenceEvaluator(onnx.load(str(path))).run(None, feed)[0]
    except Exception as err:  # noqa: BLE001 - any operator's own error
        raise DinocacheError(
            f"neither onnxruntime {onnxruntime.__version__} ({', '.join(providers)}: {gist}) nor ONNX's reference "
            f"evaluator ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}) runs the "
            "bfloat16 graph (onnx >= 1.19 evaluates bfloat16), so it cannot be checked and nothing was written; "
            "--dtype float16 runs everywhere") from err
    return (np.asarray(output, dtype=np.float32),
            f"ONNX's reference evaluator (onnx {onnx.__version__}; onnxruntime {onnxruntime.__version__} here has no "
            "bfloat16 kernels for it)")


def _trace_tolerance(policy: FusedPolicy, report: ParityReport | None, inputs: tuple) -> float:
    """How far the written file may be from the eager fused policy (normalised action units).

    At float32 tracing changes no arithmetic: kernel noise only. At half precision the file rounds in
    places of its own (an ONNX graph computes in its dtype where autocast keeps float32) by as much as
    the parity check allows; with that check skipped, the allowance is measured on the example inputs.
    """
    if policy.compute_dtype == torch.float32:
        return TRACE_TOLERANCE
    return max(TRACE_TOLERANCE, report.tolerance if report is not None else rounding_tolerance(policy, *inputs))


def _check_trace(diff: float, metadata: dict[str, Any], what: str) -> None:
    limit = metadata["export"]["trace_tolerance"]
    if not diff <= limit:
        raise ParityError(f"{what} differs from the eager fused policy by {diff:.3g} action std (allowed {limit:.3g}); "
                          "nothing was written")


def _policy_path(out: Path, format: str) -> Path:
    """``out`` named for ``format``: the suffix added when there is none, a different one refused (a
    ``.pth`` holding a ``.pt2`` archive would mislead every tool that goes by the name)."""
    if not out.suffix:
        return out.with_name(f"{out.name}.{format}")
    if out.suffix != f".{format}":
        raise DinocacheError(f"--out {out}: a {format} policy is written as .{format}; name it "
                             f"{out.with_suffix('.' + format).name}" +
                             (" or give --format onnx" if out.suffix == ".onnx" else ""))
    return out


def _prepare_out(out: Path, policy: FusedPolicy, format: str, compile: bool) -> Path:
    """The temporary name the policy is written under, once its folder is known to take it (writable, with
    room for the weights, twice with compiled kernels): found before any tracing, and before torch's
    archive writer meets a full disk, which aborts the process."""
    weights = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    if format == "onnx" and policy.compute_dtype != torch.float32:
        weights //= 2  # the graph's weights are cast to the half precision
    check_room(out, weights * (2 if compile else 1) + 2**20)
    return temporary_name(out)


def export_policy(run: str | os.PathLike, out: str | os.PathLike, format: str = "pt2", checkpoint: str | int = LAST,
                  dtype: str | torch.dtype = "float32", device: str = "cpu", weights: str | os.PathLike | None = None,
                  dataset: str | os.PathLike | None = None, progress: bool = True, *,
                  store: str | os.PathLike | None = None, verify: bool = True,
                  check_weights: bool = True, compile: bool | None = None) -> ExportResult:
    """Fuse the backbone with the head of ``run`` and write it to ``out`` (see the module docstring).

    Args:
        run: a run folder (or one checkpoint folder).
        out: the file to write (``.pt2`` / ``.onnx``).
        format: ``pt2`` (a ``torch.export`` program) or ``onnx``.
        checkpoint: ``last``, ``best`` or a step.
        dtype: compute precision of backbone and head: float32, float16 or bfloat16 (autocast in a
            ``.pt2``; weights cast in ONNX, see :meth:`FusedPolicy.with_weights_in`).
        device: where to trace and check (cpu, cuda, cuda:1 ...); the program is specialised to it.
        weights: backbone weights file (default: as recorded, see :func:`~dinocache.policy.model.provenance.default_weights`).
        dataset: the source dataset to take check frames from (default: the recorded path, else the
            frames the store keeps).
        store: the feature store the head was trained on (default: the recorded path).
        verify: run the parity check (False: export unverified, recorded as such in the metadata).
        check_weights: refuse weights whose hashes differ from the store's (False: let the parity
            check judge them; for tests).
        compile: also compile the policy with AOTInductor for ``device`` into the ``.pt2`` (default:
            on CUDA, where it pays, with torch >= 2.8; the plain program stays inside as the
            portable fallback).

    Raises:
        DinocacheError: a bad request, missing inputs, or a failed check; no file is written then.
    """
    t_begin = time.perf_counter()
    if format not in FORMATS:
        raise DinocacheError(f"--format {format!r}: choose {' or '.join(FORMATS)}")
    out = _policy_path(Path(out), format)
    compute_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    if compile is None:
        compile = format == "pt2" and target.type == "cuda" and can_package()
    if compile and format != "pt2":
        raise DinocacheError("--compile makes an AOTInductor .pt2; ONNX files are compiled by their runtime "
                             "(TensorRT, onnxruntime): drop --compile or use --format pt2")
    stages = ["rebuild backbone", "check against the cache",
              f"trace ({format})" + (" and compile (AOTInductor)" if compile else ""), "write"]
    # leave=False erases the bar when export ends, and disable=None keeps it off where stderr is no
    # terminal (logs, pipes), so neither the summary nor an error line follows a stray "export 1/4"
    with tqdm(total=len(stages), disable=None if progress else True, unit="step", dynamic_ncols=True, leave=False,
              bar_format="export {n}/{total}: {desc}") as bar:
        def stage(done: int) -> None:
            bar.n = done
            bar.set_description_str(stages[done] if done < len(stages) else f"done in {time.perf_counter() - t_begin:.0f} s")

        stage(0)
        check_room(out, 0)  # a folder that cannot take the file is said at once, before any work
        policy = build_fused_policy(run, checkpoint, weights=weights, device=target, dtype=compute_dtype,
                                    check_weights=check_weights)
        tmp = _prepare_out(out, policy, format, compile)
        metadata = policy_metadata(policy.spec, policy.checkpoint_path, policy.step, compute_dtype)
        metadata["backbone_weights"] = policy.backbone.weights.to_dict()
        metadata["export"] = {"format": format, "device": str(target), "batch": "dynamic",
                              "weights_checked": check_weights, "compiled": None}
        stage(1)
        report, frames, state, env = None, None, None, None
        if verify:
            report, checked, state, env = check_run(policy, store, dataset)
            if not report.passed:
                reference = "the head does on the cached features" if policy.spec.backbone_training is None else \
                    "the trained backbone and head do, run eagerly"
                cause = ("other backbone weights or preprocessing?" if math.isfinite(report.max_abs_diff) else
                         "its actions are not finite: NaN or inf in the weights of the checkpoint or the backbone?")
                raise ParityError(f"{report.format()}: the fused policy does not act as {reference} ({cause}); "
                                  "nothing was written")
            frames = checked.images
        metadata["parity"] = report.to_dict() if report else {"verified": False}
        if progress and report is not None:
            tqdm.write(f"dinocache: {report.format()}")

        stage(2)
        inputs = _example_inputs(policy, frames, state, env, metadata["image_size"], target)
        with torch.no_grad():
            eager = policy(*_all_inputs(*inputs))
        metadata["export"]["trace_tolerance"] = _trace_tolerance(policy, report, inputs)
        try:
            if format == "pt2":
                trace_diff = _write_pt2(policy, inputs, eager, metadata, tmp, compile=compile)
            else:
                trace_diff = _write_onnx(policy, inputs, eager, metadata, tmp)
            stage(3)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        stage(4)
    return ExportResult(path=out, format=format, max_abs_diff=report.max_abs_diff if report else None,
                        tolerance=report.tolerance if report else None, trace_max_abs_diff=trace_diff,
                        metadata=metadata, parity=report, seconds=time.perf_counter() - t_begin)
