"""Shared fixtures: generated datasets with real encoded video, and the shared real dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores: keep torch from oversubscribing them when several test processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_DATASET = SHARED / "datasets" / "g1_pick_bottle_3ep"


@pytest.fixture(scope="session")
def real_dataset() -> Path:
    """The real LeRobot v2.1 humanoid dataset beside the checkout (skipped where absent)."""
    if not (REAL_DATASET / "meta" / "info.json").is_file():
        pytest.skip(f"shared real dataset not found at {REAL_DATASET}")
    return REAL_DATASET


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Two cameras, three episodes of uneven length, real H.264 video: LeRobot v2.1 layout."""
    from dinocache.datasets.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "small", format="lerobot-v2.1",
                                   num_episodes=3, episode_length=14, image_size=(48, 64),
                                   cameras=("top", "wrist"), seed=0)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster, and reproducibly, on one
    intra-op thread than on two; modules of such tests use it for every test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
