"""The feature store: one Zarr v3 group holding cached backbone features and everything beside them.

The layout is specified in ``docs/cache-format.md`` (format version :data:`FORMAT_VERSION`). In short::

    features.zarr/
      zarr.json                       root attributes: the provenance, written once
      cameras/<camera>/patch          (N, h, w, C)  patch-feature grid, float16 by default
      cameras/<camera>/cls            (N, C)        CLS token
      cameras/<camera>/views/...      (N, K-1, ...) views 1..K-1 of each, with --views K (format version 2)
      action, observation.state, ...  (N, D)        low-dimensional float32 arrays
      episode_index, frame_index      (N,)          int64
      timestamp                       (N,)          float32
      episodes/{index,start,length,task_index}  (E,) int64; the task strings in its attributes
      stats/<key>/{mean,std,min,max}  (D,)          exact, over every stored frame, float64 accumulated
      units/done                      (U,)          uint8, one chunk per work unit: 1 once written
      units/digest                    (U, F, 32)    uint8, the digest of each of a unit's F shard files
      verification/rows, verification/<camera>      a few raw uint8 frames, for checking exported policies

Frames are written in *work units*: a unit is the frame range of exactly one shard of every feature
array, so no two writers ever touch the same shard file (Zarr applies partial shard writes by
read-modify-write, and concurrent ones lose data). Each unit's marker lives in its own chunk of
``units/done`` for the same reason. Every inner chunk carries a crc32c checksum, and float arrays are
filled with NaN, so a frame that was never written can never pass for data.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from dinocache.atomic import process_running
from dinocache.errors import DatasetError, StoreError, os_error_line
from dinocache.pipeline.store_checks import (DIGESTS, RECORD_DIGEST_KEY, lowdim_stats, record_digest,
                                             structure_problems, unit_arrays, unit_digests, unit_problems)
from dinocache.pipeline.store_record import (  # noqa: F401 - also imported from here, where they always were
    DEFAULT_CHUNK_FRAMES, DEFAULT_DTYPE, DEFAULT_PRECISION, DEFAULT_UNIT_FRAMES, FORMAT_NAME, FORMAT_VERSION,
    IDENTITY_KEYS, VERIFICATION_FRAMES, VIEWS_FORMAT_VERSION, Compression, SourceRecord, StoreRecord)

if TYPE_CHECKING:
    from dinocache.datasets.base import DatasetSource

@dataclass(frozen=True)
class StoreLayout:
    """Everything needed to create an empty store: the attributes it records (typed: frame count,
    cameras, dtype, chunking, compression, backbone and source), and its arrays' shapes and contents."""

    record: StoreRecord
    grids: Mapping[str, tuple[int, int, int]]  # camera -> (h, w, C), in the record's camera order
    lowdim: Mapping[str, np.ndarray]  # key -> (N, D) float32, including observation.state and action
    episode_index: np.ndarray
    frame_index: np.ndarray
    timestamp: np.ndarray
    episodes: Sequence[tuple[int, int, int, str]]  # (index, start, length, task)
    #: Reads the raw uint8 frames ``(K, H, W, 3)`` of the given store rows, per camera; called only by
    #: the process that creates the store (see :func:`verification_rows`).
    verification_frames: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        if tuple(self.grids) != self.record.cameras:
            raise StoreError(f"store layout: grids for cameras {list(self.grids)}, the record names "
                             f"{list(self.record.cameras)}")

    @property
    def num_frames(self) -> int:
        return self.record.num_frames

    @property
    def num_units(self) -> int:
        return -(-self.record.num_frames // self.record.unit_frames)


def verification_rows(num_frames: int, count: int = VERIFICATION_FRAMES) -> np.ndarray:
    """The store rows whose raw frames are kept: ``count`` spread evenly over the whole store, so over
    episodes and over phases within them (first and last frame included)."""
    return np.unique(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(np.int64))


def unit_range(unit: int, unit_frames: int, num_frames: int) -> tuple[int, int]:
    """Global frame range ``[start, stop)`` of a work unit."""
    start = unit * unit_frames
    return start, min(start + unit_frames, num_frames)


def _build(root: zarr.Group, layout: StoreLayout) -> None:
    record = layout.record
    n = record.num_frames
    codecs = Compression.parse(record.compression).codecs()
    # Views 1..K-1 of a store with augmented views sit in arrays of their own, so that view 0 is, array
    # for array, what a store of one view holds, and a frame's views share its chunks.
    kinds = [("", (), ())] + ([("views/", (record.views - 1,), ("view",))] if record.views > 1 else [])
    for camera, (h, w, c) in layout.grids.items():
        group = root.require_group(f"cameras/{camera}")
        for prefix, view, axis in kinds:
            group.create_array(
                f"{prefix}patch", shape=(n, *view, h, w, c), dtype=record.dtype, chunks=(record.chunk_frames, *view, h, w, c),
                shards=(record.unit_frames, *view, h, w, c), fill_value=np.nan,
                dimension_names=("frame", *axis, "y", "x", "channel"), **codecs,
            )
            group.create_array(
                f"{prefix}cls", shape=(n, *view, c), dtype=record.dtype, chunks=(record.chunk_frames, *view, c),
                shards=(record.unit_frames, *view, c), fill_value=np.nan, dimension_names=("frame", *axis, "channel"),
                **codecs,
            )
    checksum = {"compressors": [Crc32cCodec()]}
    for key, values in layout.lowdim.items():
        root.create_array(key, data=np.asarray(values, dtype=np.float32), fill_value=np.nan, **checksum)
        stats = root.require_group(f"stats/{key}")
        for name, value in lowdim_stats(values).items():
            stats.create_array(name, data=value, **checksum)
    root.create_array("episode_index", data=np.asarray(layout.episode_index, dtype=np.int64), **checksum)
    root.create_array("frame_index", data=np.asarray(layout.frame_index, dtype=np.int64), **checksum)
    root.create_array("timestamp", data=np.asarray(layout.timestamp, dtype=np.float32), **checksum)

    tasks = sorted({task for *_, task in layout.episodes})
    episodes = root.require_group("episodes")
    episodes.attrs["tasks"] = tasks
    columns = np.array([(i, s, ln, tasks.index(t)) for i, s, ln, t in layout.episodes], dtype=np.int64).reshape(-1, 4)
    for col, name in enumerate(("index", "start", "length", "task_index")):
        episodes.create_array(name, data=np.ascontiguousarray(columns[:, col]), **checksum)
    root.create_array("units/done", shape=(layout.num_units,), dtype="uint8", chunks=(1,), fill_value=0)
    files = len(unit_arrays(record.cameras, record.views))
    root.create_array(DIGESTS, shape=(layout.num_units, files, 32), dtype="uint8", chunks=(1, files, 32),
                      fill_value=0, **checksum)
    if layout.verification_frames is not None:
        rows = verification_rows(n)
        frames = layout.verification_frames(rows)
        root.create_array("verification/rows", data=rows, **checksum)
        for camera in layout.grids:
            root.create_array(f"verification/{camera}", data=np.ascontiguousarray(frames[camera], dtype=np.uint8),
                              compressors=[ZstdCodec(level=3), Crc32cCodec()])

    attributes = _jsonable(layout.record.to_dict())
    root.attrs.put({"dinocache": attributes, RECORD_DIGEST_KEY: record_digest(attributes)})


def create_or_open(path: str | os.PathLike, layout: StoreLayout, overwrite: bool = False) -> FeatureStore:
    """Create the store for ``layout`` at ``path``, or open the one already there if it is the same.

    Creation happens in a private temporary folder that is renamed into place, so any number of
    concurrent processes (SLURM array tasks, dask workers) may call this at once: exactly one rename
    wins, the others find the finished store and open it. A store that exists with a different
    identity (another backbone, weights, preprocessing, source...) is refused unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and overwrite:
        shutil.rmtree(path)
    if not path.exists():
        sweep_abandoned_folders(path)
        tmp = private_folder(path, "creating")
        shutil.rmtree(tmp, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _build(zarr.open_group(tmp, mode="w", zarr_format=3), layout)
        except BaseException as err:  # a half-built store is of no use to anyone: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise StoreError(f"{path}: cannot create the store ({err.strerror or err})") from err
            raise
        try:
            os.rename(tmp, path)
        except OSError:  # another process created it first
            shutil.rmtree(tmp, ignore_errors=True)
    store = FeatureStore(path, mode="r+")
    store.check_identity(_jsonable(layout.record.identity()),
                         hint="pass --overwrite to replace it, or choose another --out")
    return store


#: A creation folder untouched this long, whose process is gone, is abandoned (a creation writes no
#: features, only the small arrays, and takes seconds to a few minutes).
ABANDONED_AFTER_S = 600


#: What a process does in its :func:`private_folder` beside a store: create the store, lay it out again
#: (:mod:`~dinocache.pipeline.relayout`), or hold the store it replaced until it is deleted.
PRIVATE_FOLDERS = ("creating", "relayout", "replaced")


def private_folder(path: Path, kind: str) -> Path:
    """``.NAME.KIND-HOST-PID`` beside the store ``path``: this process's folder for ``kind`` of work."""
    return path.parent / f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def sweep_abandoned_folders(path: Path) -> None:
    """Delete the :func:`private_folder` of processes of this host killed mid-work beside ``path``.

    A failure cleans up after itself; a SIGKILL cannot. One of this host whose process no longer
    runs, and in which nothing was written for :data:`ABANDONED_AFTER_S`, is abandoned (the age
    guards against a process of the same host name that this one cannot see, e.g. in another
    container). Another host's folders are left alone.
    """
    host = socket.gethostname()
    for kind in PRIVATE_FOLDERS:
        for folder in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            owner, _, pid = folder.name.rpartition("-")
            if owner == f".{path.name}.{kind}-{host}" and pid.isdigit() and int(pid) != os.getpid():
                _sweep(folder, int(pid))


def _sweep(folder: Path, pid: int) -> None:
    """Delete ``folder`` if process ``pid`` is gone and nothing in it was touched for a while."""
    if process_running(pid):
        return
    touched = max([folder.stat().st_mtime, *(os.stat(os.path.join(root, name)).st_mtime
                                             for root, dirs, files in os.walk(folder) for name in [*dirs, *files])])
    if time.time() - touched > ABANDONED_AFTER_S:
        shutil.rmtree(folder, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class FeatureStore:
    """A feature store on disk, opened for reading (``mode='r'``) or for filling units (``'r+'``).

    Opening refuses anything that is not a dinocache store of a format version this code understands.
    Every read goes through methods that turn a checksum or decode failure into a
    :class:`~dinocache.errors.StoreError` naming the array.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: not a feature store (no zarr.json); create one with `dinocache extract`")
        try:
            self.root = zarr.open_group(self.path, mode=mode, zarr_format=3)
        except Exception as err:  # noqa: BLE001 - zarr raises many types for unreadable metadata
            raise StoreError(f"{self.path}: cannot open as a Zarr v3 group: {err}") from err
        try:
            self.record = StoreRecord.from_dict(self.root.attrs.get("dinocache"))
        except StoreError as err:
            raise StoreError(f"{self.path}: {err}") from None

    # -- description -------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return self.record.num_frames

    @property
    def cameras(self) -> list[str]:
        return list(self.record.cameras)

    @property
    def unit_frames(self) -> int:
        return self.record.unit_frames

    @property
    def num_units(self) -> int:
        return -(-self.num_frames // self.unit_frames)

    @property
    def lowdim_keys(self) -> list[str]:
        return sorted(self.root["stats"].group_keys())

    def grid_shape(self, camera: str) -> tuple[int, int, int]:
        """(h, w, C) of a camera's patch grid."""
        return tuple(self._array(f"cameras/{camera}/patch").shape[1:])

    def episodes(self) -> list[tuple[int, int, int, str]]:
        """(index, start, length, task) of every stored episode, in store order."""
        tasks = self.root["episodes"].attrs["tasks"]
        cols = [self.read(f"episodes/{name}") for name in ("index", "start", "length", "task_index")]
        return [(int(i), int(s), int(n), tasks[int(t)]) for i, s, n, t in zip(*cols)]

    def verification_frames(self) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """The store rows and per-camera raw uint8 frames kept for checking exported policies, or None
        for a store written before dinocache kept them."""
        if "verification" not in self.root:
            return None
        return self.read("verification/rows"), {camera: self.read(f"verification/{camera}") for camera in self.cameras}

    def open_source(self, dataset: str | os.PathLike | None = None) -> DatasetSource:
        """The dataset this store was extracted from: ``dataset``, else the recorded source path.

        Refused with a :class:`DatasetError` saying why when it is not there or is another dataset
        (its fingerprint differs from the recorded one): frames of another dataset would pair the
        store's rows with the wrong images.
        """
        from dinocache.datasets import open_dataset

        recorded = self.record.source_path
        path = Path(dataset) if dataset is not None else Path(recorded) if recorded else None
        if path is None:
            raise DatasetError(f"the store {self.path} records no source dataset")
        if not path.exists():
            raise DatasetError(f"the source dataset {path} is not there")
        source = open_dataset(path, format=self.record.source.format, skip_bad_episodes=True)
        expected, found = self.record.source.fingerprint, source.fingerprint()
        if found != expected:
            raise DatasetError(f"{path} is not the dataset the store was extracted from (fingerprint {found}, "
                               f"the store {self.path} has {expected})")
        return source

    def stats(self, key: str) -> dict[str, np.ndarray]:
        return {name: self.read(f"stats/{key}/{name}") for name in ("mean", "std", "min", "max")}

    def check_identity(self, wanted: Mapping[str, Any], hint: str = "") -> None:
        """Refuse, naming every differing key with both values, when the store is not what is wanted.

        ``wanted`` holds identity attributes (:meth:`StoreRecord.identity`, or some of them). Nested
        ones (``backbone``, ``weights``, ``preprocess``...) are compared field by field, so the refusal
        names ``backbone.name`` and its two values rather than two whole dictionaries.
        """
        have = self.record.identity()
        if all(key in wanted for key in IDENTITY_KEYS):  # a whole identity: a store of one view has no view keys
            one_view = {"views": 1, "augment": None}
            have, wanted = {**one_view, **have}, {**one_view, **wanted}
        diffs = [diff for key, value in wanted.items() for diff in _differences(key, have.get(key), value)]
        if diffs:
            raise StoreError(f"{self.path} was built differently ({'; '.join(diffs)})" + (f"; {hint}" if hint else ""))

    # -- units -------------------------------------------------------------------------------------
    def unit_range(self, unit: int) -> tuple[int, int]:
        return unit_range(unit, self.unit_frames, self.num_frames)

    def done_units(self) -> np.ndarray:
        """Boolean mask over units: which are completely written."""
        return self.read("units/done").astype(bool)

    def write_unit(self, unit: int, features: Mapping[str, tuple[np.ndarray, ...]]) -> None:
        """Write one whole unit, every camera's patch grid and CLS (and in a store with augmented views,
        those of views 1..K-1: ``(patch, cls, views patch, views cls)``), then mark it done.

        The marker is written last: a unit interrupted half-way is simply redone by the next run.
        """
        start, stop = self.unit_range(unit)
        views = self.record.views
        for camera in self.cameras:
            parts = features[camera]
            if len(parts) != len(unit_arrays([camera], views)) or any(len(part) != stop - start for part in parts):
                raise StoreError(f"{self.path}: unit {unit} of camera {camera!r} needs {stop - start} frames of "
                                 f"{len(unit_arrays([camera], views))} arrays, got {[len(part) for part in parts]}")
        arrays = unit_arrays(self.cameras, views)
        digests = [DIGESTS] if DIGESTS in self.root else []  # a store made before units had digests has none
        self._remove_interrupted_writes(unit, [*arrays, *digests, "units/done"])
        try:
            for camera in self.cameras:
                for name, values in zip(unit_arrays([camera], views), features[camera]):
                    self._for_writing(name)[start:stop] = values
            if digests:  # what the shard files just written are, bound to this store and unit
                self.root[DIGESTS][unit] = unit_digests(self.root, self.path, self.cameras, self.record.identity(), unit,
                                                        views)
            self.root["units/done"][unit] = 1
        except OSError as err:  # a full disk, a lost mount: the user's to fix, and nothing done is lost
            done = int(self.done_units().sum())
            raise StoreError(f"{self.path}: cannot write unit {unit} (frames {start}-{stop - 1}): {os_error_line(err)}. "
                             f"The {done} units already written are kept; fix this and re-run the same command "
                             f"to resume") from err

    def unit_problems(self, units: Sequence[int] | None = None) -> dict[int, str]:
        """Why each unit marked done (of ``units``, default all) is not what was written for it
        (:func:`~dinocache.pipeline.store_checks.unit_problems`): unit -> reason."""
        return unit_problems(self.root, self.path, self.cameras, self.record.identity(), self.done_units(), units,
                             self.record.views)

    def reopen_damaged_units(self, units: Sequence[int]) -> dict[int, str]:
        """Unmark the units of ``units`` whose shard files are missing or not the ones written, so that
        extraction redoes them; return them with the reason."""
        problems = self.unit_problems(units)
        for unit in problems:
            self.root["units/done"][unit] = 0
        return problems

    def check_whole(self) -> None:
        """Refuse a store whose parts do not agree (:mod:`~dinocache.pipeline.store_checks`): array
        lengths, episodes table, statistics, root record, and every done unit's shard files."""
        problems = self.structure_problems()
        if problems:
            raise StoreError(f"{self.path}: {'; '.join(problems)}; extract the store again")
        damaged = self.unit_problems()
        if damaged:
            unit, why = next(iter(damaged.items()))
            start, stop = self.unit_range(unit)
            more = f" (and {len(damaged) - 1} more unit(s))" if len(damaged) > 1 else ""
            raise StoreError(f"{self.path}: unit {unit} (frames {start}-{stop - 1}): {why}{more}; re-run the same "
                             "`dinocache extract` command: it redoes such units")

    def structure_problems(self) -> list[str]:
        """What does not add up between the record, array lengths, episodes table and statistics."""
        return structure_problems(self.root, self.root.attrs.get("dinocache"), self.cameras, self.lowdim_keys, self.read)

    def _for_writing(self, name: str) -> zarr.Array:
        """Array ``name`` set to store every chunk as it comes. Zarr's default first compares each
        chunk with the fill value, to skip storing chunks that hold nothing else; features never are
        all NaN, and that comparison took three quarters of the write (float16 ViT-B grids: 958 rather
        than 207 MiB/s on the 2-core CPU machine, ``benchmarks/bench_store_write.py``). The bytes written
        are the same."""
        return self.root[name].with_config({"write_empty_chunks": True})

    def _remove_interrupted_writes(self, unit: int, arrays: Sequence[str]) -> None:
        """Delete what a killed writer left of this unit's files: Zarr writes each file to a temporary
        ``<file>.<uuid>.partial`` and renames it, so a kill between the two leaves that temporary behind.
        Only the process writing a unit ever writes its files, so no live writer's temporary is touched."""
        for name in arrays:
            array = self.root[name]
            key = array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))
            file = self.path / name / key
            for orphan in file.parent.glob(f"{file.name}.*.partial"):
                orphan.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        try:
            return self.root[name]
        except KeyError:
            raise StoreError(f"{self.path}: no array {name!r} in the store") from None

    def read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """Read (part of) an array; a failed checksum or decode names the array, its file and frames."""
        array = self._array(name)
        try:
            return array[selection]
        except Exception as err:  # noqa: BLE001 - checksum and codec failures surface as several types
            raise StoreError(f"{self.path}: array {name!r} is corrupt or unreadable{_damage(name, array, selection)} "
                             f"({type(err).__name__}: {err})") from err

    def patch(self, camera: str, selection: Any = slice(None)) -> np.ndarray:
        """View 0's patch grids (the clean frames'), whatever the number of views."""
        return self.read(f"cameras/{camera}/patch", selection)

    def cls(self, camera: str, selection: Any = slice(None)) -> np.ndarray:
        """View 0's CLS tokens."""
        return self.read(f"cameras/{camera}/cls", selection)

    @property
    def views(self) -> int:
        """K, the views stored of every frame: 1, or view 0 (clean) and K-1 augmented ones."""
        return self.record.views

    def view_features(self, name: str, start: int, stop: int, views: int | None = None) -> np.ndarray:
        """The first ``views`` (default: all K) views of rows ``start..stop-1`` of ``cameras/<camera>/patch``
        or ``.../cls`` (``name``): ``(stop - start, views, ...)``, view 0 first."""
        clean = self.read(name, slice(start, stop))[:, None]
        if (views or self.views) == 1:
            return clean
        camera, _, part = name.rpartition("/")
        augmented = self.read(f"{camera}/views/{part}", slice(start, stop))[:, :(views or self.views) - 1]
        return np.concatenate([clean, augmented], axis=1)

    def array_names(self) -> list[str]:
        """Every array in the store, as a path relative to the root, sorted."""
        return sorted(name for name, member in self.root.members(max_depth=None) if isinstance(member, zarr.Array))


