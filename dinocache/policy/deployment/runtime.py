"""The live policy on the robot: one observation in, one action out, at the control rate.

:func:`load_policy` opens an exported ``.pt2`` (the ``torch.export`` program), an ``.onnx`` (run by
onnxruntime) or a run / checkpoint folder (the eager fused policy, rebuilt and hash-checked) and
returns a :class:`PolicyRuntime`. Its :meth:`~PolicyRuntime.select_action` takes what a robot loop
hands over (a dict of camera frames and the state vector, numpy or torch, LeRobot keys) and returns
the action for this control step; ACT's chunking is handled inside by the same
:mod:`~dinocache.policy.model.action_selection` objects LeRobot's semantics were tested against: a queue of
``n_action_steps`` actions (the model runs only when it is empty), or temporal ensembling (the model
runs every step and overlapping chunks are blended with weights ``exp(-coeff * i)``, oldest first).

:meth:`~PolicyRuntime.select_actions` drives several environments at once (a vectorised simulator):
each environment keeps its own queue or ensemble, keyed by an id, and the model runs once per step
on the rows whose environment needs a new chunk, so an environment that resets or stops never
disturbs the others.

Observations are checked every step, queued or not, so a wiring mistake fails at the first step
with one message naming the key and the expected shape, not later inside the backbone.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinocache.devices import resolve_device
from dinocache.errors import DinocacheError
from dinocache.keys import short_name
from dinocache.policy.deployment.compiled import CompiledPolicyFallback, compiled_mismatch, load_compiled, to_cpu
from dinocache.policy.deployment.metadata import load_onnx, policy_kind, policy_metadata, read_policy_metadata
from dinocache.policy.model.action_selection import ActionSelector, make_action_selector
from dinocache.policy.model.config import OBS_ENV_STATE, OBS_STATE, ACTConfig
from dinocache.policy.model.integrity import check_policy_file

__all__ = ["PolicyRuntime", "ObservationError", "PolicyError", "CompiledPolicyFallback", "load_policy", "AS_TRAINED"]

#: A chunk predictor: camera images (uint8 ``(B, H, W, 3)``), state ``(B, D)``, env state or None -> ``(B, chunk, A)``.
Predict = Callable[[list[Any], Any, Any], Tensor]


class _AsTrained:
    def __repr__(self) -> str:
        return "AS_TRAINED"


#: Default of :func:`load_policy`'s action-selection options: the value the head was trained with.
AS_TRAINED: Any = _AsTrained()


class PolicyError(DinocacheError, RuntimeError):
    """The policy produced something it must not hand out (a NaN or inf action)."""


class ObservationError(DinocacheError, ValueError):
    """An observation the policy cannot take: a missing key, or a value of the wrong shape or dtype."""


class PolicyRuntime:
    """A loaded policy for a control loop: :meth:`reset` per episode, :meth:`select_action` per step.

    Attributes:
        metadata: the policy's metadata (see ``docs/export.md``), with ``n_action_steps`` and
            ``temporal_ensemble_coeff`` the values this runtime uses.
        device: where the model runs.
        queries: model calls so far; ``queried``: whether the last :meth:`select_action` called it.
    """

    def __init__(self, predict: Predict, metadata: dict[str, Any], device: torch.device,
                 n_action_steps: int | None = None, temporal_ensemble_coeff: Any = AS_TRAINED) -> None:
        self._predict = predict
        self.device = device
        self._trained = metadata
        config = _selection_config(metadata, n_action_steps, temporal_ensemble_coeff)
        self.metadata = {**metadata, "n_action_steps": config.n_action_steps,
                         "temporal_ensemble_coeff": config.temporal_ensemble_coeff}
        self._config = config
        self._selectors: dict[int, ActionSelector] = {}
        self._steps: dict[int, int] = {}  # env -> steps since its reset
        self._images = {camera: (*metadata["image_size"][camera], 3) for camera in metadata["cameras"]}
        self._vectors = {OBS_STATE: metadata["state_dim"]}
        if metadata.get("env_state_dim"):
            self._vectors[OBS_ENV_STATE] = metadata["env_state_dim"]
        self.queries = 0
        self.queried = False

    def reset(self, env: int | None = None) -> None:
        """Forget queued / ensembled actions: call at the start of every episode (of environment ``env``
        only, for :meth:`select_actions`; of every environment by default)."""
        if env is None:
            self._selectors.clear()
            self._steps.clear()
        else:
            self._selectors.pop(env, None)
            self._steps.pop(env, None)

    def with_action_selection(self, n_action_steps: int | None = None,
                              temporal_ensemble_coeff: Any = AS_TRAINED) -> PolicyRuntime:
        """A runtime sharing this one's loaded model, with other action selection (see :func:`load_policy`):
        compare queue lengths or ensembling coefficients without loading the model again."""
        return PolicyRuntime(self._predict, self._trained, self.device, n_action_steps, temporal_ensemble_coeff)

    def select_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action ``(action_dim,)`` float32 to execute now.

        ``observation`` maps every camera (``observation.images.<cam>`` or ``<cam>``) to its frame,
        uint8 HWC at the camera's native size (numpy or torch, an optional leading batch axis of
        1), and ``observation.state`` (or ``state``) to the raw state vector; plus
        ``observation.environment_state`` when the policy has one. Other keys are ignored.

        Raises :class:`PolicyError`, naming the step, rather than return an action holding NaN or inf.
        """
        return self.select_actions([observation])[0]

    def select_actions(self, observations: Sequence[Mapping[str, Any]],
                       envs: Sequence[int] | None = None) -> np.ndarray:
        """One action per environment, ``(len(observations), action_dim)`` float32, from one model call.

        ``observations[i]`` is what :meth:`select_action` takes, for environment ``envs[i]`` (default
        0, 1, ...): its id, under which its action queue or temporal ensemble is kept between calls.
        The model runs once, batched, on the rows whose environment needs a new chunk (all of them
        with ensembling); :meth:`reset` ``(env)`` starts that environment's next episode.
        """
        envs = list(range(len(observations))) if envs is None else list(envs)
        if len(envs) != len(observations) or len(set(envs)) != len(envs):
            raise ValueError(f"select_actions: {len(observations)} observations for environments {envs}")
        rows = [self._inputs(observation) for observation in observations]
        for env in envs:
            if env not in self._selectors:
                self._selectors[env] = make_action_selector(self._config)
        selectors = [self._selectors[env] for env in envs]
        needy = [i for i, selector in enumerate(selectors) if selector.needs_chunk]
        chunks: dict[int, Tensor] = {}
        self.queried = bool(needy)
        if needy:
            self.queries += 1
            images, vectors = zip(*(rows[i] for i in needy))
            state, *env = [torch.cat(column) for column in zip(*vectors)]  # (n, D) [and (n, E)]
            predicted = self._predict([_stack(camera) for camera in zip(*images)], state, env[0] if env else None)
            chunks = dict(zip(needy, predicted.split(1)))
        actions = [selector.select(lambda i=i: chunks[i])[0] for i, selector in enumerate(selectors)]
        out = torch.stack(actions).float().cpu().numpy()
        for env in envs:
            self._steps[env] = self._steps.get(env, 0) + 1
        if not np.isfinite(out).all():  # checked on the host copy: no extra device sync
            self._refuse_non_finite(out, envs, needy)
        return out

    def _refuse_non_finite(self, actions: np.ndarray, envs: list[int], needy: list[int]) -> None:
        """A robot must never be handed NaN or inf: stop, naming where (the weights are the usual cause)."""
        row = int(np.flatnonzero(~np.isfinite(actions).all(axis=1))[0])
        env, step = envs[row], self._steps[envs[row]] - 1
        where = f"environment {env}, " if len(envs) > 1 or env != 0 else ""
        source = "the model query of this step" if row in needy else "a queued chunk of an earlier query"
        raise PolicyError(f"select_action: the policy produced a non-finite action at {where}step {step} since reset "
                          f"({actions[row].tolist()}, from {source}); nothing was handed out. NaN or inf in the "
                          "policy's weights, or an observation far outside what it was trained on?")

    def _inputs(self, observation: Mapping[str, Any]) -> tuple[list[Any], list[Tensor]]:
        """One observation, checked: its camera frames ``(H, W, 3)`` and its vectors ``(1, D)``."""
        images = [self._image(camera, self._lookup(observation, camera)) for camera in self._images]
        return images, [self._vector(key, self._lookup(observation, key)) for key in self._vectors]

    # -- validation ---------------------------------------------------------------------------------
    def _lookup(self, observation: Mapping[str, Any], key: str) -> Any:
        short = short_name(key)
        for name in (key, short):
            if name in observation:
                return observation[name]
        expected = ", ".join(f"{k} {shape}" for k, shape in self._expected().items())
        raise ObservationError(f"observation has no {key!r} (nor {short!r}); the policy takes {expected}")

    def _expected(self) -> dict[str, str]:
        shapes = {camera: f"uint8 {shape}" for camera, shape in self._images.items()}
        shapes.update({key: f"float ({dim},)" for key, dim in self._vectors.items()})
        return shapes

    def _image(self, key: str, value: Any) -> Any:
        expected = self._images[key]
        if isinstance(value, np.ndarray):
            is_uint8 = value.dtype == np.uint8
        elif isinstance(value, Tensor):
            is_uint8 = value.dtype == torch.uint8
        else:
            raise ObservationError(f"observation[{key!r}]: expected a uint8 {expected} image (numpy or torch, HWC), "
                                   f"got a {type(value).__name__}")
        shape = tuple(value.shape)
        if shape == (1, *expected):
            value, shape = value[0], expected
        if shape != expected or not is_uint8:
            hint = ""
            if shape == (3, *expected[:2]):
                hint = " (channels first: transpose it to HWC)"
            elif not is_uint8 and (value.dtype.is_floating_point if isinstance(value, Tensor)
                                   else np.issubdtype(value.dtype, np.floating)):
                hint = " (convert float frames with (x * 255).round() to uint8)"
            elif not is_uint8:
                hint = " (cast integer frames in 0..255 with .astype(np.uint8) or .to(torch.uint8))"
            raise ObservationError(f"observation[{key!r}]: expected a uint8 {expected} image (HWC), got "
                                   f"{str(value.dtype).removeprefix('torch.')} {shape}{hint}")
        return value

    def _vector(self, key: str, value: Any) -> Tensor:
        dim = self._vectors[key]
        tensor = value if isinstance(value, Tensor) else torch.tensor(np.asarray(value, dtype=np.float32))
        if tuple(tensor.shape) not in ((dim,), (1, dim)):
            raise ObservationError(f"observation[{key!r}]: expected {dim} values, shape ({dim},), got shape "
                                   f"{tuple(tensor.shape)}")
        if not tensor.is_floating_point() and tensor.dtype not in (torch.int32, torch.int64):
            raise ObservationError(f"observation[{key!r}]: expected float values ({dim},), got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ObservationError(f"observation[{key!r}] holds NaN or inf: {tensor.tolist()}")
        return tensor.reshape(1, dim).float()


def _stack(frames: Sequence[Any]) -> Tensor:
    """One camera's ``(H, W, 3)`` frames (numpy or torch) as a ``(B, H, W, 3)`` batch (a view for one)."""
    if len(frames) == 1:
        return torch.as_tensor(frames[0]).unsqueeze(0)
    return torch.stack([torch.as_tensor(frame) for frame in frames])


def _selection_config(metadata: Mapping[str, Any], n_action_steps: int | None, coeff: Any) -> ACTConfig:
    """The trained ACT config with the requested action selection; ensembling implies one step per query."""
    changes: dict[str, Any] = {}
    if coeff is not AS_TRAINED:
        changes["temporal_ensemble_coeff"] = coeff
        if coeff is not None and n_action_steps is None:
            changes["n_action_steps"] = 1
    if n_action_steps is not None:
        changes["n_action_steps"] = n_action_steps
    try:
        return ACTConfig.from_dict({**metadata["act_config"], **changes})
    except ValueError as err:
        raise DinocacheError(f"action selection: {err}") from None


# --------------------------------------------------------------------------------------------------
# Back ends
# --------------------------------------------------------------------------------------------------


def _torch_predict(module: Callable[..., Tensor], device: torch.device, cuda_graph: bool = False) -> Predict:
    call = _CudaGraphCall(module, device) if cuda_graph else module

    def predict(images: list[Any], state: Tensor, env: Tensor | None) -> Tensor:
        batch = [torch.as_tensor(image).to(device, non_blocking=True) for image in images]
        inputs = (batch, state.to(device)) + (() if env is None else (env.to(device),))
        with torch.no_grad():
            return call(*inputs)
    return predict


class _CudaGraphCall:
    """``module`` replayed as one CUDA graph: a batch-1 query is a few hundred small kernels, each
    shorter than its launch, so launching them one by one costs more than running them.

    A graph is captured on the first call with given input shapes, from static input buffers on the
    device; every later call of those shapes copies its inputs into those buffers and replays it. A
    robot loop has one shape (one observation per control step), so one capture serves the whole run;
    a vectorised simulator adds one per batch size it queries (at most its number of environments).
    The action queue and temporal ensembling stay outside the graph.
    """

    WARMUP = 3  # eager runs on a side stream before capture (cuBLAS handles, autotuning, allocator)

    def __init__(self, module: Callable[..., Tensor], device: torch.device) -> None:
        self.module, self.device = module, device
        #: input shapes -> (graph, its static inputs, its static output)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def __call__(self, images: list[Tensor], state: Tensor, env: Tensor | None = None) -> Tensor:
        flat = [*images, state] + ([] if env is None else [env])
        shapes = tuple(tuple(t.shape) for t in flat)
        if shapes not in self.graphs:
            self.graphs[shapes] = self._capture(flat, len(images), env is not None)
        graph, static_inputs, static_output = self.graphs[shapes]
        for static, value in zip(static_inputs, flat):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return static_output.clone()  # the next replay overwrites the graph's output buffer

    def _run(self, inputs: list[Tensor], num_images: int, has_env: bool) -> Tensor:
        args = (inputs[:num_images], inputs[num_images]) + ((inputs[num_images + 1],) if has_env else ())
        return self.module(*args)

    def _capture(self, flat: list[Tensor], num_images: int,
                 has_env: bool) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]:
        static_inputs = [value.detach().clone() for value in flat]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.WARMUP):
                self._run(static_inputs, num_images, has_env)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_output = self._run(static_inputs, num_images, has_env)
        return graph, static_inputs, static_output


