"""LeRobot v2.1: ``meta/episodes.jsonl`` lists episodes; each has its own parquet and mp4 per camera."""

from __future__ import annotations

from pathlib import Path

from dinocache.errors import DatasetError
from dinocache.datasets.base import EpisodeBook, problem
from dinocache.datasets.lerobot import LeRobotSource
from dinocache.datasets.lerobot_meta import V21_EPISODES_PATH, load_jsonl
from dinocache.datasets.parquet import ParquetReadError


class LeRobotV21Source(LeRobotSource):
    """A LeRobot v2.1 dataset folder.

    Opening reads ``meta/episodes.jsonl``, every episode's low-dimensional columns (to check row
    count, frame order and NaN/inf) and every video's header (to check it exists, opens, has the
    right size and, when the container records it, as many frames as rows).
    """

    def _scan(self, book: EpisodeBook) -> None:
        listing = self.path / V21_EPISODES_PATH
        rows = load_jsonl(listing)
        for number, row in enumerate(rows, start=1):
            index, length = row.get("episode_index"), row.get("length")
            if not isinstance(index, int) or not isinstance(length, int):
                raise DatasetError(problem(listing, None, f"line {number} needs integer "
                                                          "'episode_index' and 'length'"))
            if book.knows(index):
                raise DatasetError(problem(listing, index, "is listed twice"))
            tasks = row.get("tasks") or []
            book.add(index, length, "; ".join(str(t) for t in tasks))
            if length <= 0:
                book.bad(index, problem(listing, index, f"has length {length} (no frames)"))

        lengths = book.lengths()
        for index, length in sorted(lengths.items()):
            if not book.is_bad(index):
                self._check_data(book, index, length)

        videos = {(index, key): self._video_path(index, key)
                  for index in lengths for key, kind in self.info.camera_storage.items()
                  if kind == "video"}
        self._video_files = [f for f in videos.values() if f.is_file()]
        probes = self._probe_videos([f for (i, _), f in videos.items() if not book.is_bad(i)])
        for (index, key), file in sorted(videos.items()):
            if book.is_bad(index):
                continue
            probe = probes[file]
            bad = self._video_problem(probe, file, index, key)
            length = lengths[index]
            if bad is None and probe.frames and probe.frames != length:
                more = "more" if probe.frames > length else "fewer"
                bad = problem(file, index, f"camera '{key}': video has {probe.frames} frames, "
                                           f"{more} than the {length} parquet rows")
            if bad is not None:
                book.bad(index, bad)

    def _check_data(self, book: EpisodeBook, index: int, length: int) -> None:
        file = self._data_file(index)
        try:
            table = self._read_table(file, None, [*self._lowdim_columns, "episode_index"])
        except ParquetReadError as err:
            book.bad(index, problem(file, index, str(err)))
            return
        try:
            arrays = self._arrays(table, file, index)
        except DatasetError as err:
            book.bad(index, str(err))
            return
        self._lowdim_digests[file] = self._digest(arrays)
        others = set(arrays["episode_index"].tolist()) - {index}
        if others:
            book.bad(index, problem(file, index, f"rows belong to episode {min(others)}"))
            return
        bad = self._scanned_rows_problem(file, index, arrays, length, "meta/episodes.jsonl")
        if bad is not None:
            book.bad(index, bad)

    def _data_file(self, episode_index: int) -> Path:
        chunk = episode_index // self.info.chunks_size
        return self._template("data_path", episode_chunk=chunk, episode_index=episode_index)

    def _video_path(self, episode_index: int, camera: str) -> Path:
        chunk = episode_index // self.info.chunks_size
        return self._template("video_path", episode_chunk=chunk, video_key=camera,
                              episode_index=episode_index)

    def _video_window(self, episode_index: int, camera: str) -> tuple[Path, float, bool]:
        return self._video_path(episode_index, camera), 0.0, True
