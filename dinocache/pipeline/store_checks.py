"""A feature store checks itself as a whole: each part must agree with the others, not only read.

Zarr's per-chunk crc32c proves that a chunk holds the bytes it was written with, not that they are
the right bytes: a shard file copied from another unit or another store, an array whose
``zarr.json`` shape was edited, or a root record whose ``num_frames`` changed all read cleanly.
Two checks close that gap:

* :func:`structure_problems`: every per-frame array has ``num_frames`` rows, the episodes table
  tiles them exactly (starts, lengths, ``episode_index``), the statistics are those of the stored
  arrays, and the root record is the one written (its digest, ``dinocache_sha256``);
* unit digests (:func:`unit_digests`, :func:`unit_problems`): when a unit is written, each of its
  shard files is summarised by its shard index and the crc32c of every chunk in it (what zarr checks
  the chunk's bytes against on every read), bound to the store's identity and the unit's number,
  and kept in ``units/digest``. A shard from elsewhere, or one lost, no longer matches. Reading the
  index and four bytes per chunk costs next to nothing, so every reader can afford the check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dinocache.errors import StoreError
from dinocache.hashing import json_sha256, parts_sha256

__all__ = ["RECORD_DIGEST_KEY", "DIGESTS", "lowdim_stats", "record_digest", "unit_arrays", "shard_file", "unit_digests",
           "unit_problems", "structure_problems"]

#: Root attribute holding the digest of the root record (``attributes.dinocache``).
RECORD_DIGEST_KEY = "dinocache_sha256"
#: The array of unit digests: ``(units, files, 32)`` uint8, one chunk per unit (written by its writer only).
DIGESTS = "units/digest"
_MISSING = 2**64 - 1  # a shard index entry for a chunk the shard does not hold


def lowdim_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Exact mean/std/min/max over every frame, accumulated in float64: what a store keeps under
    ``stats/<key>`` when it is created, and what :func:`structure_problems` recomputes to check them."""
    x = np.asarray(values, dtype=np.float64)
    return {
        "mean": x.mean(axis=0).astype(np.float32),
        "std": x.std(axis=0).astype(np.float32),
        "min": x.min(axis=0).astype(np.float32),
        "max": x.max(axis=0).astype(np.float32),
    }


def record_digest(record: Mapping[str, Any]) -> str:
    """The digest a store keeps of its root record, checked whenever the store is opened."""
    return json_sha256(record)


def unit_arrays(cameras: Sequence[str], views: int = 1) -> list[str]:
    """The arrays a work unit writes one shard of, in digest order: each camera's patch grid and CLS,
    then, in a store with augmented views, theirs (``views/patch``, ``views/cls``)."""
    parts = ("patch", "cls", *(("views/patch", "views/cls") if views > 1 else ()))
    return [f"cameras/{camera}/{part}" for camera in cameras for part in parts]


def shard_file(root: zarr.Group, path: Path, name: str, unit: int) -> Path:
    """The file of the store at ``path`` holding ``unit``'s shard of array ``name``."""
    array = root[name]
    return path / name / array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))


def _shard_summary(file: Path, chunks: int) -> bytes:
    """The shard index (offset and size of each chunk, then its crc32c) and each chunk's own crc32c."""
    index_bytes = 16 * chunks + 4
    with open(file, "rb") as handle:
        size = handle.seek(0, 2)
        if size < index_bytes:
            raise ValueError(f"{size} bytes, too short for a shard of {chunks} chunks")
        handle.seek(size - index_bytes)
        index = handle.read(index_bytes)
        parts = [index]
        for offset, nbytes in np.frombuffer(index[:-4], dtype="<u8").reshape(chunks, 2).tolist():
            if offset == _MISSING:
                continue
            if nbytes < 4 or offset + nbytes > size - index_bytes:
                raise ValueError(f"its index places a chunk at bytes {offset}-{offset + nbytes}, outside the file")
            handle.seek(offset + nbytes - 4)
            parts.append(handle.read(4))
    return b"".join(parts)