def answer_in_child() -> None:
    """The child process of :func:`~dinocache.policy.deployment.compiled.run_in_child`: the compiled kernels loaded
    and called as :func:`load_policy` runs them (where the request says so, loaded for graph capture,
    then captured and replayed as a CUDA graph), on the request's inputs.
    ``argv``: the request file and where to save the answer; stderr tells the parent how far it got."""
    request = torch.load(sys.argv[1], weights_only=True)
    device, graph = torch.device(request["device"]), request["cuda_graph"]
    module = load_compiled(request["path"], device, single_threaded=graph)
    print("dinocache-child: loaded", file=sys.stderr, flush=True)
    images, state, *env = request["inputs"]
    output = _torch_predict(module, device, cuda_graph=graph)(images, state, env[0] if env else None)
    print("dinocache-child: answered", file=sys.stderr, flush=True)
    torch.save(to_cpu(output), sys.argv[2])


def _onnx_predict(path: Path, metadata: Mapping[str, Any], device: torch.device) -> Predict:
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise DinocacheError(f"{path}: onnxruntime here has no CUDA provider (install onnxruntime-gpu), "
                                 "or load it with device='cpu'")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    names = metadata["export"]["onnx"]["input_names"]

    def predict(images: list[Any], state: Tensor, env: Tensor | None) -> Tensor:
        arrays = [_numpy(image) for image in images] + [_numpy(state)] + ([] if env is None else [_numpy(env)])
        return torch.from_numpy(session.run(None, dict(zip(names, arrays)))[0])
    return predict


