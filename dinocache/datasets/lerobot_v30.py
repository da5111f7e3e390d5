"""LeRobot v3.0: many episodes per parquet and per mp4, located by ``meta/episodes/*.parquet``.

Each row of the episode table gives an episode's data file (``data/chunk_index``,
``data/file_index``), its global row range (``dataset_from_index``..``dataset_to_index``) and,
per camera, its video file and time window (``videos/<key>/from_timestamp``..``to_timestamp``).
Frames are found by time, not by counting: the decoder seeks once to ``from_timestamp`` and
checks every frame's time against ``from_timestamp + timestamp`` of its parquet row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinocache.errors import DatasetError
from dinocache.datasets.base import EpisodeBook, problem
from dinocache.datasets.lerobot import LeRobotSource
from dinocache.datasets.lerobot_meta import V30_EPISODES_DIR
from dinocache.datasets.parquet import ParquetReadError


@dataclass
class _Episode:
    index: int
    length: int
    listing: Path  # the meta/episodes parquet that describes it
    data_file: Path
    from_index: int | None
    to_index: int | None
    videos: dict[str, tuple[Path, float, float]] = field(default_factory=dict)


class LeRobotV30Source(LeRobotSource):
    """A LeRobot v3.0 dataset folder.

    Opening reads the episode table, every data file's low-dimensional columns once (row counts,
    frame order, NaN/inf per episode) and every video file's header once (exists, opens, frame
    size, duration covering each episode's window).
    """

    def _scan(self, book: EpisodeBook) -> None:
        self._located: dict[int, _Episode] = {}
        for ep in self._read_episode_table(book):
            self._located[ep.index] = ep

        by_file: dict[Path, list[_Episode]] = {}
        for ep in self._located.values():
            if not book.is_bad(ep.index):
                by_file.setdefault(ep.data_file, []).append(ep)
        for file, eps in sorted(by_file.items()):
            self._check_data_file(book, file, eps)

        files = sorted({v[0] for ep in self._located.values() for v in ep.videos.values()})
        self._video_files = [f for f in files if f.is_file()]
        probes = self._probe_videos(files)
        tolerance = 0.5 / self.fps
        for ep in sorted(self._located.values(), key=lambda e: e.index):
            for key, (file, start, end) in ep.videos.items():
                if book.is_bad(ep.index):
                    break
                probe = probes[file]
                bad = self._video_problem(probe, file, ep.index, key)
                span = (end - start) * self.fps
                if bad is None and not (start >= 0 and abs(span - ep.length) <= 0.5):
                    bad = problem(file, ep.index, f"camera '{key}': the window {start:.4f}-"
                                                  f"{end:.4f} s holds {span:.2f} frames at "
                                                  f"{self.fps:g} fps for {ep.length} parquet rows")
                if (bad is None and not isinstance(probe, str) and probe.duration is not None
                        and end > probe.duration + tolerance):
                    bad = problem(file, ep.index, f"camera '{key}': the window ends at {end:.4f} "
                                                  f"s but the video lasts {probe.duration:.4f} s")
                if bad is not None:
                    book.bad(ep.index, bad)
        self._check_windows_apart(book)

    def _check_windows_apart(self, book: EpisodeBook) -> None:
        """Refuse episodes whose windows in one video file overlap.

        LeRobot writes an episode's frames after the previous one's, so windows never share a frame;
        a window moved by whole frames (a ``from_timestamp``/``to_timestamp`` pair edited or written
        wrong) still decodes at the times its rows ask for, but shows another episode's frames, and
        only its neighbour in the file can tell. Both episodes are named: either may be the wrong one.
        """
        windows: dict[tuple[str, Path], list[tuple[float, float, int]]] = {}
        for ep in self._located.values():
            for key, (file, start, end) in ep.videos.items():
                windows.setdefault((key, file), []).append((start, end, ep.index))
        for (key, file), spans in sorted(windows.items()):
            spans.sort()
            for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
                if end > start + 0.5 / self.fps:
                    for index, other in ((first, second), (second, first)):
                        book.bad(index, problem(file, index, f"camera '{key}': its window overlaps that of episode "
                                                             f"{other} ({first} ends at {end:.4f} s, {second} starts "
                                                             f"at {start:.4f} s); one of their from_timestamp/"
                                                             "to_timestamp pairs is wrong"))

    def _read_episode_table(self, book: EpisodeBook) -> list[_Episode]:
        listings = sorted((self.path / V30_EPISODES_DIR).glob("*/*.parquet"))
        if not listings:
            raise DatasetError(problem(self.path / V30_EPISODES_DIR, None,
                                       "no episode table (chunk-*/file-*.parquet) found"))
        video_keys = [k for k, kind in self.info.camera_storage.items() if kind == "video"]
        required = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        for key in video_keys:
            required += [f"videos/{key}/{c}" for c in
                         ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
        optional = ["tasks", "dataset_from_index", "dataset_to_index"]
        episodes = []
        for listing in listings:
            try:
                names = pq.read_schema(listing).names
                missing = [c for c in required if c not in names]
                if missing:
                    raise DatasetError(problem(listing, None, "episode table has no column "
                                                              + ", ".join(map(repr, missing))))
                rows = pq.read_table(listing, columns=required + [c for c in optional
                                                                  if c in names]).to_pylist()
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(problem(listing, None, f"cannot read parquet ({err})")) from None
            for row in rows:
                episodes.append(self._episode_row(book, listing, row, video_keys))
        return episodes

    def _episode_row(self, book: EpisodeBook, listing: Path, row: dict,
                     video_keys: list[str]) -> _Episode:
        index, length = row["episode_index"], row["length"]
        if index is None or length is None:
            raise DatasetError(problem(listing, None, "a row has no episode_index or length"))
        if book.knows(index):
            raise DatasetError(problem(listing, index, "is listed twice"))
        tasks = row.get("tasks") or []
        book.add(index, length, "; ".join(str(t) for t in tasks))
        ep = _Episode(index=index, length=length, listing=listing,
                      data_file=self._template("data_path", chunk_index=row["data/chunk_index"],
                                               file_index=row["data/file_index"]),
                      from_index=row.get("dataset_from_index"),
                      to_index=row.get("dataset_to_index"))
        for key in video_keys:
            file = self._template("video_path", video_key=key,
                                  chunk_index=row[f"videos/{key}/chunk_index"],
                                  file_index=row[f"videos/{key}/file_index"])
            ep.videos[key] = (file, float(row[f"videos/{key}/from_timestamp"]),
                              float(row[f"videos/{key}/to_timestamp"]))
        if length <= 0:
            book.bad(index, problem(listing, index, f"has length {length} (no frames)"))
        elif ep.from_index is not None and ep.to_index is not None \
                and ep.to_index - ep.from_index != length:
            book.bad(index, problem(listing, index, f"dataset_to_index - dataset_from_index = "
                                                    f"{ep.to_index - ep.from_index} but length "
                                                    f"is {length}"))
        return ep

    def _check_data_file(self, book: EpisodeBook, file: Path, eps: list[_Episode]) -> None:
        """Read a shared data file once and validate each listed episode's rows in it."""
        try:
            table = self._read_table(file, None, [*self._lowdim_columns, "episode_index"])
            arrays = self._arrays(table, file, None)
        except (ParquetReadError, DatasetError) as err:
            for ep in eps:
                book.bad(ep.index, problem(file, ep.index, str(err).removeprefix(f"{file}: ")))
            return
        self._lowdim_digests[file] = self._digest(arrays)
        owner = arrays["episode_index"]
        order = np.argsort(owner, kind="stable")
        sorted_owner = owner[order]
        for ep in eps:
            lo, hi = np.searchsorted(sorted_owner, [ep.index, ep.index + 1])
            rows = order[lo:hi]
            mine = {key: value[rows] for key, value in arrays.items()}
            bad = self._scanned_rows_problem(file, ep.index, mine, ep.length, "meta/episodes")
            if bad is not None:
                book.bad(ep.index, bad)

    def _data_file(self, episode_index: int) -> Path:
        return self._located[episode_index].data_file

    def _video_window(self, episode_index: int, camera: str) -> tuple[Path, float, bool]:
        file, start, _ = self._located[episode_index].videos[camera]
        return file, start, False
