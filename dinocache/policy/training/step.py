"""One optimiser step of the head that never waits for the host, optionally one CUDA graph.

A step is a forward (bfloat16 autocast on CUDA), a backward, gradient clipping and the fused AdamW
update, with its loss terms and gradient norm summed on the device and read only when a record is
written (:class:`TrainStep`). On CUDA the whole step is captured once and replayed
(:class:`Replayed`): one launch instead of hundreds, and no Python per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dinocache.errors import TrainingError
from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.config import ACTION
from dinocache.policy.training.batches import Batch
from dinocache.policy.training.feature_augment import FeatureAugment

__all__ = ["TrainStep", "Replayed", "LossModule", "autocast", "GRAPH_WARMUP"]


#: Eager calls before a step is captured as a CUDA graph (on a side stream, as capture requires:
#: lazy initialisations, the optimiser's state and cuBLAS workspaces happen outside the graph).
GRAPH_WARMUP = 3


class LossModule(nn.Module):
    """``compute_loss`` as ``forward``, so that DDP (which hooks ``forward``) synchronises its gradients;
    with ``augment``, on the batch's features augmented first (in training mode only)."""

    def __init__(self, head: ACTHead, augment: FeatureAugment | None = None) -> None:
        super().__init__()
        self.head, self.augment = head, augment

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.head.compute_loss(batch if self.augment is None else self.augment(batch))


class Replayed:
    """``fn()`` run eagerly, or, with ``graph``, captured once as a CUDA graph and replayed.

    ``fn`` reads and writes only tensors that live as long as this object (static shapes and
    addresses), which is what a replay needs. Its first :data:`GRAPH_WARMUP` calls run eagerly on
    a side stream (as ``torch.cuda.graphs`` requires), the next one captures it, and every call
    from then on is one replay: one launch instead of hundreds, and no Python. ``eager_after``
    runs after each eager call (and never in the graph): what ``fn`` must not capture;
    ``before_capture`` once, before the capture.
    """

    def __init__(self, fn: Any, graph: bool, eager_after: Any = None, before_capture: Any = None) -> None:
        self.fn, self.graph, self.eager_after, self.before_capture = fn, graph, eager_after, before_capture
        self.calls = 0
        self._cuda_graph: Any = None

    def __call__(self) -> None:
        self.calls += 1
        if not self.graph:
            self._eager()
        elif self._cuda_graph is not None:
            self._cuda_graph.replay()
        elif self.calls <= GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.before_capture is not None:
                self.before_capture()
            self._cuda_graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self._cuda_graph):
                    self.fn()
            except RuntimeError as err:  # an op the capture cannot record (a host sync, an allocation ...)
                cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise TrainingError(f"the training step could not be captured as a CUDA graph ({cause}); "
                                    "--no-cuda-graph runs it without") from err
            self._cuda_graph.replay()

    def _eager(self) -> None:
        self.fn()
        if self.eager_after is not None:
            self.eager_after()


class TrainStep:
    """One optimiser step of the head on ``inputs``, device buffers the batches are written into.

    ``model`` is the module whose ``forward`` is the head's loss (default: the head's
    ``compute_loss``; DDP's wrapper of it under ``torchrun``), ``optimizer`` an :func:`act_optimizer`.

    Forward (bfloat16 autocast on CUDA), backward, gradient clipping (foreach) and the fused AdamW
    step, without a single wait for the host: loss, L1, KL and gradient norm are summed on the
    device, and read by :meth:`take` when a record is written. A step whose gradient norm is not
    finite (a NaN loss, an overflow) is not applied: the optimiser reads a device flag
    (``found_inf``, as with a GradScaler) that stays set, so that step and every later one are
    skipped, the weights stay those before it, and :meth:`take` names it; the loop then stops.

    With ``graph`` (on CUDA) the whole step is captured once as a CUDA graph and replayed
    (:class:`Replayed`); the optimiser is made ``capturable`` for it. Calling the step with the
    same inputs gives the same result either way, within float tolerance.
    """

    def __init__(self, head: ACTHead, optimizer: torch.optim.Optimizer, inputs: Batch, graph: bool = False,
                 model: nn.Module | None = None) -> None:
        device = inputs[ACTION].device
        self.model = LossModule(head) if model is None else model  # DDP wraps the loss module
        self.optimizer, self.inputs = optimizer, inputs
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # 0 turns clipping off, as in LeRobot (which then takes the norm with max_norm=inf, for the log)
        self.max_norm = head.config.grad_clip_norm or math.inf
        self.autocast = autocast(device)
        self.sums = torch.zeros(4, device=device)  # loss, l1, kld, grad_norm
        self.count = torch.zeros((), device=device)  # steps since the last take
        self.first_bad = torch.zeros(3, device=device)  # count, loss and grad_norm at the first step not applied
        self.found_inf = torch.zeros((), device=device)
        optimizer.found_inf = self.found_inf  # read by the fused AdamW: 1 skips the update
        self._run = Replayed(self._step, graph, eager_after=lambda: optimizer.zero_grad(set_to_none=True),
                              before_capture=self._capturable)

    def _capturable(self) -> None:
        """Let the optimiser step be captured (set only then: eager, ``capturable`` warns that it costs)."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True

    def _step(self) -> None:
        with self.autocast:
            loss, info = self.model(self.inputs)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.count.add_(1)
        bad = torch.isfinite(grad_norm).logical_not().float()
        values = torch.stack([info["loss"].float(), info["l1_loss"].float(), info["kld_loss"].float(), grad_norm])
        self.first_bad.copy_(torch.where(bad > self.found_inf, torch.stack([self.count, values[0], grad_norm]),
                                         self.first_bad))
        torch.maximum(self.found_inf, bad, out=self.found_inf)
        self.sums.add_(values)
        self.optimizer.step()  # in the graph, backward writes the same .grad tensors again: no zero_grad

    def __call__(self) -> None:
        """Run one step on what ``inputs`` hold now (queued on the device; returns at once on CUDA)."""
        self._run()

    def take(self) -> tuple[list[float], tuple[int, float, float] | None]:
        """The sums (loss, l1, kld, grad_norm) since the last call, and ``(steps since the last call, loss,
        grad_norm)`` of the first step that was not applied, or None; then starts new sums.

        Reading them waits for the device to finish the queued steps: call it once per record.
        """
        values = torch.cat([self.sums, self.first_bad, self.found_inf.view(1)]).tolist()
        self.sums.zero_()
        self.count.zero_()
        bad = (int(values[4]), values[5], values[6]) if values[7] else None
        return values[:4], bad


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (no loss scaling needed), off elsewhere; no cast cache, which a graph cannot keep."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)
