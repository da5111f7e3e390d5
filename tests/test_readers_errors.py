"""Every bad input gives one DatasetError line naming the file, the episode and what is wrong.

And with ``skip_bad_episodes=True`` the bad episode is listed in ``skipped`` with that same
message while the good ones still read.
"""

from __future__ import annotations

import numpy as np
import pytest
from _datasets import (
    V30_EPISODES, edit_episode_table, edit_hdf5, edit_json, edit_jsonl, edit_parquet, error_text,
    make, reencode, truncate, v21_data, v21_video, v30_data, v30_video, zero_middle_of_mdat)

from dinocache.errors import DatasetError, DinocacheError
from dinocache.datasets import open_dataset


def read_everything(source) -> None:
    for ep in source.episodes:
        source.read_lowdim(ep.index)
        for cam in source.cameras:
            for _ in source.iter_frames(ep.index, cam):
                pass


def assert_skips(root, episode: int, *fragments: str) -> None:
    """The bad episode is skipped with a reason holding ``fragments``; the rest read fine."""
    source = open_dataset(root, skip_bad_episodes=True)
    assert [index for index, _ in source.skipped] == [episode]
    reason = source.skipped[0][1]
    for fragment in fragments:
        assert fragment in reason, (fragment, reason)
    kept = [ep.index for ep in source.episodes]
    assert episode not in kept and kept
    assert [ep.start for ep in source.episodes] == \
           list(np.cumsum([0] + [ep.length for ep in source.episodes[:-1]]))
    read_everything(source)
    with pytest.raises(DatasetError) as excinfo:
        source.read_lowdim(episode)
    error_text(excinfo, f"episode {episode}", "was skipped")


# ------------------------------------------------------------------------- video files --
@pytest.mark.parametrize("fmt", ["lerobot-v2.1", "lerobot-v3.0"])
def test_missing_video_file(tmp_path, fmt):
    root = make(tmp_path, fmt, episodes_per_file=2 if fmt == "lerobot-v3.0" else None)
    video = v21_video(root, 1) if fmt == "lerobot-v2.1" else v30_video(root, 1)
    video.unlink()
    episode = 1 if fmt == "lerobot-v2.1" else 2  # v3.0: file-001 holds episode 2
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(video), f"episode {episode}", "observation.images.top",
               "video file is missing")
    assert_skips(root, episode, "video file is missing")


def test_truncated_mp4_is_refused_when_opened(tmp_path):
    root = make(tmp_path)
    truncate(v21_video(root, 2), 0.5)  # the index (moov) at the end is lost
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v21_video(root, 2)), "episode 2", "cannot open video")
    assert_skips(root, 2, "cannot open video")


def test_truncated_streamable_mp4_fails_when_decoded(tmp_path):
    """Index first (faststart), data cut short: the header is fine, the frames run out."""
    root = make(tmp_path)
    video = v21_video(root, 1)
    reencode(video, 1, 12, faststart=True)
    truncate(video, 0.6)
    source = open_dataset(root)  # the header still promises 12 frames
    with pytest.raises(DatasetError) as excinfo:
        source.read_frames(1, "top")
    text = error_text(excinfo, str(video), "episode 1", "observation.images.top")
    # Cut inside a packet the decoder errors; cut between packets the frames run out.
    assert "corrupt or truncated" in text or "for the 12 parquet rows" in text, text


def test_corrupt_mp4_fails_when_decoded(tmp_path):
    root = make(tmp_path, episode_length=30)
    video = v21_video(root, 0)
    zero_middle_of_mdat(video)
    source = open_dataset(root)
    batches = source.iter_frames(0, "top", batch_size=8)
    with pytest.raises(DatasetError) as excinfo:
        for _ in batches:
            pass
    error_text(excinfo, str(video), "episode 0", "cannot decode", "corrupt or truncated")


@pytest.mark.parametrize("frames,word", [(9, "fewer"), (15, "more")])
def test_video_frame_count_differs_from_parquet_rows(tmp_path, frames, word):
    root = make(tmp_path)
    reencode(v21_video(root, 1), 1, frames)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v21_video(root, 1)), "episode 1",
               f"video has {frames} frames, {word} than the 12 parquet rows")
    assert_skips(root, 1, f"{word} than the 12 parquet rows")


