"""Action selection: the queue's query cadence and the temporal ensembler against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinocache.policy.model.action_selection import ActionQueue, TemporalEnsembler, make_action_selector
from dinocache.policy.model.config import ACTConfig


class CountingModel:
    """Returns chunk number k as actions [k*100 + j] for j in the chunk, and counts its calls."""

    def __init__(self, chunk_size: int, batch_size: int = 2, action_dim: int = 3):
        self.chunk_size, self.batch_size, self.action_dim = chunk_size, batch_size, action_dim
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        steps = torch.arange(self.chunk_size, dtype=torch.float32) + 100 * self.calls
        self.calls += 1
        return steps.view(1, -1, 1).expand(self.batch_size, -1, self.action_dim).clone()


def test_queue_queries_every_n_action_steps_and_returns_actions_in_order():
    model = CountingModel(chunk_size=5)
    queue = ActionQueue(n_action_steps=3)
    calls_before_step, executed = [], []
    for _ in range(9):
        calls_before_step.append(model.calls)
        action = queue.select(model)
        assert action.shape == (2, 3)
        executed.append(action[0, 0].item())
    assert calls_before_step == [0, 1, 1, 1, 2, 2, 2, 3, 3]  # a query at steps 0, 3, 6
    assert executed == [0, 1, 2, 100, 101, 102, 200, 201, 202]  # the first 3 of each chunk, in order


def test_queue_reset_forces_a_new_query():
    model = CountingModel(chunk_size=4)
    queue = ActionQueue(n_action_steps=4)
    queue.select(model)
    assert len(queue) == 3
    queue.reset()
    assert queue.select(model)[0, 0].item() == 100
    assert model.calls == 2


def test_queue_rejects_short_chunks_and_pop_when_empty():
    queue = ActionQueue(n_action_steps=4)
    with pytest.raises(ValueError, match="cannot supply"):
        queue.push(torch.zeros(1, 3, 2))
    with pytest.raises(IndexError):
        queue.pop()


def brute_force_ensemble(chunks: list[torch.Tensor], step: int, coeff: float) -> torch.Tensor:
    """Weighted mean of every prediction for `step`.

    Chunk q was queried at step q, so its index j predicts step q + j.
    """
    chunk_size = chunks[0].shape[1]
    covering = [q for q in range(len(chunks)) if q <= step < q + chunk_size]  # oldest first
    weights = [math.exp(-coeff * i) for i in range(len(covering))]
    total = sum(w * chunks[q][:, step - q] for w, q in zip(weights, covering))
    return total / sum(weights)


@pytest.mark.parametrize("coeff", [0.01, 0.5, 0.0, -0.3])
def test_temporal_ensembler_matches_brute_force(coeff):
    chunk_size, n_steps = 5, 15
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, chunk_size, 3, generator=generator, dtype=torch.float64) for _ in range(n_steps)]
    ensembler = TemporalEnsembler(coeff, chunk_size)
    for step, chunk in enumerate(chunks):
        action = ensembler.update(chunk)
        assert action.shape == (2, 3)
        torch.testing.assert_close(action, brute_force_ensemble(chunks[: step + 1], step, coeff))


def test_temporal_ensembler_reset_and_first_step():
    chunk = torch.randn(1, 4, 2)
    ensembler = TemporalEnsembler(0.01, 4)
    ensembler.update(torch.randn(1, 4, 2))
    ensembler.reset()
    torch.testing.assert_close(ensembler.update(chunk), chunk[:, 0])


def test_temporal_ensembler_queries_every_step_and_checks_chunk_size():
    model = CountingModel(chunk_size=4)
    ensembler = TemporalEnsembler(0.01, 4)
    for _ in range(6):
        ensembler.select(model)
    assert model.calls == 6
    with pytest.raises(ValueError, match="chunks of 4"):
        ensembler.update(torch.zeros(2, 5, 3))


def test_make_action_selector_follows_the_config():
    assert isinstance(make_action_selector(ACTConfig(chunk_size=10, n_action_steps=4)), ActionQueue)
    ensembler = make_action_selector(ACTConfig(chunk_size=10, n_action_steps=1, temporal_ensemble_coeff=0.01))
    assert isinstance(ensembler, TemporalEnsembler)
    assert (ensembler.coeff, ensembler.chunk_size) == (0.01, 10)


def row_wise_predict(images: list[torch.Tensor], state: torch.Tensor, env: torch.Tensor | None) -> torch.Tensor:
    """A stand-in model whose chunk row b depends on observation b only: (B, 5, 2)."""
    steps = torch.arange(5, dtype=torch.float32).view(1, -1, 1)
    frame = images[0].float().mean(dim=(1, 2, 3)).view(-1, 1, 1)
    return (state[:, None, :1] * 10 + frame + steps).expand(-1, -1, 2).clone()


@pytest.mark.parametrize("selection", [dict(n_action_steps=3), dict(temporal_ensemble_coeff=0.1)])
def test_select_actions_keeps_each_environment_apart(selection):
    """Batched environments that start, stop and reset at different steps get the actions each would
    get alone: one model call per step, one queue / ensemble per environment."""
    from dinocache.policy.deployment.runtime import PolicyRuntime

    camera = "observation.images.top"
    metadata = {"cameras": [camera], "image_size": {camera: (4, 6)}, "state_dim": 2,
                "act_config": {"chunk_size": 5, "n_action_steps": 1}}

    def runtime() -> PolicyRuntime:
        return PolicyRuntime(row_wise_predict, metadata, torch.device("cpu"), **selection)

    generator = torch.Generator().manual_seed(0)
    # episode -> (environment, first step, length): env 1 runs two episodes, env 2 stops early
    episodes = {"a": (0, 0, 9), "b": (1, 0, 4), "c": (1, 4, 5), "d": (2, 0, 2)}
    observations = {name: [{camera: torch.randint(0, 255, (4, 6, 3), generator=generator, dtype=torch.uint8),
                            "observation.state": torch.randn(2, generator=generator)} for _ in range(length)]
                    for name, (_, _, length) in episodes.items()}
    alone = {}
    for name, steps in observations.items():
        policy = runtime()
        alone[name] = [policy.select_action(observation) for observation in steps]

    batched, together = runtime(), {name: [] for name in episodes}
    for t in range(9):
        live = [(name, env, t - start) for name, (env, start, length) in episodes.items() if start <= t < start + length]
        for name, env, k in live:
            if k == 0:
                batched.reset(env)
        queries = batched.queries
        actions = batched.select_actions([observations[name][k] for name, _, k in live], [env for _, env, _ in live])
        assert actions.shape == (len(live), 2) and batched.queries - queries <= 1
        for (name, _, _), action in zip(live, actions):
            together[name].append(action)
    for name in episodes:
        np.testing.assert_array_equal(np.stack(together[name]), np.stack(alone[name]))
