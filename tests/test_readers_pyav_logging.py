"""Decoding never hangs because something turned PyAV's Python logging on.

torchvision < 0.24 calls ``av.logging.set_level(av.logging.ERROR)`` on import (LeRobot 0.6.1 admits
torchvision 0.22 and 0.23). PyAV's log callback then takes the GIL for every FFmpeg message, and a decoder
closed while one of its frame threads logs deadlocks (PyAV-Org/PyAV#751): before the readers
turned that callback off, about one run in five of the reader tests hung at the end of a clip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av.logging
import numpy as np
import pytest

from dinocache.datasets import open_dataset
from dinocache.datasets.encode import encode_video
from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.datasets.video import open_video


@pytest.fixture
def logging_on():
    """PyAV logging switched on as torchvision < 0.24 does on import; PyAV's default restored after."""
    av.logging.set_level(av.logging.ERROR)
    yield
    av.logging.set_level(None)


def test_opening_or_writing_a_video_turns_pyav_logging_off(tmp_path: Path, logging_on):
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    encode_video(tmp_path / "a.mp4", frames, fps=10)
    assert av.logging.get_level() is None, "writing a video must turn the callback off"
    av.logging.set_level(av.logging.ERROR)
    with open_video(tmp_path / "a.mp4") as container:
        assert container.streams.video
    assert av.logging.get_level() is None, "opening a video must turn the callback off"


def test_threaded_decoding_with_logging_switched_on_does_not_hang(tmp_path: Path):
    """Every clip of a v3.0 dataset (episodes entered by seeking) read 12 times, in a process that
    switched PyAV logging on at its most talkative, finishes well within its time limit."""
    root = write_synthetic_dataset(tmp_path / "data", format="lerobot-v3.0", num_episodes=3, episode_length=12,
                                   image_size=(48, 64), cameras=("top", "wrist"), seed=0)
    script = f"""
import logging, av.logging
from dinocache.datasets import open_dataset
logging.basicConfig(level=1, filename={str(tmp_path / "ffmpeg.log")!r})  # every message through Python
av.logging.set_level(av.logging.VERBOSE)
source = open_dataset({str(root)!r})
for _ in range(12):
    for ep in source.episodes:
        for cam in source.cameras:
            frames = sum(len(batch) for batch in source.iter_frames(ep.index, cam))
            assert frames == ep.length, (frames, ep)
print("decoded")
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("decoding hung with PyAV logging switched on (a decoder thread waiting for the GIL)")
    assert done.returncode == 0 and "decoded" in done.stdout, done.stderr
    assert open_dataset(root).episodes  # the dataset itself is fine
