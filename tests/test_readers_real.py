"""The shared real LeRobot v2.1 dataset (G1 humanoid, AV1 640x480) reads completely.

Skipped when the checkout has no ``../shared`` folder (a user's fresh clone).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _datasets import real_dataset

from dinocache.datasets import CameraInfo, open_dataset


@pytest.fixture(scope="module")
def source():
    return open_dataset(real_dataset())


def test_metadata(source):
    assert source.format == "lerobot-v2.1"
    assert source.fps == 30.0
    assert [(e.index, e.length, e.start) for e in source.episodes] == \
           [(0, 393, 0), (1, 343, 393), (2, 357, 736)]
    assert source.num_frames == 1093 and source.skipped == []
    assert {e.task for e in source.episodes} == {"Pick up the yellow bottle on the table."}
    assert source.cameras == {"observation.images.cam_high": CameraInfo(
        "observation.images.cam_high", 480, 640)}
    assert list(source.lowdim) == ["observation.state", "action"]
    for info in source.lowdim.values():
        assert info.shape == (26,)
        assert info.names[0] == "kLeftShoulderPitch" and len(info.names) == 26  # nested list


def test_every_frame_decodes_and_matches_the_parquet(source):
    total = 0
    for ep in source.episodes:
        rows = pq.ParquetFile(source.path / f"data/chunk-000/episode_{ep.index:06d}.parquet"
                              ).metadata.num_rows
        low = source.read_lowdim(ep.index)
        assert low["observation.state"].shape == (rows, 26)
        assert low["action"].dtype == np.float32 and np.isfinite(low["action"]).all()
        frames = 0
        for batch in source.iter_frames(ep.index, "cam_high", batch_size=64):
            assert batch.dtype == np.uint8 and batch.shape[1:] == (480, 640, 3)
            assert batch[:, ::8, ::8].std() > 5  # real pictures, not a blank decode
            frames += len(batch)
        assert frames == rows == ep.length
        total += frames
    assert total == 1093


def test_fingerprint_is_stable(source):
    fingerprint = source.fingerprint()
    assert len(fingerprint) == 64
    assert open_dataset(source.path).fingerprint() == fingerprint
