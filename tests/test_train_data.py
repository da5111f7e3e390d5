"""Training data from a feature store: split, action windows, sampling order, in-memory vs streamed batches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinocache.devices import parse_memory_budget
from dinocache.encoders.augment_recipe import parse_recipe
from dinocache.errors import DinocacheError, StoreError
from dinocache.pipeline.store import (FORMAT_NAME, FORMAT_VERSION, VIEWS_FORMAT_VERSION, FeatureStore, StoreLayout,
                                     StoreRecord, create_or_open)
from dinocache.policy.model.config import ACTION, ACTION_IS_PAD, OBS_STATE
from dinocache.policy.training.data import CachedFeatures
from dinocache.policy.training.episodes import action_windows, episode_rows, open_training_store, split_episodes
from dinocache.policy.training.sampling import SampleOrder

sys.path.insert(0, str(Path(__file__).parent))
from _devices import DEVICES, needs_cuda  # noqa: E402

PHASE_STEP = 1 / 24


def make_store(path: Path, num_episodes: int = 24, lengths: tuple[int, int] = (16, 28), seed: int = 0,
               cameras: dict[str, tuple[int, int, int]] | None = None, complete: bool = True,
               backbone: str = "dinov2_vits14", views: int = 1) -> FeatureStore:
    """A store whose actions are a known, learnable function of the features.

    Every episode has a goal ``g`` (3-d); frame ``t`` has the phase ``p = t / 24``. The action is
    ``g * cos(pi p) + 0.3 p``, so the chunk ``t .. t+k`` is determined by ``g`` and ``p``: ``g`` is only
    visible in the features (each patch is a fixed random linear map of ``[g, p, 1]`` plus noise, the
    CLS token another), ``p`` in the state too. Episode lengths vary so that chunks run past episode ends.
    With ``views`` > 1 the store has augmented views: view ``v`` of a frame is its features with noise
    of its own (another draw per view), so every view of every frame is distinct.
    """
    cameras = cameras or {"top": (2, 2, 16), "wrist": (1, 3, 16)}
    rng = np.random.default_rng(seed)
    episode_lengths = rng.integers(lengths[0], lengths[1] + 1, size=num_episodes)
    goals = rng.uniform(-1, 1, size=(num_episodes, 3))
    phase = np.concatenate([np.arange(n) * PHASE_STEP for n in episode_lengths])
    goal = np.repeat(goals, episode_lengths, axis=0)
    n = len(phase)
    action = goal * np.cos(np.pi * phase)[:, None] + 0.3 * phase[:, None]
    state = np.stack([phase, rng.normal(size=n)], axis=1)
    latent = np.concatenate([goal, phase[:, None], np.ones((n, 1))], axis=1)  # (n, 5)
    starts = np.concatenate([[0], np.cumsum(episode_lengths)[:-1]])
    record = StoreRecord.from_dict({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "num_frames": n, "cameras": list(cameras),
        "unit_frames": 32, "chunk_frames": 8, "backbone": {"name": backbone}, "weights": {"source": "random", "seed": 0},
        "source": {"format": "synthetic", "fingerprint": f"learnable-{seed}"}, "preprocess": {"image_size": [28, 28]},
        "episodes_selected": list(range(num_episodes)), "precision": "fp32", "fps": 30.0,
        **({"format_version": VIEWS_FORMAT_VERSION, "views": views, "augment": parse_recipe("drq").to_dict()}
           if views > 1 else {})})
    layout = StoreLayout(
        record=record, grids=cameras,
        lowdim={"action": action.astype(np.float32), "observation.state": state.astype(np.float32)},
        episode_index=np.repeat(np.arange(num_episodes), episode_lengths),
        frame_index=np.concatenate([np.arange(k) for k in episode_lengths]),
        timestamp=np.concatenate([np.arange(k) / 30 for k in episode_lengths]),
        episodes=[(i, int(s), int(k), "reach") for i, (s, k) in enumerate(zip(starts, episode_lengths))],
    )
    store = create_or_open(path, layout)
    projections = {cam: rng.normal(size=(h, w, 5, c)) / 2 for cam, (h, w, c) in cameras.items()}
    cls_projection = rng.normal(size=(5, 16)) / 2
    for unit in range(store.num_units if complete else store.num_units - 1):
        start, stop = store.unit_range(unit)
        x = latent[start:stop]
        features = {}
        for cam, proj in projections.items():
            clean = np.einsum("nd,hwdc->nhwc", x, proj)
            patch, cls = [], []
            for view in range(views):
                patch.append(clean + 0.05 * rng.normal(size=(stop - start, *proj.shape[:2], proj.shape[3])))
                cls.append(x @ cls_projection + (0.05 * rng.normal(size=(stop - start, 16)) if view else 0))
            features[cam] = (patch[0].astype(np.float16), cls[0].astype(np.float16))
            if views > 1:
                features[cam] += (np.stack(patch[1:], 1).astype(np.float16), np.stack(cls[1:], 1).astype(np.float16))
        store.write_unit(unit, features)
    return FeatureStore(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return make_store(tmp_path_factory.mktemp("data") / "f.zarr", num_episodes=8)


def test_incomplete_store_is_refused(tmp_path: Path):
    make_store(tmp_path / "f.zarr", num_episodes=4, complete=False)
    with pytest.raises(StoreError, match=r"incomplete.*1 of \d+ work units.*dinocache extract"):
        open_training_store(tmp_path / "f.zarr")


def test_validation_split_is_by_episode(store: FeatureStore):
    episodes = store.episodes()
    indices = [e[0] for e in episodes]
    split = split_episodes(indices, "0.25")
    assert len(split.val) == 2 and sorted(split.train + split.val) == indices
    train_rows, val_rows = episode_rows(episodes, split.train), episode_rows(episodes, split.val)
    episode_of_row = store.read("episode_index")
    assert not set(episode_of_row[train_rows]) & set(split.val), "a frame of a validation episode is trained on"
    assert set(episode_of_row[val_rows]) == set(split.val)
    assert len(train_rows) + len(val_rows) == store.num_frames and not set(train_rows) & set(val_rows)

    assert split_episodes(indices, "5,2").val == [2, 5]
    assert split_episodes(indices, [7]).val == [7]
    assert split_episodes(indices, "none").val == [] and split_episodes(indices, 0.0).val == []
    assert split_episodes([0], 0.1).val == [], "a single episode cannot be held out"
    with pytest.raises(DinocacheError, match="not in the store"):
        split_episodes(indices, "3,99")
    with pytest.raises(DinocacheError, match="no episode to train on"):
        split_episodes([0, 1], "0,1")


def test_action_window_padding_matches_a_direct_computation(store: FeatureStore):
    data = CachedFeatures(store, chunk_size=10, memory_budget=1 << 30)
    rows = np.arange(store.num_frames)
    batch = data.gather([(data.resident, rows)])
    actions = data.lowdim[ACTION]
    for index, start, length, _ in store.episodes():
        for t in range(start, start + length):
            expected_pad = [t + k >= start + length for k in range(10)]
            expected = [actions[min(t + k, start + length - 1)] for k in range(10)]
            assert batch[ACTION_IS_PAD][t].tolist() == expected_pad, (index, t)
            torch.testing.assert_close(batch[ACTION][t], torch.stack(expected), rtol=0, atol=0)
    # the last frame of an episode: only its own action is real
    end = store.episodes()[0][2] - 1
    assert batch[ACTION_IS_PAD][end].tolist() == [False] + [True] * 9
    windows, is_pad = action_windows(torch.tensor([end]), data.episode_end, 3)
    assert windows.tolist() == [[end, end, end]] and is_pad.tolist() == [[False, True, True]]


def test_batches_are_normalised_and_features_as_stored(store: FeatureStore):
    data = CachedFeatures(store, chunk_size=4, use_cls_token=True, memory_budget=1 << 30)
    rows = np.array([3, 0, 17, 40])
    batch = data.gather([(data.resident, rows)])
    stats = store.stats("observation.state")
    expected_state = (store.read("observation.state")[rows] - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(batch[OBS_STATE].numpy(), expected_state, rtol=1e-5, atol=1e-5)
    grid = batch["features.top"]
    assert grid.shape == (4, 16, 2, 2) and grid.dtype == torch.float16
    np.testing.assert_array_equal(grid.permute(0, 2, 3, 1).numpy(), store.patch("top", rows))
    np.testing.assert_array_equal(batch["cls.wrist"].numpy(), store.cls("wrist", rows))
    assert data.inputs.cameras == [("top", 16, 2, 2), ("wrist", 16, 1, 3)]


@pytest.mark.parametrize("chunk_frames", [None, 8])
def test_sample_order_covers_each_frame_once_per_epoch_and_ranks_are_disjoint(chunk_frames: int | None):
    rows = np.setdiff1d(np.arange(203), np.arange(40, 61))  # a held-out episode in the middle
    orders = [SampleOrder(rows, seed=3, rank=r, world_size=2, chunk_frames=chunk_frames, window_chunks=3) for r in range(2)]
    for epoch in range(2):
        seen = [np.concatenate([piece for _, piece in order.epoch(epoch)]) for order in orders]
        assert not set(seen[0]) & set(seen[1])
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), rows)
    first, second = (np.concatenate([p for _, p in orders[0].epoch(e)]) for e in range(2))
    assert not np.array_equal(first, second), "every epoch is shuffled anew"
    # resuming at a position (here in the second epoch) continues the same stream
    stream = orders[0].pieces(0)
    full = np.concatenate([next(stream)[1] for _ in range(24)])
    resumed = orders[0].pieces(130)
    np.testing.assert_array_equal(np.concatenate([next(resumed)[1] for _ in range(12)])[:100], full[130:230])


def test_streamed_batches_equal_in_memory_ones(store: FeatureStore):
    resident = CachedFeatures(store, chunk_size=6, use_cls_token=True, memory_budget=1 << 30)
    streamed = CachedFeatures(store, chunk_size=6, use_cls_token=True, memory_budget=1, window_frames=24)
    assert resident.in_memory and not streamed.in_memory and streamed.window_chunks == 3
    rows = episode_rows(store.episodes(), [0, 2, 3, 5, 6])
    order = streamed.sample_order(rows, seed=1)
    assert order.chunk_frames == 8
    chunks, _ = next(order.pieces(0))
    assert chunks is not None and len(chunks) == 3, "streamed pieces name the whole chunks to read"
    with streamed.train_batches(order, batch_size=16, position=5) as batches:
        for _ in range(12):
            got = next(batches)
            # the same rows, gathered from the whole store in memory, give identical tensors
            rows_of_batch = _rows_of(got, resident)
            want = resident.gather([(resident.resident, rows_of_batch)])
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    ordered = list(streamed.ordered_batches(rows, 7))
    assert sum(len(b[OBS_STATE]) for b in ordered) == len(rows)
    torch.testing.assert_close(torch.cat([b["features.top"] for b in ordered]),
                               resident.gather([(resident.resident, rows)])["features.top"], rtol=0, atol=0)


def _rows_of(batch: dict[str, torch.Tensor], data: CachedFeatures) -> np.ndarray:
    """Recover store rows from a batch through its state (whose noise column is unique per frame)."""
    matches = (batch[OBS_STATE][:, None, :] == data.lowdim[OBS_STATE][None]).all(-1)
    assert (matches.sum(1) == 1).all()
    return matches.float().argmax(1).numpy()


def test_memory_budget_parsing():
    assert parse_memory_budget("2GiB") == 2 * 2**30
    assert parse_memory_budget("500MB") == 500 * 10**6
    assert parse_memory_budget(1234) == 1234
    half = parse_memory_budget(None)
    assert 0 < half and abs(parse_memory_budget("50%") - half) < 2**28
    assert abs(parse_memory_budget("50%", processes_per_machine=4) * 4 - half) < 2**28
    with pytest.raises(DinocacheError):
        parse_memory_budget("lots")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["on-device", "host"])
def test_batches_on_the_device_equal_host_gathered_ones(store: FeatureStore, device: str, where: str):
    """Features held on the device (batches gathered there from index tensors), or streamed and gathered
    on the host into a reused ring of buffers (pinned, copied on a side stream on CUDA): the training
    device gets exactly the batches a host gather of the sampler's rows gives, in the sampler's order."""
    host = CachedFeatures(store, chunk_size=6, use_cls_token=True, memory_budget=1 << 30)
    held = dict(memory_budget=1 << 30, device_budget=1 << 30) if where == "on-device" else \
        dict(memory_budget=1, window_frames=24, device_budget=0)
    data = CachedFeatures(store, chunk_size=6, use_cls_token=True, device=device, **held)
    assert data.on_device == (where == "on-device")
    if data.on_device:  # loaded straight onto the device: no second copy in RAM
        assert all(table.device.type == device for table in data.resident.tables.values())
    order = data.sample_order(episode_rows(store.episodes(), [0, 2, 3, 5, 6]), seed=1)
    pieces = order.pieces(5)
    expected = np.concatenate([next(pieces)[1] for _ in range(40)])
    with data.train_batches(order, batch_size=16, position=5) as batches:
        for index in range(12):  # twice the ring of host buffers: every one is reused
            got = next(batches)
            assert got is batches.out and got["features.top"].device.type == device
            want = host.gather([(host.resident, expected[16 * index:16 * (index + 1)])])
            for key in want:
                torch.testing.assert_close(got[key].cpu(), want[key], rtol=0, atol=0)


@needs_cuda
def test_features_that_fit_cuda_memory_need_no_room_in_ram(store: FeatureStore):
    """A RAM budget too small for the features does not push them to streaming when the GPU holds them."""
    data = CachedFeatures(store, chunk_size=6, memory_budget=1, device="cuda", device_budget=1 << 30)
    assert data.in_memory and data.on_device and data.resident.tables["features.top"].is_cuda
    host = CachedFeatures(store, chunk_size=6, memory_budget=1 << 30)
    rows = np.arange(store.num_frames)[::3]
    got, want = data.gather([(data.resident, rows)]), host.gather([(host.resident, rows)])
    for key in want:
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_validation_batches_have_one_size_and_mask_their_padding(store: FeatureStore, device: str):
    rows = episode_rows(store.episodes(), [1, 4])
    for held in (dict(memory_budget=1 << 30), dict(memory_budget=1, window_frames=16)):
        data = CachedFeatures(store, chunk_size=6, device=device, **held)
        out = data.batch_buffers(16, device)
        seen = []
        for batch in data.validation_batches(rows, out):
            cpu = {key: value.cpu() for key, value in batch.items()}
            real = ~cpu[ACTION_IS_PAD].all(1)  # a real row's own action is never padding
            assert real[:int(real.sum())].all(), "padding only at the end"
            seen.append(_rows_of(cpu, data)[real.numpy()])
        np.testing.assert_array_equal(np.concatenate(seen), rows)
        assert len(seen) == -(-len(rows) // 16)
