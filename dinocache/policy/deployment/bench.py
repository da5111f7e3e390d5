"""``dinocache bench-policy``: how long one control step of a live policy takes, and what it holds.

A control loop at 50 Hz has 20 ms per step. With action chunking there are two kinds of step: a
*query* step runs preprocessing, backbone and head (every ``n_action_steps`` steps, or every step
with temporal ensembling), a *queued* step only pops the next action. Both are timed here at batch
size 1 through :meth:`PolicyRuntime.select_action`, i.e. including the observation checks and
conversions a robot loop pays for, and reported as median and 99th percentile (the tail is what
makes a control loop miss its deadline). Peak memory is the process's RSS high-water mark on CPU
(everything the process holds, interpreter and libraries included) and ``max_memory_allocated``
on CUDA.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dinocache.keys import OBS_ENV_STATE, OBS_STATE
from dinocache.policy.deployment.metadata import read_policy_metadata
from dinocache.policy.deployment.runtime import PolicyRuntime, load_policy

__all__ = ["BenchResult", "bench_policy", "latencies_ms", "kernel_ms_per_query", "random_observation"]


@dataclass
class BenchResult:
    """Per-step latency (milliseconds, batch 1) and peak memory of a policy."""

    policy: str
    device: str
    threads: int
    steps: int
    query_p50_ms: float
    query_p99_ms: float
    queued_p50_ms: float | None  # None: a chunk of one action, every step is a query
    queued_p99_ms: float | None
    peak_memory_bytes: int
    memory_kind: str
    backend: str = "?"  # what ran: aoti, program, eager, onnxruntime (PolicyRuntime.metadata["runtime"])
    cuda_graph: bool = False
    kernel_ms: float | None = None  # GPU time of the query's kernels alone (CUDA, from the profiler)
    load_s: float | None = None  # loading the policy (when given a path)
    first_query_ms: float | None = None  # the first query after loading: lazy initialisation, capture

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        queued = ("n/a (every step queries the model)" if self.queued_p50_ms is None
                  else f"p50 {self.queued_p50_ms:8.3f} ms   p99 {self.queued_p99_ms:8.3f} ms")
        lines = [
            f"policy      {self.policy} on {self.device} ({self.threads} thread(s)), {self.steps} steps of each kind; "
            f"runs {self.backend}" + (" as a CUDA graph" if self.cuda_graph else ""),
            f"query step  p50 {self.query_p50_ms:8.3f} ms   p99 {self.query_p99_ms:8.3f} ms   "
            "(checks, preprocessing, backbone, head)",
            f"queued step {queued}",
        ]
        if self.kernel_ms is not None:
            lines.append(f"GPU kernels {self.kernel_ms:8.3f} ms per query (the rest of the query's wall time is launches "
                         "and host work)")
        if self.load_s is not None:
            lines.append(f"start-up    load {self.load_s:.2f} s, first query {self.first_query_ms:.1f} ms")
        lines.append(f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB ({self.memory_kind})")
        return "\n".join(lines)


def latencies_ms(step: Callable[[], Any], steps: int, warmup: int = 3,
                 before: Callable[[], Any] | None = None, sync: torch.device | None = None) -> np.ndarray:
    """Wall time of ``steps`` calls of ``step()`` in milliseconds, after ``warmup`` untimed calls.

    ``before()`` runs untimed ahead of every call; ``sync`` waits for that CUDA device after each call
    (for callables that return device tensors without synchronising).
    """
    times = []
    for i in range(warmup + steps):
        if before is not None:
            before()
        start = time.perf_counter()
        step()
        if sync is not None and sync.type == "cuda":
            torch.cuda.synchronize(sync)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def random_observation(metadata: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """An observation of the shapes ``metadata`` asks for: random frames, a state drawn around zero."""
    rng = np.random.default_rng(seed)
    observation = {camera: rng.integers(0, 256, (*metadata["image_size"][camera], 3), dtype=np.uint8)
                   for camera in metadata["cameras"]}
    observation[OBS_STATE] = rng.normal(size=metadata["state_dim"]).astype(np.float32)
    if metadata.get("env_state_dim"):
        observation[OBS_ENV_STATE] = rng.normal(size=metadata["env_state_dim"]).astype(np.float32)
    return observation


def kernel_ms_per_query(runtime: PolicyRuntime, observation: dict[str, Any], queries: int) -> float:
    """GPU time of the kernels of one query (milliseconds), summed by the profiler over ``queries`` queries.

    Beside the query's wall time it shows the overhead: a launch-bound query has wall time far above
    its kernel time; a CUDA graph or compiled kernels close the gap.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(queries):
            runtime.reset()
            runtime.select_action(observation)
        torch.cuda.synchronize(runtime.device)
    kernels_us = sum(event.self_device_time_total for event in prof.key_averages()
                     if event.device_type == torch.autograd.DeviceType.CUDA)
    return kernels_us / 1e3 / queries


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process RSS high-water"


def bench_policy(policy: str | os.PathLike | PolicyRuntime, device: str = "cpu", steps: int = 50,
                 warmup: int = 3) -> BenchResult:
    """Time query and queued steps of ``policy`` (a path for :func:`load_policy`, or a loaded runtime).

    A path is loaded with a plain action queue of ``chunk_size`` actions, so that both kinds of step
    occur; a given runtime is used with its own action selection.
    """
    load_s = first_query_ms = None
    if isinstance(policy, PolicyRuntime):
        runtime, name = policy, "(runtime)"
        observation = random_observation(runtime.metadata)
    else:
        chunk = read_policy_metadata(policy)["chunk_size"]
        t0 = time.perf_counter()
        runtime = load_policy(policy, device=device, temporal_ensemble_coeff=None, n_action_steps=chunk)
        load_s = time.perf_counter() - t0
        observation = random_observation(runtime.metadata)
        first_query_ms = float(latencies_ms(lambda: runtime.select_action(observation), 1, 0)[0])
        name = str(policy)
    target = runtime.device
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    query = latencies_ms(lambda: runtime.select_action(observation), steps, warmup, before=runtime.reset)
    queued = None
    if runtime.metadata["n_action_steps"] > 1:
        def refill() -> None:  # make sure the next call pops from the queue
            if not runtime.queried:
                runtime.reset()
                runtime.select_action(observation)
        runtime.reset()
        runtime.select_action(observation)
        queued = latencies_ms(lambda: runtime.select_action(observation), steps, warmup, before=refill)
    peak, kind = _peak_memory(target)
    info = runtime.metadata.get("runtime", {})
    return BenchResult(policy=name, device=str(target), threads=torch.get_num_threads(), steps=steps,
                       backend=info.get("backend", "?"), cuda_graph=bool(info.get("cuda_graph")),
                       kernel_ms=kernel_ms_per_query(runtime, observation, steps) if target.type == "cuda" else None,
                       load_s=load_s, first_query_ms=first_query_ms,
                       query_p50_ms=float(np.percentile(query, 50)), query_p99_ms=float(np.percentile(query, 99)),
                       queued_p50_ms=None if queued is None else float(np.percentile(queued, 50)),
                       queued_p99_ms=None if queued is None else float(np.percentile(queued, 99)),
                       peak_memory_bytes=int(peak), memory_kind=kind)
