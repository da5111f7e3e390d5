"""The readers agree with each other and with the generator's ground truth, in every format."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from _datasets import (
    V30_EPISODES, edit_parquet, error_text, make, v21_data, v21_video, v30_data, v30_video)

from dinocache.errors import DatasetError
from dinocache.datasets import (
    CameraInfo, EpisodeInfo, detect_format, iter_episode_batches, open_dataset)
from dinocache.datasets.lerobot_meta import normalize_names
from dinocache.datasets.synthetic import synthetic_episode

LENGTHS = [12, 17, 9]
CAMERAS = ("top", "wrist")
#: Mean absolute error allowed between decoded and rendered frames (grey levels of 255).
CODEC_MAE = 3.0


def ground_truth(lengths=LENGTHS, cameras=CAMERAS, image_size=(48, 64), **kw):
    return [synthetic_episode(i, n, image_size=image_size, cameras=cameras, **kw)
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    """The same three episodes written as LeRobot v2.1, LeRobot v3.0 and ALOHA HDF5."""
    root = tmp_path_factory.mktemp("formats")
    common = dict(num_episodes=3, episode_length=LENGTHS, cameras=CAMERAS)
    return {fmt: open_dataset(make(root, fmt, **common, **extra)) for fmt, extra in [
        ("lerobot-v2.1", {}), ("lerobot-v3.0", {"episodes_per_file": 2}), ("aloha-hdf5", {})]}


def test_three_formats_list_the_same_episodes_and_features(three_formats):
    expected = [EpisodeInfo(0, 12, "", 0), EpisodeInfo(1, 17, "", 12), EpisodeInfo(2, 9, "", 29)]
    for fmt, source in three_formats.items():
        assert source.format == fmt
        assert source.fps == 30.0
        assert [(e.index, e.length, e.start) for e in source.episodes] == \
               [(e.index, e.length, e.start) for e in expected]
        assert source.num_frames == 38 and source.skipped == []
        assert list(source.cameras) == ["observation.images.top", "observation.images.wrist"]
        assert source.cameras["observation.images.top"] == CameraInfo(
            "observation.images.top", 48, 64)
        assert list(source.lowdim) == ["observation.state", "observation.velocity", "action"]
        assert source.lowdim["action"].shape == (4,)
    lerobot = three_formats["lerobot-v2.1"]
    assert lerobot.lowdim["observation.state"].names == ["disc_x", "disc_y", "grip", "joint_3"]
    assert [e.task for e in lerobot.episodes] == [ep.task for ep in ground_truth()]
    assert three_formats["lerobot-v3.0"].episodes == lerobot.episodes


def test_three_formats_read_identical_lowdim_arrays(three_formats):
    for truth in ground_truth():
        reads = {fmt: s.read_lowdim(truth.index) for fmt, s in three_formats.items()}
        for fmt, arrays in reads.items():
            assert set(arrays) == {*truth.lowdim(), "frame_index", "timestamp"}, fmt
            for key, value in truth.lowdim().items():
                assert arrays[key].dtype == np.float32
                np.testing.assert_array_equal(arrays[key], value, err_msg=f"{fmt} {key}")
            np.testing.assert_array_equal(arrays["frame_index"], np.arange(truth.length))
            assert arrays["frame_index"].dtype == np.int64
            np.testing.assert_allclose(arrays["timestamp"], np.arange(truth.length) / 30,
                                       atol=1e-6)


def test_three_formats_read_the_same_frames(three_formats):
    for truth in ground_truth():
        for cam in CAMERAS:
            want = truth.frames[cam]
            aloha = three_formats["aloha-hdf5"].read_frames(truth.index, cam)
            np.testing.assert_array_equal(aloha, want)  # raw HDF5 is lossless
            for fmt in ("lerobot-v2.1", "lerobot-v3.0"):
                got = three_formats[fmt].read_frames(truth.index, cam)
                assert got.shape == want.shape and got.dtype == np.uint8
                mae = np.abs(got.astype(float) - want).mean()
                assert mae < CODEC_MAE, (fmt, truth.index, cam, mae)


def test_iter_frames_batches_in_order(three_formats):
    source = three_formats["lerobot-v2.1"]
    batches = list(source.iter_frames(1, "top", batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(batches), source.read_frames(1, "top"))
    with pytest.raises(ValueError):
        next(iter(source.iter_frames(1, "top", batch_size=0)))


def test_v30_packs_episodes_into_shared_files_located_by_time(tmp_path):
    """Four episodes in two files; keyframes every 12 frames never fall on an episode start."""
    lengths = [13, 11, 17, 8]
    root = make(tmp_path, "lerobot-v3.0", num_episodes=4, episode_length=lengths,
                episodes_per_file=2, cameras=("top",))
    assert sorted(p.name for p in (root / "data/chunk-000").iterdir()) == \
           ["file-000.parquet", "file-001.parquet"]
    assert v30_video(root, 0).is_file() and v30_video(root, 1).is_file()
    table = pq.read_table(root / V30_EPISODES).to_pylist()
    assert [r["data/file_index"] for r in table] == [0, 0, 1, 1]
    assert [round(r["videos/observation.images.top/from_timestamp"] * 30) for r in table] == \
           [0, 13, 0, 17]
    assert pq.ParquetFile(v30_data(root, 0)).num_row_groups == 2

    source = open_dataset(root)
    truth = ground_truth(lengths, ("top",))
    everything = np.concatenate([t.frames["top"] for t in truth]).astype(float)
    for ep in source.episodes:
        got = source.read_frames(ep.index, "top").astype(float)
        assert len(got) == ep.length
        errors = {}
        for shift in (-1, 0, 1):  # a frame early, exact, a frame late
            lo = ep.start + shift
            if 0 <= lo and lo + ep.length <= len(everything):
                errors[shift] = np.abs(got - everything[lo:lo + ep.length]).mean()
        assert errors[0] < CODEC_MAE
        assert min(errors, key=errors.get) == 0, (ep.index, errors)
        np.testing.assert_array_equal(source.read_lowdim(ep.index)["action"],
                                      truth[ep.index].action)


@pytest.mark.parametrize("codec,size", [("hevc", (48, 64)), ("av1", (64, 64))])
def test_other_codecs_decode(tmp_path, codec, size):
    root = make(tmp_path, num_episodes=1, episode_length=10, codec=codec, image_size=size)
    got = open_dataset(root).read_frames(0, "top")
    want = synthetic_episode(0, 10, image_size=size).frames["top"]
    assert np.abs(got.astype(float) - want).mean() < CODEC_MAE


def test_video_with_undecodable_metadata_still_reads(tmp_path):
    """A container tag that is not UTF-8 (an old muxer's Latin-1 title) must not stop decoding,
    on PyAV <= 18 (strict unless told otherwise) as on PyAV >= 19 (no such argument any more)."""
    import av

    root = make(tmp_path, num_episodes=1, episode_length=6, cameras=("top",))
    video = v21_video(root, 0)
    want = open_dataset(root).read_frames(0, "top")
    tagged = video.with_suffix(".tagged.mp4")
    with av.open(str(video)) as src, av.open(str(tagged), "w") as dst:
        dst.metadata["title"] = "TITLETAG"
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    data = tagged.read_bytes()
    assert data.count(b"TITLETAG") == 1
    video.write_bytes(data.replace(b"TITLETAG", b"\xff\xfe\xe9TITLE"))  # same length, not UTF-8
    tagged.unlink()
    np.testing.assert_array_equal(open_dataset(root).read_frames(0, "top"), want)


@pytest.mark.parametrize("fmt", ["lerobot-v2.1", "lerobot-v3.0"])
def test_image_features_stored_in_parquet_are_exact(tmp_path, fmt):
    root = make(tmp_path, fmt, image_storage="image", cameras=CAMERAS, episodes_per_file=2
                if fmt == "lerobot-v3.0" else None)
    source = open_dataset(root)
    assert source.fingerprint() == open_dataset(root).fingerprint()
    for truth in ground_truth([12] * 3):
        for cam in CAMERAS:
            np.testing.assert_array_equal(source.read_frames(truth.index, cam), truth.frames[cam])


def test_aloha_compressed_jpeg_frames_keep_their_channel_order(tmp_path):
    root = make(tmp_path, "aloha-hdf5", aloha_compressed=True, cameras=CAMERAS)
    source = open_dataset(root)
    assert source.cameras["observation.images.wrist"] == CameraInfo(
        "observation.images.wrist", 48, 64)
    for truth in ground_truth([12] * 3):
        for cam in CAMERAS:
            got = source.read_frames(truth.index, cam).astype(float)
            assert np.abs(got - truth.frames[cam]).mean() < CODEC_MAE
            swapped = np.abs(got[..., ::-1] - truth.frames[cam]).mean()
            assert swapped > 5 * CODEC_MAE  # red/blue swapped would be far off


def test_aloha_fps_default_sidecar_and_override(tmp_path):
    root = make(tmp_path, "aloha-hdf5", fps=25)
    assert open_dataset(root).fps == 25.0  # from the sidecar the generator writes
    assert open_dataset(root, fps=10).fps == 10.0
    (root / "dinocache.json").unlink()
    source = open_dataset(root)
    assert source.fps == 50.0  # ALOHA's recording rate
    assert source.episodes[0].task == root.name
    np.testing.assert_allclose(source.read_lowdim(0)["timestamp"][:3], [0, 0.02, 0.04], atol=1e-7)


def test_fps_override_is_refused_for_lerobot(tmp_path):
    root = make(tmp_path, num_episodes=1)
    assert open_dataset(root, fps=30).fps == 30.0
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(root, fps=50)
    error_text(excinfo, "info.json", "fps 30", "aloha-hdf5")


def test_environment_state_is_a_lowdim_feature(tmp_path):
    for fmt in ("lerobot-v2.1", "lerobot-v3.0"):
        source = open_dataset(make(tmp_path, fmt, with_env_state=True))
        assert source.lowdim["observation.environment_state"].names == ["goal_x", "goal_y"]
        env = source.read_lowdim(2)["observation.environment_state"]
        np.testing.assert_array_equal(
            env, synthetic_episode(2, 12, with_env_state=True).env_state)


def test_select_cameras_accepts_keys_and_short_names(three_formats):
    source = three_formats["lerobot-v3.0"]
    assert source.select_cameras(None) == ["observation.images.top", "observation.images.wrist"]
    assert source.select_cameras(["wrist", "observation.images.top", "wrist"]) == \
           ["observation.images.wrist", "observation.images.top"]
    assert source.camera("top").height == 48


def test_detect_format_and_explicit_format(three_formats):
    for fmt, source in three_formats.items():
        assert detect_format(source.path) == fmt
        assert open_dataset(source.path, format=fmt).format == fmt
    v21 = three_formats["lerobot-v2.1"].path
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(v21, format="lerobot-v3.0")
    error_text(excinfo, str(v21), "lerobot-v3.0", "it is lerobot-v2.1")
    with pytest.raises(DatasetError) as excinfo:
        open_dataset(v21, format="rlds")
    error_text(excinfo, "unknown format 'rlds'", "lerobot-v2.1, lerobot-v3.0, aloha-hdf5")


def test_fingerprint_tracks_content(tmp_path):
    root = make(tmp_path)
    first = open_dataset(root).fingerprint()
    assert len(first) == 64 and first == open_dataset(root).fingerprint()

    def nudge(arrays):
        arrays["action"][3, 0] += 1e-3

    edit_parquet(v21_data(root, 1), nudge, "action")
    changed = open_dataset(root).fingerprint()
    assert changed != first

    aloha = make(tmp_path, "aloha-hdf5")
    assert open_dataset(aloha).fingerprint() != first


def test_prefetch_yields_aligned_batches_for_all_cameras(three_formats):
    source = three_formats["lerobot-v2.1"]
    batches = list(iter_episode_batches(source, 1, batch_size=5))
    assert [len(b["observation.images.top"]) for b in batches] == [5, 5, 5, 2]
    for cam in ("observation.images.top", "observation.images.wrist"):
        np.testing.assert_array_equal(np.concatenate([b[cam] for b in batches]),
                                      source.read_frames(1, cam))


def test_prefetch_stops_its_threads_when_closed_early(three_formats):
    before = threading.active_count()
    stream = iter_episode_batches(three_formats["lerobot-v3.0"], 1, batch_size=2, queue_size=1)
    next(stream)
    stream.close()
    assert threading.active_count() == before


def test_normalize_names_flattens_the_spellings_datasets_use():
    assert normalize_names(["a", "b"], (2,)) == ["a", "b"]
    assert normalize_names([["a", "b"]], (2,)) == ["a", "b"]
    assert normalize_names({"motors": ["a", "b"]}, (2,)) == ["a", "b"]
    assert normalize_names(["a"], (2,)) is None
    assert normalize_names(None, (2,)) is None


def test_background_encoder_writes_each_video_and_raises_the_first_error(tmp_path):
    """Videos encoded in threads while the writer goes on: each file holds its own frames, in order;
    an encoder failure is raised when the block ends, not lost with its thread."""
    import av

    from dinocache.datasets.encode import BackgroundEncoder

    clips = {k: synthetic_episode(k, 6, image_size=(32, 48), seed=3).frames["top"] for k in range(3)}
    with BackgroundEncoder(threads=2) as videos:
        for k, frames in clips.items():
            videos.submit(tmp_path / f"clip_{k}.mp4", frames, 10.0)
    for k, frames in clips.items():
        with av.open(str(tmp_path / f"clip_{k}.mp4")) as container:
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert decoded.shape == frames.shape
        assert np.abs(decoded.astype(int) - frames).mean() < 3  # crf 10: within a few grey levels

    with pytest.raises(ValueError, match="codec must be one of"):
        with BackgroundEncoder(threads=2) as videos:
            videos.submit(tmp_path / "bad.mp4", clips[0], 10.0, codec="mpeg1")
    assert not (tmp_path / "bad.mp4").exists()


def test_video_stream_writes_what_encode_video_writes_and_raises_the_encoders_error(tmp_path):
    """A LeRobot v3.0 file's video fed episode by episode decodes to the frames of one encode_video
    call on them all; an encoder failure (frames it cannot encode, mid-file) comes back to the writer."""
    import av

    from dinocache.datasets.encode import VideoStream, encode_video

    clips = [synthetic_episode(k, 5 + k, image_size=(32, 48), seed=4).frames["top"] for k in range(3)]
    with VideoStream(tmp_path / "streamed.mp4", 10.0) as stream:
        for frames in clips:
            stream.write(frames)
    encode_video(tmp_path / "whole.mp4", np.concatenate(clips), 10.0)

    def decoded(name: str) -> np.ndarray:
        with av.open(str(tmp_path / name)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    # x264 encodes with threads, so two encodes of the same frames need not be bit-identical (seen on
    # PyAV 18.1): the streamed file must hold every frame, in order, as faithfully as one call's.
    streamed, whole, source = decoded("streamed.mp4").astype(int), decoded("whole.mp4").astype(int), np.concatenate(clips)
    assert streamed.shape == whole.shape == source.shape
    assert np.abs(streamed - source).mean() < 3 and np.abs(whole - source).mean() < 3  # crf 10: a few grey levels
    assert np.abs(streamed - whole).mean() < 2

    with pytest.raises(ValueError):
        with VideoStream(tmp_path / "bad.mp4", 10.0) as stream:
            stream.write(clips[0])
            stream.write(np.zeros((4, 32, 48, 4), np.uint8))  # RGBA: not the rgb24 frames it encodes


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_decoder_threads_are_what_the_caller_asks_and_change_no_frame(tmp_path):
    """``decoder_threads`` sets FFmpeg's frame threads (the pipeline shares the cores among its
    decoders); the frames are the same whatever the count."""
    source = open_dataset(make(tmp_path, num_episodes=1, episode_length=24, cameras=("top",), image_size=(96, 128)))

    def decode(threads: int) -> tuple[np.ndarray, int]:
        batches = source.iter_frames(0, "top", batch_size=4, decoder_threads=threads)
        first = next(batches)  # the decoder is open, its threads started
        running = len(os.listdir("/proc/self/task"))
        return np.concatenate([first, *batches]), running

    (one, with_one), (four, with_four) = decode(1), decode(4)
    np.testing.assert_array_equal(one, four)
    assert with_four >= with_one + 3, (with_one, with_four)