def _numpy(value: Any) -> np.ndarray:
    return np.ascontiguousarray(value.cpu().numpy() if isinstance(value, Tensor) else value)


def _load_program(path: Path, metadata: Mapping[str, Any], device: torch.device, single_threaded: bool = False,
                  compiled_kernels: bool = True) -> tuple[Callable[..., Tensor], str]:
    """The ``.pt2`` as a callable on ``device`` and which form it is (``aoti`` or ``program``).

    A package with AOTInductor kernels built for this machine runs them; otherwise (another device,
    GPU generation, CPU instruction set or torch build) the plain program inside runs instead, and a
    :class:`CompiledPolicyFallback` warning says why, once.
    """
    compiled = metadata["export"].get("compiled")
    if compiled and compiled_kernels:
        reason = compiled_mismatch(compiled, device)
        if reason is None:
            try:
                return load_compiled(path, device, single_threaded=single_threaded), "aoti"
            except Exception as err:  # noqa: BLE001 - a loader failure of any kind means: use the program
                reason = f"its kernels would not load ({type(err).__name__}: {str(err).strip()[:200]})"
        warnings.warn(f"{path}: not running its compiled kernels ({reason}); running the plain torch.export program "
                      "inside instead (slower: re-export with --compile on this machine)", CompiledPolicyFallback,
                      stacklevel=3)
    program = torch.export.load(str(path))
    traced_on = torch.device(metadata["export"]["device"])
    if traced_on != device:
        if metadata["dtype"] != "float32" and traced_on.type != device.type:
            raise DinocacheError(f"{path} was exported for {traced_on} in {metadata['dtype']}; its autocast regions "
                                 f"are bound to {traced_on.type}: re-export with --device {device}")
        program = torch.export.passes.move_to_device_pass(program, device)
    return program.module(), "program"


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", *, n_action_steps: int | None = None,
                temporal_ensemble_coeff: float | None = AS_TRAINED,
                weights: str | os.PathLike | None = None, cuda_graph: bool | None = None,
                compiled: bool = True) -> PolicyRuntime:
    """Open a live policy: an exported ``.pt2`` / ``.onnx``, or a run / checkpoint folder (eager).

    Args:
        path: the policy file, or a run folder (its ``last`` checkpoint) / a checkpoint folder.
        device: where to run it (cpu, cuda, cuda:1 ...).
        n_action_steps: actions executed per model query (default: as trained).
        temporal_ensemble_coeff: ACT's ensembling coefficient, None to turn ensembling off (default:
            as trained). Setting a coefficient without ``n_action_steps`` sets that to 1.
        weights: backbone weights for a run folder (as ``dinocache export --weights``).
        cuda_graph: replay each query as one CUDA graph (default: on CUDA, for the torch back ends,
            except compiled kernels that export found to crash under a graph; the ONNX runtime has its own).
        compiled: run a ``.pt2``'s AOTInductor kernels where they fit this machine (False: its plain
            program, e.g. to compare the two).

    ``metadata["runtime"]`` says what runs: ``backend`` (``aoti``: compiled kernels, ``program``: the
    ``torch.export`` program, ``eager``: a run folder, ``onnxruntime``) and ``cuda_graph``.
    """
    path, device = Path(path), resolve_device(device, "device")
    kind = policy_kind(path)
    if cuda_graph and (device.type != "cuda" or kind == "onnx"):
        raise DinocacheError(f"cuda_graph=True needs a CUDA device and a .pt2 or run folder (got {device}, {kind})")
    graph = device.type == "cuda" and kind != "onnx" if cuda_graph is None else cuda_graph
    if kind == "folder":
        from dinocache.policy.deployment.fused import build_fused_policy

        policy = build_fused_policy(path, weights=weights, device=device)
        metadata = policy_metadata(policy.spec, policy.checkpoint_path, policy.step, policy.compute_dtype)
        metadata["export"] = {"format": "eager", "device": str(device)}
        module, backend = policy, "eager"
    else:
        model = load_onnx(path, external_data=False) if kind == "onnx" else None
        metadata = read_policy_metadata(path, model)
        check_policy_file(path, metadata, model)  # every byte of the program and its weights as exported
        if kind == "onnx":
            metadata["runtime"] = {"backend": "onnxruntime", "cuda_graph": False}
            return PolicyRuntime(_onnx_predict(path, metadata, device), metadata, device, n_action_steps,
                                 temporal_ensemble_coeff)
        # kernels that export saw crash under a CUDA graph (and pass without) run without one
        graphless = (metadata["export"].get("compiled") or {}).get("cuda_graph") is False and cuda_graph is None
        module, backend = _load_program(path, metadata, device, single_threaded=graph and not graphless,
                                        compiled_kernels=compiled)
        graph = graph and not (graphless and backend == "aoti")
    metadata["runtime"] = {"backend": backend, "cuda_graph": graph}
    return PolicyRuntime(_torch_predict(module, device, cuda_graph=graph), metadata, device, n_action_steps,
                         temporal_ensemble_coeff)
