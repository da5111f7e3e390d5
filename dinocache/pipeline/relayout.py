"""A store laid out again without an episode found damaged while it was being filled.

``--skip-bad-episodes`` leaves out the episodes found bad when the dataset is opened, before the
store is laid out. A frame found damaged only when its episode is decoded (a corrupt packet, a
damaged JPEG, a frame at the wrong time) comes after: the store already has rows for that episode,
and units before it may be written. The extractor then drops the episode from its selection
(:meth:`~dinocache.datasets.base.DatasetSource.drop_episode`) and :func:`relayout` replaces the store
by the one that selection lays out, which records the episode and why under ``episodes_skipped``:
the store an extraction that had known from the start would have written, byte for byte.

The units written before the episode's first row hold the same rows of the new store: their shard
files (checked against their digests first) are linked into it, bound to the new store by new
digests, not computed again. The new store is built in a private folder beside the old one and
swapped in by two renames, so a kill at any point leaves either store whole (or, between the two
renames, none: the next run starts afresh and meets the damaged episode again). A rerun finds the
episode in the record and leaves it out before laying the store out (:func:`drop_recorded`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dinocache.datasets.base import DatasetSource
from dinocache.errors import DinocacheError, StoreError, os_error_line
from dinocache.pipeline.store import (FeatureStore, StoreLayout, create_or_open, private_folder,
                                      sweep_abandoned_folders)
from dinocache.pipeline.store_checks import DIGESTS, shard_file, unit_arrays, unit_digests

__all__ = ["drop_recorded", "relayout"]


def drop_recorded(store: FeatureStore, source: DatasetSource, skip_bad_episodes: bool) -> None:
    """Leave out of ``source`` the episodes ``store`` records as skipped that opening found nothing
    wrong with (an earlier run found them damaged while decoding), so that this run lays the store
    out as that one did and resumes it. Without ``--skip-bad-episodes`` that is refused in one line."""
    listed = {episode.index for episode in source.episodes}
    for index, why in store.record.episodes_skipped:
        if index not in listed:
            continue
        if not skip_bad_episodes:
            raise DinocacheError(f"{store.path}: episode {index} was left out of this store by --skip-bad-episodes "
                                 f"({why}); pass --skip-bad-episodes to resume it, or --overwrite to start again")
        source.drop_episode(index, why)


def relayout(path: Path, layout: StoreLayout) -> FeatureStore:
    """The store at ``path`` replaced by one of ``layout``, keeping the units of the old one that lie
    before the first row where the two differ (an episode left out); a new store where there was none."""
    path = Path(path)
    if not path.exists():
        return create_or_open(path, layout)
    sweep_abandoned_folders(path)
    old = FeatureStore(path, mode="r")
    building, replaced = private_folder(path, "relayout"), private_folder(path, "replaced")
    shutil.rmtree(building, ignore_errors=True)
    try:
        new = create_or_open(building, layout)
        for unit in _reusable_units(old, layout):
            for name in unit_arrays(old.cameras, old.record.views):
                target = shard_file(new.root, new.path, name, unit)
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(shard_file(old.root, old.path, name, unit), target)
            new.root[DIGESTS][unit] = unit_digests(new.root, new.path, new.cameras, new.record.identity(), unit,
                                                    new.record.views)
            new.root["units/done"][unit] = 1
    except BaseException as err:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(err, OSError):
            raise StoreError(f"{path}: cannot lay the store out again ({os_error_line(err)}); it is left as it was, "
                             "fix this and re-run the same command") from err
        raise
    os.rename(path, replaced)
    os.rename(building, path)
    shutil.rmtree(replaced, ignore_errors=True)
    return FeatureStore(path, mode="r+")


def _reusable_units(old: FeatureStore, layout: StoreLayout) -> list[int]:
    """The units of ``old`` written, intact, and wholly before the first episode ``layout`` lays out differently."""
    first_change = old.num_frames
    for was, now in zip(old.episodes(), [*layout.episodes, None]):
        if now is None or tuple(was) != tuple(now):
            first_change = was[1]
            break
    done = old.done_units()
    candidates = [unit for unit in range(old.num_units) if done[unit] and old.unit_range(unit)[1] <= first_change]
    damaged = old.unit_problems(candidates)
    return [unit for unit in candidates if unit not in damaged]


def _link(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source``'s bytes (a copy where the file system has no hard links)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