@pytest.mark.parametrize("frames,expected", [(9, "only 9 frames"), (15, "more frames")])
def test_frame_count_is_checked_again_while_decoding(tmp_path, frames, expected):
    """A container whose header count is unknown/wrong is still caught frame by frame."""
    root = make(tmp_path)
    source = open_dataset(root)  # opened while the video was right
    reencode(v21_video(root, 1), 1, frames)
    delivered = []
    with pytest.raises(DatasetError) as excinfo:
        for batch in source.iter_frames(1, "top", batch_size=4):
            delivered.append(len(batch))
    error_text(excinfo, str(v21_video(root, 1)), "episode 1", expected)
    assert sum(delivered) < 12  # the tail of a bad episode is never handed out


def test_video_out_of_step_with_parquet_timestamps(tmp_path):
    root = make(tmp_path)
    reencode(v21_video(root, 2), 2, 12, fps=15)  # same frame count, twice as slow
    source = open_dataset(root)
    with pytest.raises(DatasetError) as excinfo:
        source.read_frames(2, "top")
    error_text(excinfo, str(v21_video(root, 2)), "episode 2", "frame 1 is at 0.0667 s",
               "parquet row says 0.0333 s")


def test_v30_video_shorter_than_its_episode_windows(tmp_path):
    root = make(tmp_path, "lerobot-v3.0", episodes_per_file=2)
    video = v30_video(root, 0)
    video.unlink()
    from dinocache.datasets.encode import encode_video
    from dinocache.datasets.synthetic import synthetic_episode
    encode_video(video, synthetic_episode(0, 18).frames["top"], 30)  # file-000 needs 24
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(video), "episode 1", "window ends at 0.8000 s",
               "video lasts 0.6000 s")
    assert_skips(root, 1, "window ends")


def test_v30_window_that_spans_more_frames_than_rows(tmp_path):
    root = make(tmp_path, "lerobot-v3.0", episodes_per_file=3)
    edit_episode_table(root, "videos/observation.images.top/to_timestamp", 1, 28 / 30)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v30_video(root, 0)), "episode 1", "holds 16.00 frames",
               "12 parquet rows")


# ---------------------------------------------------------------------------- episodes --
def test_episode_of_length_zero_v21(tmp_path):
    root = make(tmp_path)
    edit_jsonl(root / "meta/episodes.jsonl",
               lambda row: {**row, "length": 0} if row["episode_index"] == 1 else row)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(root / "meta/episodes.jsonl"), "episode 1", "length 0")
    assert_skips(root, 1, "length 0")


def test_episode_of_length_zero_v30(tmp_path):
    root = make(tmp_path, "lerobot-v3.0")
    edit_episode_table(root, "length", 2, 0)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(root / V30_EPISODES), "episode 2", "length 0")


def test_episode_of_length_zero_aloha(tmp_path):
    root = make(tmp_path, "aloha-hdf5")
    file = root / "episode_0.hdf5"
    for name in ("/observations/qpos", "/observations/qvel", "/action",
                 "/observations/images/top"):
        edit_hdf5(file, name, lambda a: a[:0])
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(file), "episode 0", "length 0")
    assert_skips(root, 0, "length 0")


def test_parquet_rows_differ_from_declared_length(tmp_path):
    root = make(tmp_path)
    edit_jsonl(root / "meta/episodes.jsonl",
               lambda row: {**row, "length": 13} if row["episode_index"] == 0 else row)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v21_data(root, 0)), "episode 0", "12 rows",
               "meta/episodes.jsonl says length 13")


@pytest.mark.parametrize("key,value,word", [("observation.state", np.nan, "NaN"),
                                            ("action", np.inf, "inf")])
def test_non_finite_lowdim_v21(tmp_path, key, value, word):
    root = make(tmp_path)

    def poison(arrays):
        arrays[key][5, 2] = value

    edit_parquet(v21_data(root, 2), poison, key)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v21_data(root, 2)), "episode 2", f"'{key}' contains {word} at frame 5")
    assert_skips(root, 2, f"contains {word}")


