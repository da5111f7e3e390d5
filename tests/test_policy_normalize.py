"""Normalizer: formula, near-constant dimensions, state_dict round trips, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocache.policy.model.normalize import Normalizer

STATS = {
    "observation.state": {
        "mean": np.array([1.0, -2.0, 0.5]),
        "std": np.array([2.0, 0.5, 0.0]),
        "min": np.zeros(3),  # other statistics are ignored
    },
    "action": {"mean": torch.tensor([0.1, 0.2]), "std": [3.0, 4.0]},
}


def test_normalize_and_unnormalize_broadcast_over_leading_dims():
    normalizer = Normalizer(STATS)
    actions = torch.randn(4, 6, 2)
    expected = (actions - torch.tensor([0.1, 0.2])) / torch.tensor([3.0, 4.0])
    torch.testing.assert_close(normalizer.normalize("action", actions), expected)
    torch.testing.assert_close(normalizer.unnormalize("action", expected), actions)


def test_constant_dimension_is_only_centred_and_round_trips():
    normalizer = Normalizer(STATS)
    state = torch.tensor([[3.0, -1.0, 0.7]])
    normalized = normalizer.normalize("observation.state", state)
    torch.testing.assert_close(normalized, torch.tensor([[1.0, 2.0, 0.2]]))  # std 0 -> scale 1, not 1e8
    torch.testing.assert_close(normalizer.unnormalize("observation.state", normalized), state)


def test_eps_threshold():
    stats = {"x": {"mean": [0.0, 0.0], "std": [5e-5, 5e-3]}}
    assert Normalizer(stats).stats["x"].std.tolist() == pytest.approx([1.0, 5e-3])
    assert Normalizer(stats, eps=1e-6).stats["x"].std.tolist() == pytest.approx([5e-5, 5e-3])


def test_keys_and_unknown_key():
    normalizer = Normalizer(STATS)
    assert normalizer.keys == ["observation.state", "action"]
    assert "action" in normalizer and "observation.environment_state" not in normalizer
    with pytest.raises(KeyError, match="environment_state.*known keys: observation.state, action"):
        normalizer.normalize("observation.environment_state", torch.zeros(1, 3))


def test_follows_input_dtype():
    normalizer = Normalizer(STATS)
    assert normalizer.normalize("action", torch.zeros(2, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ({"a": {"mean": [0.0]}}, "lack std"),
        ({"a": {"mean": [0.0, 1.0], "std": [1.0]}}, "shape"),
        ({"a": {"mean": [0.0], "std": [-1.0]}}, "negative"),
        ({"a": {"mean": [float("nan")], "std": [1.0]}}, "NaN"),
        ({"a/b": {"mean": [0.0], "std": [1.0]}}, "'/'"),
    ],
)
def test_bad_statistics_are_rejected(stats, message):
    with pytest.raises(ValueError, match=message):
        Normalizer(stats)


def test_state_dict_round_trips():
    normalizer = Normalizer(STATS)
    state_dict = normalizer.state_dict()
    assert set(state_dict) == {
        "stats.observation/state.mean",
        "stats.observation/state.std",
        "stats.action.mean",
        "stats.action.std",
    }
    # Into a normaliser built from other numbers with the same layout (the load-a-checkpoint path)...
    other = Normalizer({"observation.state": {"mean": np.zeros(3), "std": np.ones(3)}, "action": STATS["action"]})
    other.load_state_dict(state_dict)
    # ...and from the state dict alone, also nested in a bigger model's.
    nested = {"normalizer." + key: value for key, value in state_dict.items()}
    rebuilt = Normalizer.from_state_dict(nested, prefix="normalizer.")
    state = torch.tensor([[3.0, -1.0, 0.7]])
    for restored in (other, rebuilt):
        assert restored.keys == normalizer.keys
        torch.testing.assert_close(
            restored.normalize("observation.state", state), normalizer.normalize("observation.state", state)
        )


def test_exports_with_statistics_as_constants():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.normalizer = Normalizer(STATS)

        def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
            state = self.normalizer.normalize("observation.state", state)
            return state.sum(-1, keepdim=True) + self.normalizer.unnormalize("action", action)

    module = Wrapper()
    args = (torch.randn(3, 3), torch.randn(3, 2))
    exported = torch.export.export(module, args)
    torch.testing.assert_close(exported.module()(*args), module(*args))
