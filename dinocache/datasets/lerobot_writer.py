"""The LeRobot writer: episodes to a LeRobot v2.1 or v3.0 folder, laid out as LeRobot writes one.

``info.json`` with feature dtype/shape/names, ``episodes.jsonl`` + ``episodes_stats.jsonl`` +
``tasks.jsonl`` (v2.1, as LeRobot 0.3 wrote it), ``meta/episodes/*.parquet`` + ``tasks.parquet`` +
``stats.json`` (v3.0, as LeRobot 0.6's ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode``
writes it: the same files, ``info.json`` keys, episode columns and statistics with quantiles),
parquet tables typed as Hugging Face ``datasets`` types them, so the readers are tested on files
like the ones they meet and ``LeRobotDataset`` (and ``lerobot-train``) load what this writes as it is.
The videos are dinocache's (H.264 by default, ``WriteSpec.codec``); LeRobot reads any of them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinocache.datasets.encode import DEFAULT_GOP, VIDEO_CODECS, BackgroundEncoder, VideoStream, png
from dinocache.datasets.episode import Episode, WriteSpec
from dinocache.datasets.lerobot_meta import (
    DEFAULT_CHUNKS_SIZE, INDEX_FEATURES, INFO_PATH, STATS_PATH, V21_DATA_PATH,
    V21_EPISODES_PATH, V21_EPISODES_STATS_PATH, V21_TASKS_PATH, V21_VIDEO_PATH,
    V30_DATA_PATH, V30_EPISODES_PATH, V30_TASKS_PATH, V30_VIDEO_PATH)
from dinocache.datasets.lerobot_stats import QUANTILES, aggregate_stats, image_stats, vector_stats
from dinocache.keys import ACTION, OBS_ENV_STATE, OBS_STATE, OBS_VELOCITY, camera_key

__all__ = ["write_lerobot_v21", "write_lerobot_v30"]


def _features(spec: WriteSpec, version: str) -> dict[str, dict[str, Any]]:
    """info.json ``features`` in LeRobot's order: lowdim, cameras, then the index columns.

    A v3.0 video's ``info`` is what LeRobot 0.6 records: the stream's properties, the encoder's
    settings as ``video.<field>`` (so that LeRobot's editing tools re-encode alike) and
    ``is_depth_map``; v2.1 keeps LeRobot 0.3's ``video.is_depth_map``.
    """
    def vector(dim: int, names: Sequence[str] | None) -> dict[str, Any]:
        return {"dtype": "float32", "shape": [dim], "names": list(names) if names else None}

    features = {OBS_STATE: vector(spec.state_dim, spec.state_names),
                OBS_VELOCITY: vector(spec.state_dim, spec.state_names)}
    if spec.env_state_names is not None:
        features[OBS_ENV_STATE] = vector(len(spec.env_state_names), spec.env_state_names)
    features[ACTION] = vector(spec.action_dim, spec.action_names)
    height, width = spec.image_size
    for cam in spec.cameras:
        feature: dict[str, Any] = {"dtype": spec.image_storage, "shape": [height, width, 3],
                                   "names": ["height", "width", "channels"]}
        if spec.image_storage == "video":
            feature["info"] = _video_info(spec, version)
        features[camera_key(cam)] = feature
    features.update(json.loads(json.dumps(INDEX_FEATURES)))
    return features


def _video_info(spec: WriteSpec, version: str) -> dict[str, Any]:
    height, width = spec.image_size
    _, default_pix_fmt, default_crf = VIDEO_CODECS[spec.codec]
    pix_fmt = spec.pix_fmt or default_pix_fmt
    if version == "v2.1":
        return {"video.height": height, "video.width": width, "video.codec": spec.codec,
                "video.pix_fmt": pix_fmt, "video.is_depth_map": False, "video.fps": spec.fps,
                "video.channels": 3, "has_audio": False}
    return {"video.height": height, "video.width": width, "video.codec": spec.codec, "video.pix_fmt": pix_fmt,
            "video.fps": spec.fps, "video.channels": 3, "has_audio": False,
            "video.g": DEFAULT_GOP if spec.gop is None else spec.gop,
            "video.crf": default_crf if spec.crf is None else spec.crf,
            "video.preset": 10 if spec.codec == "av1" else None, "video.fast_decode": 0,
            "video.video_backend": "pyav", "video.extra_options": {}, "is_depth_map": False}


def _info(spec: WriteSpec, version: str, num_episodes: int, num_frames: int,
          num_tasks: int, **layout: Any) -> dict[str, Any]:
    """``meta/info.json``, its keys in the order the LeRobot release that wrote the version has them."""
    counts = {"total_episodes": num_episodes, "total_frames": num_frames, "total_tasks": num_tasks}
    splits = {"train": f"0:{num_episodes}"}
    if version == "v2.1":
        return {"codebase_version": version, "robot_type": spec.robot_type, **counts, **layout,
                "fps": spec.fps, "splits": splits, "data_path": V21_DATA_PATH,
                "video_path": V21_VIDEO_PATH if spec.video_keys else None,
                "features": _features(spec, version)}
    return {"codebase_version": version, "fps": spec.fps, "features": _features(spec, version), **counts,
            **layout, "data_path": V30_DATA_PATH, "video_path": V30_VIDEO_PATH if spec.video_keys else None,
            "robot_type": spec.robot_type, "splits": splits}


def _frame_table(ep: Episode, spec: WriteSpec, first_index: int,
                 task_index: int, version: str) -> pa.Table:
    """One episode's rows, typed as ``datasets`` writes them (fixed-size lists, Image structs).

    The schema's ``huggingface`` metadata names a vector ``Sequence`` in v2.1 (``datasets`` 3, which
    LeRobot 0.3 used) and ``List`` in v3.0 (``datasets`` 4, LeRobot 0.6); so do the PNG names.
    """
    vector_type, png_name = ("Sequence", "frame_{:06d}.png") if version == "v2.1" else ("List", "frame-{:06d}.png")
    length = ep.length
    columns: dict[str, pa.Array] = {}
    hf_features: dict[str, Any] = {}
    for key, value in ep.lowdim().items():
        dim = value.shape[1]
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), dim)
        hf_features[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim,
                            "_type": vector_type}
    if spec.image_storage == "image":
        for cam in spec.cameras:
            pngs = [png(frame) for frame in ep.frames[cam]]
            columns[camera_key(cam)] = pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()),
                 pa.array([png_name.format(i) for i in range(length)], pa.string())],
                names=["bytes", "path"])
            hf_features[camera_key(cam)] = {"_type": "Image"}
    frame_index = np.arange(length, dtype=np.int64)
    columns["timestamp"] = pa.array((frame_index / spec.fps).astype(np.float32))
    columns["frame_index"] = pa.array(frame_index)
    columns["episode_index"] = pa.array(np.full(length, ep.index, np.int64))
    columns["index"] = pa.array(first_index + frame_index)
    columns["task_index"] = pa.array(np.full(length, task_index, np.int64))
    for key in INDEX_FEATURES:
        hf_features[key] = {"dtype": INDEX_FEATURES[key]["dtype"], "_type": "Value"}
    table = pa.table(columns)
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features}}).encode()}
    return table.replace_schema_metadata(meta)


def _episode_stats(ep: Episode, table: pa.Table, spec: WriteSpec, version: str) -> dict[str, Any]:
    """One episode's stats in info.json's feature order; v3.0 (LeRobot 0.6) with quantiles."""
    quantiles = version == "v3.0"
    stats = {key: vector_stats(value, quantiles) for key, value in ep.lowdim().items()}
    for cam in spec.cameras:
        stats[camera_key(cam)] = image_stats(ep.frames[cam], quantiles)
    for key in INDEX_FEATURES:
        stats[key] = vector_stats(table[key].to_numpy(), quantiles)
    return stats


def _write_json(file: Path, data: Any) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(file: Path, rows: Iterable[dict[str, Any]]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")


def _write_parquet(file: Path, table: pa.Table) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)


def write_lerobot_v21(out: Path, episodes: Iterable[Episode], spec: WriteSpec) -> None:
    """One parquet per episode and one mp4 per episode and camera; metadata once all are written."""
    listing, stats_rows, tasks = [], [], {}
    total = 0
    with BackgroundEncoder() as videos:  # each episode's mp4s are encoded while the next one arrives
        for ep in episodes:
            task_index = tasks.setdefault(ep.task, len(tasks))
            chunk = ep.index // DEFAULT_CHUNKS_SIZE
            table = _frame_table(ep, spec, total, task_index, "v2.1")
            _write_parquet(out / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep.index),
                           table)
            for cam, key in zip(spec.cameras, spec.video_keys):
                videos.submit(out / V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=key,
                                                          episode_index=ep.index),
                              ep.frames[cam], spec.fps, spec.codec, crf=spec.crf,
                              pix_fmt=spec.pix_fmt, gop=spec.gop)
            listing.append({"episode_index": ep.index, "tasks": [ep.task], "length": ep.length})
            stats_rows.append({"episode_index": ep.index,
                               "stats": _episode_stats(ep, table, spec, "v2.1")})
            total += ep.length
    _write_jsonl(out / V21_EPISODES_PATH, listing)
    _write_jsonl(out / V21_EPISODES_STATS_PATH, stats_rows)
    _write_jsonl(out / V21_TASKS_PATH, [{"task_index": i, "task": t} for t, i in tasks.items()])
    chunks = (len(listing) - 1) // DEFAULT_CHUNKS_SIZE + 1
    _write_json(out / INFO_PATH, _info(
        spec, "v2.1", len(listing), total, len(tasks),
        total_videos=len(listing) * len(spec.video_keys), total_chunks=chunks,
        chunks_size=DEFAULT_CHUNKS_SIZE))


def write_lerobot_v30(out: Path, episodes: Iterable[Episode], spec: WriteSpec) -> None:
    """Pack ``spec.episodes_per_file`` episodes (default all) per parquet / mp4, as LeRobot appends them.

    Episodes are streamed: each one's rows go to the file's parquet as one row group and its frames
    to the file's videos as it arrives, so only one episode is held at a time (``sim demos`` writes
    hundreds of 400-frame episodes into one file).
    """
    per_file = spec.episodes_per_file or sys.maxsize
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    all_stats: list[dict[str, Any]] = []
    stream = iter(episodes)
    first = next(stream, None)
    number = 0
    while first is not None:
        chunk, file = divmod(number, DEFAULT_CHUNKS_SIZE)
        first = _write_v30_file(out, itertools.chain([first], stream), spec, chunk, file, per_file,
                                tasks, rows, all_stats)
        number += 1
    _write_parquet(out / V30_EPISODES_PATH.format(chunk_index=0, file_index=0),
                   pa.Table.from_pylist(rows))
    _write_parquet(out / V30_TASKS_PATH, _tasks_table(tasks))
    _write_json(out / STATS_PATH, aggregate_stats(all_stats))
    total = rows[-1]["dataset_to_index"] if rows else 0
    _write_json(out / INFO_PATH, _info(  # LeRobot 0.6's default file sizes
        spec, "v3.0", len(rows), total, len(tasks), chunks_size=DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb=100, video_files_size_in_mb=200))


def _write_v30_file(out: Path, episodes: Iterator[Episode], spec: WriteSpec, chunk: int, file: int,
                    per_file: int, tasks: dict[str, int], rows: list[dict[str, Any]],
                    all_stats: list[dict[str, Any]]) -> Episode | None:
    """Write up to ``per_file`` episodes into one parquet and one mp4 per camera, adding their
    episode rows and stats; return the next file's first episode (None when there is none)."""
    data_file = out / V30_DATA_PATH.format(chunk_index=chunk, file_index=file)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        videos = {key: files.enter_context(VideoStream(
            out / V30_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file), spec.fps,
            spec.codec, crf=spec.crf, pix_fmt=spec.pix_fmt, gop=spec.gop)) for key in spec.video_keys}
        writer: pq.ParquetWriter | None = None
        offset = 0
        for count, ep in enumerate(episodes):
            if count == per_file:
                return ep
            total = rows[-1]["dataset_to_index"] if rows else 0
            table = _frame_table(ep, spec, total, tasks.setdefault(ep.task, len(tasks)), "v3.0")
            if writer is None:
                writer = files.enter_context(pq.ParquetWriter(data_file, table.schema))
            writer.write_table(table)  # one row group per episode, as LeRobot writes them
            for cam, key in zip(spec.cameras, spec.video_keys):
                videos[key].write(ep.frames[cam])
            row: dict[str, Any] = {
                "episode_index": ep.index, "tasks": [ep.task], "length": ep.length,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": total, "dataset_to_index": total + ep.length}
            for key in spec.video_keys:
                row[f"videos/{key}/chunk_index"] = chunk
                row[f"videos/{key}/file_index"] = file
                row[f"videos/{key}/from_timestamp"] = offset / spec.fps
                row[f"videos/{key}/to_timestamp"] = (offset + ep.length) / spec.fps
            episode_stats = _episode_stats(ep, table, spec, "v3.0")
            all_stats.append(episode_stats)
            for feature, stats in episode_stats.items():
                for name in ("min", "max", "mean", "std", "count", *QUANTILES):  # LeRobot's column order
                    row[f"stats/{feature}/{name}"] = stats[name]
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            rows.append(row)
            offset += ep.length
    return None


def _tasks_table(tasks: dict[str, int]) -> pa.Table:
    """``meta/tasks.parquet`` as pandas writes LeRobot's DataFrame indexed by ``task``.

    The pandas metadata makes ``pd.read_parquet`` (what LeRobot uses) restore ``task`` as the
    index; pyarrow readers see it as an ordinary column.
    """
    table = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()),
                      "task": pa.array(list(tasks), pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                            "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3"}
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
