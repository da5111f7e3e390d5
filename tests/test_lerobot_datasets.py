"""Datasets both ways, against the real ``lerobot`` package (skipped where it is not installed).

dinocache's writers (``make-sample``, ``sim demos``) write LeRobot v3.0 by default, laid out as
LeRobot's own writer lays it out, and ``LeRobotDataset`` reads them as they are; a dataset written by
LeRobot's own writer (``LeRobotDataset.create`` + ``add_frame`` + ``save_episode``, SVT-AV1 video) is
read here. Either way every frame's pixels, state and action are compared between
``LeRobotDataset`` (PyAV decoder, uint8 frames) and dinocache's reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("lerobot")
import pandas as pd  # noqa: E402  (LeRobot's dependency)
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from dinocache.datasets import open_dataset  # noqa: E402
from dinocache.datasets.episode import Episode  # noqa: E402
from dinocache.datasets.synthetic import synthetic_episode, write_synthetic_dataset  # noqa: E402
from dinocache.keys import camera_key  # noqa: E402

BIN = Path(sys.executable).parent
CAMERAS = ("top", "wrist")
SCENE = dict(image_size=(48, 64), cameras=CAMERAS)
LENGTHS = (12, 9, 14)


def scene_episodes() -> list[Episode]:
    return [synthetic_episode(i, n, **SCENE) for i, n in enumerate(LENGTHS)]


def write_with_lerobot(root: Path, episodes: Iterable[Episode], fps: int, names: list[str]) -> Path:
    """The episodes written by LeRobot's own writer, with its default video settings."""
    episodes = list(episodes)
    height, width = episodes[0].frames[CAMERAS[0]].shape[1:3]
    vector = {"dtype": "float32", "shape": (len(names),), "names": names}
    features = {"observation.state": vector, "observation.velocity": vector, "action": vector}
    features |= {camera_key(cam): {"dtype": "video", "shape": (height, width, 3),
                                   "names": ["height", "width", "channels"]} for cam in CAMERAS}
    dataset = LeRobotDataset.create("local/" + root.name, fps=fps, features=features, root=root,
                                    robot_type="synthetic_disc")
    for ep in episodes:
        for t in range(ep.length):
            dataset.add_frame({"observation.state": ep.state[t], "observation.velocity": ep.velocity[t],
                               "action": ep.action[t], "task": ep.task,
                               **{camera_key(cam): ep.frames[cam][t] for cam in CAMERAS}})
        dataset.save_episode()
    dataset.finalize()
    return root


@pytest.fixture(scope="module")
def lerobot_written(tmp_path_factory) -> Path:
    return write_with_lerobot(tmp_path_factory.mktemp("lerobot") / "written", scene_episodes(), 30,
                              ["disc_x", "disc_y", "grip", "joint_3"])


def assert_lerobot_reads_what_dinocache_reads(root: Path) -> None:
    """Every item ``LeRobotDataset`` returns equals dinocache's reader: pixels, state, action, indices."""
    ours = open_dataset(root)
    theirs = LeRobotDataset("local/" + root.name, root=root, video_backend="pyav", return_uint8=True)
    assert ours.format == "lerobot-v3.0" and theirs.meta.info.codebase_version == "v3.0"
    assert theirs.num_episodes == len(ours.episodes) and len(theirs) == sum(e.length for e in ours.episodes)
    assert set(theirs.meta.camera_keys) == set(ours.cameras)
    for ep in ours.episodes:
        lowdim = ours.read_lowdim(ep.index)
        frames = {cam: ours.read_frames(ep.index, cam) for cam in ours.cameras}
        for t in range(ep.length):
            item = theirs[ep.start + t]
            assert (int(item["episode_index"]), int(item["frame_index"])) == (ep.index, t)
            assert item["task"] == ep.task
            for key in ours.lowdim:
                np.testing.assert_array_equal(item[key].numpy(), lowdim[key][t], err_msg=f"{key} {ep.index}/{t}")
            for cam in ours.cameras:
                np.testing.assert_array_equal(item[cam].permute(1, 2, 0).numpy(), frames[cam][t],
                                              err_msg=f"{cam} {ep.index}/{t}")


