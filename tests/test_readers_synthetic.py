"""The synthetic scene is learnable from pixels and deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from dinocache.datasets.synthetic import (
    _PALETTE, ACTION_LEAD_FRAMES, synthetic_episode, write_synthetic_dataset)


def test_same_seed_same_episode_other_seed_other_episode():
    a = synthetic_episode(1, 15, seed=3)
    b = synthetic_episode(1, 15, seed=3)
    np.testing.assert_array_equal(a.frames["top"], b.frames["top"])
    np.testing.assert_array_equal(a.action, b.action)
    c = synthetic_episode(1, 15, seed=4)
    assert not np.array_equal(a.state, c.state)


def test_action_is_the_state_a_few_frames_ahead():
    ep = synthetic_episode(0, 30, state_dim=5, action_dim=5)
    np.testing.assert_allclose(ep.action[:-ACTION_LEAD_FRAMES], ep.state[ACTION_LEAD_FRAMES:],
                               atol=1e-6)
    assert ep.velocity.shape == (30, 5) and np.abs(ep.velocity).max() > 0


def test_the_disc_is_drawn_where_the_state_says():
    """The policy's target is visible: the disc's centroid in the image is the state's x, y."""
    height, width = 96, 128
    ep = synthetic_episode(2, 10, image_size=(height, width))
    colour = dict(_PALETTE)[ep.task.split()[2]]  # "follow the <colour> disc"
    for t in range(10):
        frame = ep.frames["top"][t].astype(float)
        mask = np.linalg.norm(frame - colour, axis=2) < 20
        v, u = np.nonzero(mask)
        assert len(u) > 20
        x = (u.mean() + 0.5) / width * 2 - 1
        y = (v.mean() + 0.5) / height * 2 - 1
        assert abs(x - ep.state[t, 0]) < 0.03 and abs(y - ep.state[t, 1]) < 0.03


def test_writer_refuses_a_folder_with_content(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path)


def test_writer_refuses_options_that_do_not_fit_the_format(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "a", format="aloha-hdf5", with_env_state=True)
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "b", aloha_compressed=True)
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "c", codec="vp9")


@pytest.mark.parametrize("shape", [(7, 30, 40, 3), (400, 24, 32, 3), (101, 310, 20, 3)])
def test_image_stats_are_lerobots_float_moments_over_the_sampled_frames(shape):
    """The writer's per-channel image stats (from 256-bin histograms) equal the floating-point
    min / max / mean / std over LeRobot's sample of frames, strided down above 300 px."""
    from dinocache.datasets.lerobot_stats import image_stats

    frames = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    frames[..., 2] //= 3  # the channels differ
    stats = image_stats(frames)
    length = len(frames)
    picked = frames[np.round(np.linspace(0, length - 1, length if length < 100 else 100)).astype(int)]
    if max(shape[1:3]) >= 300:
        picked = picked[:, ::2, ::2]
    pixels = picked.reshape(-1, 3) / 255.0
    assert stats["count"] == [len(picked)]
    for key, expected in (("min", pixels.min(0)), ("max", pixels.max(0)), ("mean", pixels.mean(0)), ("std", pixels.std(0))):
        assert np.asarray(stats[key]).shape == (3, 1, 1)
        np.testing.assert_allclose(np.asarray(stats[key]).ravel(), expected, rtol=0, atol=1e-12, err_msg=key)


def test_vector_quantiles_are_within_a_histogram_bin_of_the_exact_ones():
    """LeRobot v3.0's quantiles come from a 5000-bin histogram: on continuous values they lie
    within a bin of the exact quantiles (the smallest value with at least q of the samples at or
    below it; tests/test_lerobot_datasets.py compares them with LeRobot's own function where
    LeRobot is installed)."""
    from dinocache.datasets.lerobot_stats import QUANTILES, vector_stats

    values = np.random.default_rng(2).normal(size=(500, 3)) * [1.0, 10.0, 0.01]
    stats = vector_stats(values, quantiles=True)
    bin_width = (values.max(0) - values.min(0)) / 5000
    for key, q in QUANTILES.items():
        np.testing.assert_array_less(np.abs(np.array(stats[key]) - np.quantile(values, q, axis=0, method="inverted_cdf")),
                                     2 * bin_width, err_msg=key)
    assert "q50" not in vector_stats(values)  # v2.1 has none
    single = vector_stats(values[:1], quantiles=True)  # one frame: LeRobot gives the mean
    assert single["q01"] == single["q99"] == single["mean"]
