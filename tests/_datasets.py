"""Helpers for the reader tests: tiny generated datasets, the shared real one, and ways to break them.

Every "break" helper edits a generated dataset the way real datasets go wrong (a recorder
killed mid-write, a video re-encoded at another rate, a NaN from a dropped sensor packet), so
the tests exercise the readers' checks on realistic files rather than on mocks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinocache.errors import DatasetError
from dinocache.datasets.encode import encode_video
from dinocache.datasets.synthetic import synthetic_episode, write_synthetic_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_DATASET = SHARED / "datasets" / "g1_pick_bottle_3ep"

#: Small enough that a dataset is written in well under a second.
TINY = dict(num_episodes=3, episode_length=12, image_size=(48, 64))


def make(tmp_path: Path, format: str = "lerobot-v2.1", name: str | None = None,
         **overrides: Any) -> Path:
    """Write a tiny synthetic dataset under ``tmp_path`` (see :data:`TINY`)."""
    kwargs = {**TINY, **overrides}
    return write_synthetic_dataset(tmp_path / (name or format), format=format, **kwargs)


def real_dataset() -> Path:
    """The shared real LeRobot v2.1 dataset, or skip the test when this checkout has none."""
    if not (REAL_DATASET / "meta" / "info.json").is_file():
        pytest.skip(f"shared dataset not present at {REAL_DATASET}")
    return REAL_DATASET


def error_text(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    """Check that a DatasetError is one line holding every fragment; return its text."""
    assert excinfo.type is DatasetError, excinfo.type
    text = str(excinfo.value)
    assert "\n" not in text, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


# ------------------------------------------------------------------------------ locating --
def v21_video(root: Path, episode: int, camera: str = "top") -> Path:
    return root / f"videos/chunk-000/observation.images.{camera}/episode_{episode:06d}.mp4"


def v21_data(root: Path, episode: int) -> Path:
    return root / f"data/chunk-000/episode_{episode:06d}.parquet"


def v30_video(root: Path, file_index: int, camera: str = "top") -> Path:
    return root / f"videos/observation.images.{camera}/chunk-000/file-{file_index:03d}.mp4"


def v30_data(root: Path, file_index: int) -> Path:
    return root / f"data/chunk-000/file-{file_index:03d}.parquet"


V30_EPISODES = "meta/episodes/chunk-000/file-000.parquet"


# ------------------------------------------------------------------------------ breaking --
def truncate(file: Path, fraction: float) -> None:
    """Keep only the first ``fraction`` of the bytes, as a recorder killed mid-write leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * fraction)])


def zero_middle_of_mdat(file: Path) -> None:
    """Zero the middle third of an mp4's media data (bit rot / a bad copy), keeping the header."""
    data = bytearray(file.read_bytes())
    start = data.find(b"mdat") + 8
    end = data.find(b"moov") if data.find(b"moov") > start else len(data)
    third = (end - start) // 3
    data[start + third: start + 2 * third] = bytes(third)
    file.write_bytes(bytes(data))


def reencode(file: Path, episode: int, length: int, *, fps: float = 30,
             image_size: tuple[int, int] = (48, 64), faststart: bool = False) -> None:
    """Replace a v2.1 episode video with one of ``length`` frames (of that episode's scene)."""
    frames = synthetic_episode(episode, length, image_size=image_size).frames["top"]
    file.unlink()
    encode_video(file, frames, fps)
    if faststart:
        _move_moov_first(file)


def _move_moov_first(file: Path) -> None:
    """Rewrite an mp4 with its index first (``-movflags faststart``) by remuxing with PyAV."""
    import av

    tmp = file.with_suffix(".tmp.mp4")
    with av.open(str(file)) as src, av.open(str(tmp), "w",
                                            options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            dst.mux(packet)
    tmp.replace(file)


def edit_parquet(file: Path, edit: Callable[[dict[str, np.ndarray]], None],
                 column: str) -> None:
    """Rewrite one list-of-float column of a parquet through ``edit`` on its ``(rows, n)`` array."""
    table = pq.read_table(file)
    values = np.stack(table[column].to_pylist()).astype(np.float32)
    holder = {column: values}
    edit(holder)
    values = holder[column]
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    table = table.set_column(table.schema.get_field_index(column), column, array)
    pq.write_table(table, file)


def edit_json(file: Path, edit: Callable[[Any], Any]) -> None:
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))


def edit_jsonl(file: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    file.write_text("".join(json.dumps(edit(row)) + "\n" for row in rows))


def edit_episode_table(root: Path, column: str, episode: int, value: Any) -> None:
    """Set one cell of the v3.0 episode table."""
    file = root / V30_EPISODES
    rows = pq.read_table(file).to_pylist()
    for row in rows:
        if row["episode_index"] == episode:
            row[column] = value
    pq.write_table(pa.Table.from_pylist(rows), file)


def edit_hdf5(file: Path, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    with h5py.File(file, "r+") as root:
        data = edit(root[name][()])
        del root[name]
        root.create_dataset(name, data=data)
