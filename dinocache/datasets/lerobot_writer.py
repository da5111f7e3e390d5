"""The LeRobot writer: episodes to a LeRobot v2.1 or v3.0 folder, laid out as LeRobot writes one.

``info.json`` with feature dtype/shape/names, ``episodes.jsonl`` + ``episodes_stats.jsonl`` +
``tasks.jsonl`` (v2.1), ``meta/episodes/*.parquet`` + ``tasks.parquet`` + ``stats.json`` (v3.0),
parquet tables typed as Hugging Face ``datasets`` types them and per-episode statistics computed as
LeRobot computes them, so the readers are tested on files like the ones they meet (and LeRobot
itself can load what this writes).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinocache.datasets.encode import VIDEO_CODECS, BackgroundEncoder, encode_video, png
from dinocache.datasets.episode import Episode, WriteSpec
from dinocache.datasets.lerobot_meta import (
    DEFAULT_CHUNKS_SIZE, INDEX_FEATURES, INFO_PATH, STATS_PATH, V21_DATA_PATH,
    V21_EPISODES_PATH, V21_EPISODES_STATS_PATH, V21_TASKS_PATH, V21_VIDEO_PATH,
    V30_DATA_PATH, V30_EPISODES_PATH, V30_TASKS_PATH, V30_VIDEO_PATH)
from dinocache.keys import ACTION, OBS_ENV_STATE, OBS_STATE, OBS_VELOCITY, camera_key

__all__ = ["write_lerobot_v21", "write_lerobot_v30"]


def _features(spec: WriteSpec, version: str) -> dict[str, dict[str, Any]]:
    """info.json ``features`` in LeRobot's order: lowdim, cameras, then the index columns."""
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
            default_pix_fmt = VIDEO_CODECS[spec.codec][1]
            feature["info"] = {
                "video.height": height, "video.width": width, "video.codec": spec.codec,
                "video.pix_fmt": spec.pix_fmt or default_pix_fmt, "video.is_depth_map": False,
                "video.fps": spec.fps, "video.channels": 3, "has_audio": False}
        features[camera_key(cam)] = feature
    features.update(json.loads(json.dumps(INDEX_FEATURES)))
    if version == "v3.0":  # v3.0 records the rate of every non-video feature
        for feature in features.values():
            if feature["dtype"] != "video":
                feature["fps"] = spec.fps
    return features


def _info(spec: WriteSpec, version: str, num_episodes: int, num_frames: int,
          num_tasks: int, **layout: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "codebase_version": version, "robot_type": spec.robot_type,
        "total_episodes": num_episodes, "total_frames": num_frames, "total_tasks": num_tasks}
    info.update(layout)
    info["fps"] = spec.fps
    info["splits"] = {"train": f"0:{num_episodes}"}
    info["data_path"] = V21_DATA_PATH if version == "v2.1" else V30_DATA_PATH
    template = V21_VIDEO_PATH if version == "v2.1" else V30_VIDEO_PATH
    info["video_path"] = template if spec.video_keys else None
    info["features"] = _features(spec, version)
    return info


def _frame_table(ep: Episode, spec: WriteSpec, first_index: int,
                 task_index: int) -> pa.Table:
    """One episode's rows, typed as ``datasets`` writes them (fixed-size lists, Image structs)."""
    length = ep.length
    columns: dict[str, pa.Array] = {}
    hf_features: dict[str, Any] = {}
    for key, value in ep.lowdim().items():
        dim = value.shape[1]
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), dim)
        hf_features[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim,
                            "_type": "Sequence"}
    if spec.image_storage == "image":
        for cam in spec.cameras:
            pngs = [png(frame) for frame in ep.frames[cam]]
            columns[camera_key(cam)] = pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()),
                 pa.array([f"frame_{i:06d}.png" for i in range(length)], pa.string())],
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


