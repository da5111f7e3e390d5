"""What the crash-and-resume tests of training share: a run crashed mid-way by a real exception in its
optimiser step, and the check that a resumed run is the uninterrupted one, record for record and weight
for weight."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from dinocache.policy.model.checkpoint import load_head
from dinocache.policy.training.train import TrainConfig, train


def metrics(run: Path) -> list[dict]:
    """The records of ``run``'s ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_crashing_at(config: TrainConfig, call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train(config)``, dying of a RuntimeError in the optimiser's ``call``-th step (after whatever
    checkpoints and records came before it), as a run dies of a fault mid-way."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config)
    finally:
        monkeypatch.undo()


def assert_same_run(whole: Path, split: Path, keys: Iterable[str]) -> None:
    """The resumed run ``split`` wrote the records of the uninterrupted run ``whole`` (at the same steps,
    ``keys`` equal to the bit) and ended with the same head weights, to the bit."""
    records = metrics(whole), metrics(split)
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]]
    for a, b in zip(*records):
        for key in keys:
            assert a[key] == b[key], (key, a, b)
    weights = [load_head(run)[0].state_dict() for run in (whole, split)]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