def test_non_finite_lowdim_in_a_shared_v30_file(tmp_path):
    root = make(tmp_path, "lerobot-v3.0")

    def poison(arrays):
        arrays["action"][12 + 7, 0] = -np.inf  # episode 1, frame 7

    edit_parquet(v30_data(root, 0), poison, "action")
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v30_data(root, 0)), "episode 1", "'action' contains inf at frame 7")
    assert_skips(root, 1, "contains inf")


def test_non_finite_lowdim_aloha(tmp_path):
    root = make(tmp_path, "aloha-hdf5")

    def poison(a):
        a[3, 1] = np.nan
        return a

    edit_hdf5(root / "episode_1.hdf5", "/observations/qpos", poison)
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, "episode_1.hdf5", "episode 1", "/observations/qpos",
               "'observation.state'", "NaN at frame 3")
    assert_skips(root, 1, "NaN")


def test_missing_parquet_file(tmp_path):
    root = make(tmp_path)
    v21_data(root, 0).unlink()
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(v21_data(root, 0)), "episode 0", "data file is missing")


def test_all_episodes_bad(tmp_path):
    root = make(tmp_path, num_episodes=2)
    for episode in (0, 1):
        v21_video(root, episode).unlink()
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root, skip_bad_episodes=True)
    error_text(excinfo, "all 2 episodes are bad", "video file is missing")


# ----------------------------------------------------------------------- dataset level --
def test_unknown_camera_lists_the_existing_ones(tmp_path):
    root = make(tmp_path, "lerobot-v3.0", cameras=("top", "wrist"))
    source = open_dataset(root)
    for call in (lambda: source.select_cameras(["side"]),
                 lambda: source.iter_frames(0, "side"),
                 lambda: source.read_frames(0, "side")):
        with pytest.raises(DatasetError) as excinfo:
            call()
        error_text(excinfo, str(root), "camera 'side' does not exist",
                   "cameras: observation.images.top, observation.images.wrist")


def test_unknown_episode(tmp_path):
    source = open_dataset(make(tmp_path, "aloha-hdf5"))
    with pytest.raises(DatasetError) as excinfo:
        source.read_lowdim(7)
    error_text(excinfo, "episode 7", "no such episode", "episodes: 0, 1, 2")


@pytest.mark.parametrize("version", ["v2.0", "v1.6"])
def test_unsupported_codebase_version(tmp_path, version):
    root = make(tmp_path)
    edit_json(root / "meta/info.json", lambda info: {**info, "codebase_version": version})
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(root / "meta/info.json"), f"codebase_version '{version}'",
               "supported: v2.1, v3.0")


def test_path_that_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    for path, what in [(tmp_path / "empty", "is not a dataset"),
                       (tmp_path / "file.txt", "is not a dataset"),
                       (tmp_path / "nowhere", "no such file or directory")]:
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(path)
        error_text(excinfo, str(path), what)
        assert isinstance(excinfo.value, DinocacheError)


def test_malformed_info_json(tmp_path):
    root = make(tmp_path)
    (root / "meta/info.json").write_text("{not json")
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root)
    error_text(excinfo, str(root / "meta/info.json"), "cannot parse JSON")


def test_tolerated_quirks_of_real_datasets(tmp_path):
    """Nested names, unknown extra keys and no stats files do not stop a dataset."""
    root = make(tmp_path)

    def quirky(info):
        info["features"]["observation.state"]["names"] = [info["features"][
            "observation.state"]["names"]]
        info["features"]["action"]["names"] = {"motors": info["features"]["action"]["names"]}
        info["some_future_key"] = {"anything": 1}
        return info

    edit_json(root / "meta/info.json", quirky)
    (root / "meta/episodes_stats.jsonl").unlink()
    source = open_dataset(root)
    assert source.lowdim["observation.state"].names[0] == "disc_x"
    assert source.lowdim["action"].names[-1] == "joint_3"
    read_everything(source)