def _stats(values: np.ndarray) -> dict[str, Any]:
    """LeRobot per-feature stats of a low-dimensional array: min/max/mean/std over frames."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    return {"min": flat.min(0).tolist(), "max": flat.max(0).tolist(),
            "mean": flat.mean(0).tolist(), "std": flat.std(0).tolist(), "count": [len(values)]}


def _image_stats(frames: np.ndarray) -> dict[str, Any]:
    """LeRobot image stats: per channel, in [0, 1], shaped (3, 1, 1), over sampled frames.

    Like LeRobot, about ``T ** 0.75`` frames (at least 100, or all when fewer) are sampled
    evenly and frames larger than 300 px are strided down to about 150 px; ``count`` is the
    number of frames sampled. The moments come from each channel's 256-bin histogram, exact
    and about ten times faster than in floating point over every pixel (this runs once per
    episode and camera in the process that writes the dataset).
    """
    length = len(frames)
    wanted = length if length < 100 else max(100, min(int(length ** 0.75), 10_000))
    picked = frames[np.round(np.linspace(0, length - 1, wanted)).astype(int)]
    height, width = picked.shape[1:3]
    if max(height, width) >= 300:
        step = int(max(height, width) / 150)
        picked = picked[:, ::step, ::step]
    levels = np.arange(256, dtype=np.float64) / 255.0
    counts = np.stack([np.bincount(picked[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.float64)
    total = counts.sum(1)
    mean = counts @ levels / total
    std = np.sqrt(np.maximum(counts @ levels ** 2 / total - mean ** 2, 0.0))
    present = counts > 0
    stats = {"min": levels[present.argmax(1)], "max": levels[255 - present[:, ::-1].argmax(1)], "mean": mean,
             "std": std}
    return {**{k: np.asarray(v, np.float64).reshape(3, 1, 1).tolist() for k, v in stats.items()},
            "count": [len(picked)]}


def _aggregate_stats(per_episode: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """meta/stats.json from per-episode stats, as LeRobot aggregates them.

    Means are weighted by ``count``; the variance pools each episode's variance with the spread
    of the episode means around the overall mean.
    """
    out: dict[str, Any] = {}
    for key in per_episode[0]:
        parts = [ep[key] for ep in per_episode]
        counts = np.array([p["count"][0] for p in parts], np.float64)
        means = np.array([p["mean"] for p in parts], np.float64)
        stds = np.array([p["std"] for p in parts], np.float64)
        weights = (counts / counts.sum()).reshape(-1, *([1] * (means.ndim - 1)))
        mean = (weights * means).sum(0)
        variance = (weights * (stds ** 2 + (means - mean) ** 2)).sum(0)
        out[key] = {"min": np.min([p["min"] for p in parts], axis=0).tolist(),
                    "max": np.max([p["max"] for p in parts], axis=0).tolist(),
                    "mean": mean.tolist(), "std": np.sqrt(variance).tolist(),
                    "count": [int(counts.sum())]}
    return out


def _episode_stats(ep: Episode, table: pa.Table, spec: WriteSpec) -> dict[str, Any]:
    stats = {key: _stats(value) for key, value in ep.lowdim().items()}
    for cam in spec.cameras:
        stats[camera_key(cam)] = _image_stats(ep.frames[cam])
    for key in INDEX_FEATURES:
        stats[key] = _stats(table[key].to_numpy())
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
            table = _frame_table(ep, spec, total, task_index)
            _write_parquet(out / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep.index),
                           table)
            for cam, key in zip(spec.cameras, spec.video_keys):
                videos.submit(out / V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=key,
                                                          episode_index=ep.index),
                              ep.frames[cam], spec.fps, spec.codec, crf=spec.crf,
                              pix_fmt=spec.pix_fmt, gop=spec.gop)
            listing.append({"episode_index": ep.index, "tasks": [ep.task], "length": ep.length})
            stats_rows.append({"episode_index": ep.index,
                               "stats": _episode_stats(ep, table, spec)})
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
    """Pack ``spec.episodes_per_file`` episodes (default all) per parquet / mp4, holding one file's
    episodes in memory."""
    per_file = spec.episodes_per_file or sys.maxsize
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    all_stats: list[dict[str, Any]] = []
    total = 0
    stream = iter(episodes)
    for number, group in enumerate(iter(lambda: list(itertools.islice(stream, per_file)), [])):
        chunk, file = divmod(number, DEFAULT_CHUNKS_SIZE)
        tables = []
        for ep in group:
            task_index = tasks.setdefault(ep.task, len(tasks))
            tables.append(_frame_table(ep, spec, total + sum(t.num_rows for t in tables),
                                       task_index))
        data_file = out / V30_DATA_PATH.format(chunk_index=chunk, file_index=file)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(data_file, tables[0].schema) as writer:
            for table in tables:  # one row group per episode, as LeRobot writes them
                writer.write_table(table)
        for cam, key in zip(spec.cameras, spec.video_keys):
            encode_video(out / V30_VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                     file_index=file),
                         (frame for ep in group for frame in ep.frames[cam]), spec.fps,
                         spec.codec, crf=spec.crf, pix_fmt=spec.pix_fmt, gop=spec.gop)
        offset = 0
        for ep, table in zip(group, tables):
            row: dict[str, Any] = {
                "episode_index": ep.index, "tasks": [ep.task], "length": ep.length,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": total, "dataset_to_index": total + ep.length}
            for key in spec.video_keys:
                row[f"videos/{key}/chunk_index"] = chunk
                row[f"videos/{key}/file_index"] = file
                row[f"videos/{key}/from_timestamp"] = offset / spec.fps
                row[f"videos/{key}/to_timestamp"] = (offset + ep.length) / spec.fps
            episode_stats = _episode_stats(ep, table, spec)
            all_stats.append(episode_stats)
            for feature, stats in episode_stats.items():
                for name, value in stats.items():
                    row[f"stats/{feature}/{name}"] = value
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            rows.append(row)
            offset += ep.length
            total += ep.length
    _write_parquet(out / V30_EPISODES_PATH.format(chunk_index=0, file_index=0),
                   pa.Table.from_pylist(rows))
    _write_parquet(out / V30_TASKS_PATH, _tasks_table(tasks))
    _write_json(out / STATS_PATH, _aggregate_stats(all_stats))
    _write_json(out / INFO_PATH, _info(
        spec, "v3.0", len(rows), total, len(tasks), chunks_size=DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb=100, video_files_size_in_mb=500))


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