def test_make_sample_writes_lerobot_v30_that_lerobot_reads_as_it_is(tmp_path: Path):
    out = tmp_path / "sample"
    done = subprocess.run([str(BIN / "dinocache"), "make-sample", str(out), "--episodes", "3", "--length", "12",
                           "--image-size", "48x64", "--cameras", "top,wrist"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "lerobot-v3.0" in done.stdout
    assert_lerobot_reads_what_dinocache_reads(out)


def test_sim_demos_write_lerobot_v30_that_lerobot_reads_as_it_is(tmp_path: Path):
    pytest.importorskip("gym_aloha")
    out = tmp_path / "demos"
    done = subprocess.run([str(BIN / "dinocache"), "sim", "demos", "--episodes", "1", "--image-size", "84x112",
                           "--workers", "1", "--no-progress", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "lerobot-v3.0" in done.stdout and json.loads((out / "meta/info.json").read_text())["robot_type"] == "aloha"
    assert_lerobot_reads_what_dinocache_reads(out)


def test_a_dataset_lerobot_wrote_reads_here_as_lerobot_returns_it(lerobot_written: Path):
    assert_lerobot_reads_what_dinocache_reads(lerobot_written)


def test_the_v30_writer_lays_out_a_dataset_as_lerobot_does(lerobot_written: Path, tmp_path: Path):
    """Same episodes through both writers: the same files, info.json (keys in order; the video entries
    differ only in the codec's values), episode table (columns in order, types, bookkeeping values),
    tasks, data schema and statistics with LeRobot's quantiles (within LeRobot's float32 rounding)."""
    ours = write_synthetic_dataset(tmp_path / "ours", format="lerobot-v3.0", num_episodes=len(LENGTHS),
                                   episode_length=list(LENGTHS), **SCENE)
    theirs = lerobot_written

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(ours) == files(theirs)

    info = {name: json.loads((root / "meta/info.json").read_text()) for name, root in (("ours", ours), ("theirs", theirs))}
    assert list(info["ours"]) == list(info["theirs"])
    assert {k: v for k, v in info["ours"].items() if k != "features"} == \
        {k: v for k, v in info["theirs"].items() if k != "features"}
    assert list(info["ours"]["features"]) == list(info["theirs"]["features"])
    for key, theirs_feature in info["theirs"]["features"].items():
        ours_feature = info["ours"]["features"][key]
        if theirs_feature["dtype"] == "video":
            assert list(ours_feature["info"]) == list(theirs_feature["info"]), key
            ours_feature, theirs_feature = ({k: v for k, v in f.items() if k != "info"} for f in (ours_feature, theirs_feature))
        assert ours_feature == theirs_feature, key

    episodes = {name: pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
                for name, root in (("ours", ours), ("theirs", theirs))}
    assert episodes["ours"].schema.names == episodes["theirs"].schema.names
    assert episodes["ours"].schema.types == episodes["theirs"].schema.types
    for column in episodes["theirs"].schema.names:
        mine, lerobots = episodes["ours"][column].to_pylist(), episodes["theirs"][column].to_pylist()
        if column.startswith("stats/"):
            np.testing.assert_allclose(np.array(mine, float), np.array(lerobots, float), atol=1e-3, err_msg=column)
        elif column.endswith("_timestamp"):  # LeRobot adds up probed durations: equal to the last bit or two
            np.testing.assert_allclose(mine, lerobots, rtol=0, atol=1e-12, err_msg=column)
        else:
            assert mine == lerobots, column

    stats = {name: json.loads((root / "meta/stats.json").read_text()) for name, root in (("ours", ours), ("theirs", theirs))}
    assert stats["ours"].keys() == stats["theirs"].keys()
    for key, per_stat in stats["theirs"].items():
        assert stats["ours"][key].keys() == per_stat.keys(), key
        for name, value in per_stat.items():
            np.testing.assert_allclose(stats["ours"][key][name], value, atol=1e-3, err_msg=f"{key} {name}")

    pd.testing.assert_frame_equal(pd.read_parquet(ours / "meta/tasks.parquet"), pd.read_parquet(theirs / "meta/tasks.parquet"))

    data = {name: pq.read_schema(root / "data/chunk-000/file-000.parquet") for name, root in (("ours", ours), ("theirs", theirs))}
    assert data["ours"].remove_metadata() == data["theirs"].remove_metadata()
    hf = {name: json.loads(schema.metadata[b"huggingface"])["info"] for name, schema in data.items()}
    assert hf["ours"] == hf["theirs"]