def _chunks_per_shard(array: zarr.Array) -> int:
    return int(np.prod([s // c for s, c in zip(array.shards, array.chunks)]))


def unit_digests(root: zarr.Group, path: Path, cameras: Sequence[str], identity: Mapping[str, Any],
                 unit: int, views: int = 1) -> np.ndarray:
    """``(files, 32)`` uint8: the digest of each shard file of ``unit``, bound to the store and the unit.

    Raises ``FileNotFoundError`` for a missing shard and ``ValueError`` for one that is not a shard.
    """
    store = json_sha256(identity)
    rows = []
    for name in unit_arrays(cameras, views):
        array = root[name]
        summary = _shard_summary(shard_file(root, path, name, unit), _chunks_per_shard(array))
        digest = parts_sha256([("store", store.encode()), ("unit", str(unit).encode()), (name, summary)])
        rows.append(np.frombuffer(bytes.fromhex(digest), dtype=np.uint8))
    return np.stack(rows)


def unit_problems(root: zarr.Group, path: Path, cameras: Sequence[str], identity: Mapping[str, Any],
                  done: np.ndarray, units: Sequence[int] | None = None, views: int = 1) -> dict[int, str]:
    """Why each unit marked done (of ``units``, default all) is not what its writer wrote: a shard file
    missing, not a shard, or another one than was written (from another unit or store, or damaged).

    A store written before units had digests (no ``units/digest``) can only be checked for missing files.
    """
    recorded = root[DIGESTS] if DIGESTS in root else None
    names = unit_arrays(cameras, views)
    problems: dict[int, str] = {}
    for unit in (range(len(done)) if units is None else units):
        if not done[unit]:
            continue
        files = [shard_file(root, path, name, unit) for name in names]
        try:
            found = unit_digests(root, path, cameras, identity, unit, views)
        except FileNotFoundError:
            lost = [str(f.relative_to(path)) for f in files if not f.is_file()]
            problems[unit] = f"its shard file {', '.join(lost)} is missing"
            continue
        except ValueError as err:
            problems[unit] = f"a shard file of it is not a shard ({err})"
            continue
        if recorded is None:
            continue
        wrong = [str(f.relative_to(path)) for f, a, b in zip(files, found, recorded[unit]) if not np.array_equal(a, b)]
        if wrong:
            problems[unit] = (f"its shard file {', '.join(wrong)} is not the one written for unit {unit} of this store "
                              "(copied from another unit or store, or damaged)")
    return problems


def structure_problems(root: zarr.Group, record: Mapping[str, Any], cameras: Sequence[str],
                       lowdim_keys: Sequence[str], read: Any) -> list[str]:
    """What does not add up between the record, the arrays' shapes, the episodes table and the statistics.

    ``read(name)`` reads a whole array (checksums checked). Each problem names the array or file. An
    array that does not read (a failed checksum) is left to the reader that reports chunks by file.
    """
    problems = []
    digest = root.attrs.get(RECORD_DIGEST_KEY)
    if digest is not None and digest != record_digest(record):
        problems.append("the root record (zarr.json attributes) is not the one written: it was edited or damaged")
    frames, views = int(record["num_frames"]), int(record.get("views", 1))
    per_frame = [*unit_arrays(cameras, views), *lowdim_keys, "episode_index", "frame_index", "timestamp"]
    for name in per_frame:
        if name not in root:
            problems.append(f"array {name!r} is missing")
        elif root[name].shape[0] != frames:
            problems.append(f"array {name!r} has {root[name].shape[0]} rows but the store has {frames} frames "
                            f"({name}/zarr.json or the root zarr.json was edited or damaged)")
        elif "/views/" in name and root[name].shape[1] != views - 1:
            problems.append(f"array {name!r} holds {root[name].shape[1]} augmented views but the store has {views} "
                            f"views in all ({name}/zarr.json or the root zarr.json was edited or damaged)")
    units = -(-frames // int(record["unit_frames"]))
    for name in ("units/done", *([DIGESTS] if DIGESTS in root else [])):
        if root[name].shape[0] != units:
            problems.append(f"array {name!r} has {root[name].shape[0]} entries for the store's {units} units")
    if problems:
        return problems  # what follows reads arrays whose shapes are already wrong
    def values(name: str) -> np.ndarray | None:
        try:
            return read(name)
        except StoreError:
            return None

    index, start, length, owners = (values(name) for name in ("episodes/index", "episodes/start", "episodes/length",
                                                              "episode_index"))
    if any(v is None for v in (index, start, length, owners)):
        return problems
    ends = np.cumsum(length)
    if len(length) and (ends[-1] != frames or not np.array_equal(start, ends - length) or (length <= 0).any()):
        problems.append(f"the episodes table (episodes/start, episodes/length) does not tile the store's {frames} "
                        "frames")
    elif not np.array_equal(owners, np.repeat(index, length)):
        problems.append("array 'episode_index' does not match the episodes table (episodes/index, episodes/length)")
    for key in lowdim_keys:
        stored = values(key)
        if stored is None or np.isnan(stored).any():
            continue  # a damaged or lost chunk: the readers that name chunks report it
        for name, expected in lowdim_stats(stored).items():
            kept = values(f"stats/{key}/{name}")
            if kept is not None and not np.array_equal(kept, expected):
                problems.append(f"array 'stats/{key}/{name}' is not the statistics of array {key!r} (edited or "
                                "replaced since the store was written)")
    return problems
