"""Parquet access for LeRobot data files: pick an episode's rows, turn list columns into arrays.

LeRobot v3.0 packs many episodes into one parquet file, writing each episode as its own row
group(s). Reading one episode therefore asks the file's row-group statistics which groups can
hold it and reads only those, instead of the whole (up to 100 MB) file per episode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class ParquetReadError(Exception):
    """A parquet file or column that cannot be read; callers add file and episode."""


def open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise ParquetReadError("data file is missing")
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ParquetReadError(f"cannot read parquet ({err})") from None


def require_columns(pf: pq.ParquetFile, columns: Sequence[str]) -> None:
    names = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ParquetReadError(f"parquet has no column {', '.join(map(repr, missing))}")


def row_groups_for_episode(pf: pq.ParquetFile, episode_index: int) -> list[int]:
    """Row groups whose ``episode_index`` statistics may contain ``episode_index``.

    Files without statistics (or without the column) give every row group: correct, slower.
    """
    # Statistics are per parquet *leaf* column: nested columns (lists, image structs) take one
    # or more leaves each, so the arrow field position is not the statistics position.
    leaves = [pf.schema.column(i).path for i in range(len(pf.schema))]
    if "episode_index" not in leaves:
        return list(range(pf.num_row_groups))
    column = leaves.index("episode_index")
    groups = []
    for i in range(pf.num_row_groups):
        stats = pf.metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max or stats.min <= episode_index <= stats.max:
            groups.append(i)
    return groups


def read_episode_rows(pf: pq.ParquetFile, columns: Sequence[str],
                      episode_index: int | None) -> pa.Table:
    """The rows of one episode (all rows when ``episode_index`` is None), in file order."""
    require_columns(pf, columns)
    try:
        if episode_index is None:
            return pf.read(columns=list(columns))
        wanted = list(dict.fromkeys([*columns, "episode_index"]))
        table = pf.read_row_groups(row_groups_for_episode(pf, episode_index), columns=wanted)
        table = table.filter(pc.equal(table["episode_index"], episode_index))
        return table.select(list(columns))
    except (OSError, pa.ArrowException) as err:
        raise ParquetReadError(f"cannot read parquet ({err})") from None


def iter_episode_column(pf: pq.ParquetFile, column: str, episode_index: int,
                        batch_size: int) -> Iterator[pa.Array]:
    """Stream one column of one episode in batches of at most ``batch_size`` rows.

    Used for image columns, where holding a whole episode of PNG bytes at once is wasteful.
    """
    require_columns(pf, [column, "episode_index"])
    groups = row_groups_for_episode(pf, episode_index)
    try:
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups,
                                     columns=[column, "episode_index"]):
            rows = batch.filter(pc.equal(batch.column("episode_index"), episode_index))
            if rows.num_rows:
                yield rows.column(column)
    except (OSError, pa.ArrowException) as err:
        raise ParquetReadError(f"cannot read parquet ({err})") from None


def column_to_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...],
                    dtype: np.dtype | type) -> np.ndarray:
    """Turn a column of scalars or (nested, fixed or variable) lists into ``(rows, *shape)``.

    LeRobot writes a ``(1,)`` feature as a scalar column and ``(n,)`` as a list column whose
    arrow type depends on the writer (``fixed_size_list`` from ``datasets``, ``list`` from
    pandas); both flatten to the same values. Nulls and rows of the wrong length are errors.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    rows = len(column)
    values: pa.Array = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
            or pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise ParquetReadError("has empty (null) rows")
        values = values.flatten()
    if values.null_count:
        raise ParquetReadError("has null values")
    size = int(np.prod(shape)) if shape else 1
    if len(values) != rows * size:
        per_row = len(values) / rows if rows else 0
        raise ParquetReadError(f"has {per_row:g} values per row, expected {size} for shape "
                               f"{list(shape)}")
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
        raise ParquetReadError(f"holds {values.type} values, not numbers (first: {str(values[0])[:40]!r})")
    try:
        array = values.to_numpy(zero_copy_only=False)
    except (pa.ArrowException, ValueError) as err:
        raise ParquetReadError(f"is not numeric ({err})") from None
    return np.asarray(array, dtype=dtype).reshape((rows, *shape))
