"""Turning predicted action chunks into one action per control step, for the live robot loop.

ACT predicts ``chunk_size`` future actions per query. Two ways to execute them, as in LeRobot's
``ACTPolicy.select_action``:

* :class:`ActionQueue` (``temporal_ensemble_coeff=None``): execute the first ``n_action_steps``
  actions of a chunk open-loop, then query again. Cheap: one model call per ``n_action_steps``.
* :class:`TemporalEnsembler` (``n_action_steps=1``): query every step and execute, for the current
  step, a weighted average of what every still-overlapping chunk predicted for it (Algorithm 2 of
  the ACT paper). Smoother, one model call per step.

Both are pure torch on whatever device the actions live, hold no model, and are independent of how
the policy was exported: the model is passed in as a zero-argument callable so it only runs when
it is actually needed. Call ``reset()`` at the start of every episode.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

import torch
from torch import Tensor

from dinocache.policy.model.config import ACTConfig

__all__ = ["ActionSelector", "ActionQueue", "TemporalEnsembler", "make_action_selector"]

ChunkPredictor = Callable[[], Tensor]
"""Runs the policy on the current observation and returns a ``(B, chunk_size, action_dim)`` chunk."""


def _check_chunk(actions: Tensor, chunk_size: int | None = None) -> None:
    if actions.dim() != 3:
        raise ValueError(
            f"Expected an action chunk of shape (B, chunk, action_dim). Got {tuple(actions.shape)}."
        )
    if chunk_size is not None and actions.shape[1] != chunk_size:
        raise ValueError(f"Expected chunks of {chunk_size} actions. Got shape {tuple(actions.shape)}.")


class ActionSelector(Protocol):
    """What the live loop needs: one action per step, and a reset between episodes."""

    def reset(self) -> None: ...

    @property
    def needs_chunk(self) -> bool:
        """Whether the next :meth:`select` will call the model: a batched caller asks every row first
        and runs the model once, on the rows that need it."""
        ...

    def select(self, predict_chunk: ChunkPredictor) -> Tensor: ...


class ActionQueue:
    """Execute ``n_action_steps`` actions of each chunk, querying the model only when they run out.

    Args:
        n_action_steps: How many leading actions of each chunk to keep (the rest are dropped).
    """

    def __init__(self, n_action_steps: int):
        if n_action_steps < 1:
            raise ValueError(f"`n_action_steps` must be at least 1. Got {n_action_steps}.")
        self.n_action_steps = n_action_steps
        self._queue: deque[Tensor] = deque()

    def reset(self) -> None:
        """Forget queued actions (start of an episode)."""
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def needs_chunk(self) -> bool:
        return not self._queue

    def push(self, actions: Tensor) -> None:
        """Queue the first ``n_action_steps`` actions of a ``(B, chunk, A)`` chunk."""
        _check_chunk(actions)
        if actions.shape[1] < self.n_action_steps:
            raise ValueError(
                f"A chunk of {actions.shape[1]} actions cannot supply n_action_steps={self.n_action_steps}."
            )
        self._queue.extend(actions[:, : self.n_action_steps].unbind(dim=1))

    def pop(self) -> Tensor:
        """The next ``(B, A)`` action."""
        if not self._queue:
            raise IndexError("The action queue is empty; push a chunk first.")
        return self._queue.popleft()

    def select(self, predict_chunk: ChunkPredictor) -> Tensor:
        """Return the next action, calling ``predict_chunk()`` only if the queue is empty."""
        if not self._queue:
            self.push(predict_chunk())
        return self.pop()


class TemporalEnsembler:
    """ACT's temporal ensembling, with the semantics of LeRobot's ``ACTTemporalEnsembler``.

    Every step a new chunk arrives; the action executed for step ``t`` is

        sum_i w_i * a_i(t) / sum_i w_i,    w_i = exp(-coeff * i),

    over the chunks ``i = 0, 1, ...`` that cover step ``t``, ordered oldest first (``w_0`` for the
    oldest prediction). ``coeff = 0`` weighs all equally; a positive one (ACT uses 0.01) favours
    older predictions, which keeps the benefit of chunking (LeRobot PR #319 found that weighting new
    predictions aggressively hurts); a negative one favours newer ones.

    The average is kept online: each pending future step stores its running weighted mean and how
    many chunks have contributed, so memory is one chunk regardless of ``chunk_size``.

    Args:
        coeff: The exponential weighting coefficient (``temporal_ensemble_coeff``).
        chunk_size: Length of the chunks passed to :meth:`update`.
    """

    def __init__(self, coeff: float, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1. Got {chunk_size}.")
        self.coeff = coeff
        self.chunk_size = chunk_size
        self.weights = torch.exp(-coeff * torch.arange(chunk_size, dtype=torch.float64))
        self.weights_cumsum = torch.cumsum(self.weights, dim=0)
        self.reset()

    def reset(self) -> None:
        """Drop the running ensemble (start of an episode)."""
        self._average: Tensor | None = None  # (B, pending steps, A) running weighted means
        self._count: Tensor | None = None  # (pending steps,) chunks averaged into each

    def update(self, actions: Tensor) -> Tensor:
        """Fold in the chunk predicted at this step and return the ``(B, A)`` action to execute now.

        ``actions[:, k]`` is the prediction for ``k`` steps from now.
        """
        _check_chunk(actions, self.chunk_size)
        if self._average is None or self._count is None:
            average = actions.clone()
            count = torch.ones(self.chunk_size, dtype=torch.long, device=actions.device)
        else:
            # The pending steps are the first chunk_size - 1 of the new chunk; a step already
            # averaged over n chunks has weight sum cumsum[n - 1] and the new chunk's weight is w_n.
            weights = self.weights.to(device=actions.device)
            weights_cumsum = self.weights_cumsum.to(device=actions.device)
            previous_total = weights_cumsum[self._count - 1].to(actions.dtype).unsqueeze(-1)
            new_weight = weights[self._count].to(actions.dtype).unsqueeze(-1)
            new_total = weights_cumsum[self._count].to(actions.dtype).unsqueeze(-1)
            pending = (self._average * previous_total + actions[:, :-1] * new_weight) / new_total
            # The chunk's last action is for a step nothing has predicted yet.
            average = torch.cat([pending, actions[:, -1:]], dim=1)
            count = torch.cat([self._count + 1, self._count.new_ones(1)])
        # Execute the current step; the rest stays pending (at most chunk_size - 1 predictions each,
        # so indexing the weights with count stays in range).
        self._average, self._count = average[:, 1:], count[1:]
        return average[:, 0]

    @property
    def needs_chunk(self) -> bool:
        return True

    def select(self, predict_chunk: ChunkPredictor) -> Tensor:
        """Query the model (every step) and return the ensembled action."""
        return self.update(predict_chunk())


def make_action_selector(config: ACTConfig) -> ActionQueue | TemporalEnsembler:
    """The selector LeRobot's ``select_action`` would use for ``config``."""
    if config.temporal_ensemble_coeff is not None:
        return TemporalEnsembler(config.temporal_ensemble_coeff, config.chunk_size)
    return ActionQueue(config.n_action_steps)
