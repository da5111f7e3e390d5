"""Inputs of the LeRobot tests (``tests/test_lerobot_*.py``): a tiny dataset written by LeRobot's own
writer, dinocache feature stores of it, and the tiny head every test trains.

Imported only by test modules that have already skipped where LeRobot is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from dinocache.pipeline.extract import ExtractConfig, extract

BIN = Path(sys.executable).parent
CAMERA = "observation.images.top"
#: A tiny head on a tiny grid: what every test here trains and compares.
TINY = dict(device="cpu", vision_backbone="dinov2_vits14", image_size=28, pretrained_backbone_weights="random",
            chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1,
            n_vae_encoder_layers=1, latent_dim=4)


def write_dataset(root: Path, seed: int = 0, image_hw: tuple[int, int] = (48, 64), dim: int = 4, episodes: int = 3,
                  frames: int = 20, fps: int = 10) -> Path:
    """A tiny LeRobot v3.0 dataset written by LeRobot itself (AV1 video): a bright bar moving over a
    coloured field, state and action of ``dim`` values."""
    height, width = image_hw
    features = {
        CAMERA: {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (dim,), "names": [f"j{i}" for i in range(dim)]},
        "action": {"dtype": "float32", "shape": (dim,), "names": [f"j{i}" for i in range(dim)]},
    }
    dataset = LeRobotDataset.create("local/tiny", fps=fps, features=features, root=root, use_videos=True)
    rng = np.random.default_rng(seed)
    bar = max(height // 5, 1)
    for episode in range(episodes):
        for i in range(frames):
            image = np.empty((height, width, 3), np.uint8)
            image[:] = rng.integers(0, 255, 3, dtype=np.uint8)
            image[bar + i * bar // 4:2 * bar + i * bar // 4, 5 * episode * bar // 10:(5 * episode + 20) * bar // 10] = 255
            state = rng.normal(size=dim).astype(np.float32)
            dataset.add_frame({CAMERA: image, "observation.state": state, "action": state + 0.1, "task": "move"})
        dataset.save_episode()
    dataset.finalize()
    return root


def write_store(dataset: Path, out: Path, dtype: str) -> Path:
    extract(ExtractConfig(dataset=dataset, out=out, backbone="dinov2_vits14", weights="random", image_size="28",
                          dtype=dtype, device="cpu", progress=False))
    return out