def _damage(name: str, array: zarr.Array, selection: Any) -> str:
    """Where in ``array`` a failed read went wrong: the first chunk of ``selection`` that does not read,
    as its file (the shard holding it) and its frame range, so the user knows what to re-extract."""
    frames, step, per_file = array.shape[0], array.chunks[0], (array.shards or array.chunks)
    if isinstance(selection, slice):
        start, stop, _ = selection.indices(frames)
    elif isinstance(selection, (int, np.integer)):
        start = int(selection) % frames
        stop = start + 1
    else:
        start, stop = 0, frames
    for lo in range(start - start % step, stop, step):
        try:
            array[lo:lo + step]
        except Exception:  # noqa: BLE001 - the chunk that fails, whatever the codec raises
            single_file = all(c >= n for c, n in zip(per_file[1:], array.shape[1:]))
            key = "/".join([name, "c", str(lo // per_file[0]), *["0"] * (array.ndim - 1)])
            return f" in {key if single_file else 'the chunk'} holding frames {lo}-{min(lo + step, frames) - 1}"
    return ""


def _differences(key: str, have: Any, want: Any) -> list[str]:
    """``key: store has X, asked for Y`` for every leaf that differs, dictionaries walked by field."""
    if isinstance(have, Mapping) and isinstance(want, Mapping):
        return [diff for sub in sorted(set(have) | set(want), key=str)
                for diff in _differences(f"{key}.{sub}", have.get(sub), want.get(sub))]
    return [] if have == want else [f"{key}: store has {_short(have)}, asked for {_short(want)}"]


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a list of 10 000 episode indices must not fill the screen."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def store_bytes(path: str | Path) -> int:
    """Bytes on disk under a store (what `inspect`, the extraction summary and the benchmarks report)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
