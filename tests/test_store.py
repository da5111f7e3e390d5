"""The feature store on real Zarr v3 folders: layout, checksums, identity, concurrent creation."""

from __future__ import annotations

import json
import os
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from dinocache.errors import StoreError
from dinocache.encoders.record import BackboneRecord
from dinocache.pipeline.store import (DEFAULT_PRECISION, FORMAT_NAME, FORMAT_VERSION, Compression, FeatureStore, StoreLayout,
                                      StoreRecord, create_or_open)


def make_layout(num_frames: int = 40, unit_frames: int = 16, compression: str = "none", **provenance) -> StoreLayout:
    """A two-camera layout; ``provenance`` overrides attributes, spelled as the store writes them."""
    rng = np.random.default_rng(0)
    lengths = [15, 25]
    record = StoreRecord.from_dict({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "num_frames": num_frames, "cameras": ["top", "wrist"],
        "unit_frames": unit_frames, "chunk_frames": 8, "compression": compression,
        "backbone": {"name": "dinov2_vits14"}, "weights": {"source": "random", "seed": 0},
        "source": {"format": "lerobot-v2.1", "fingerprint": "abc"}, "preprocess": {"image_size": [28, 42]},
        "episodes_selected": [0, 1], "precision": "fp32", **provenance,
    })
    return StoreLayout(
        record=record,
        grids={"top": (2, 3, 8), "wrist": (2, 3, 8)},
        lowdim={"action": rng.normal(size=(num_frames, 3)), "observation.state": rng.normal(size=(num_frames, 5))},
        episode_index=np.repeat([0, 1], lengths),
        frame_index=np.concatenate([np.arange(n) for n in lengths]),
        timestamp=np.concatenate([np.arange(n) / 30 for n in lengths]),
        episodes=[(0, 0, 15, "pick"), (1, 15, 25, "place")],
    )


def test_records_read_back_what_they_write_and_what_older_stores_wrote():
    """The typed records round-trip through JSON unchanged; attributes an older store wrote (the
    backbone as a bare name, no precision, sizes or names) read as their defaults, and keys this
    version does not know are kept and written back."""
    record = make_layout().record
    assert StoreRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert BackboneRecord.from_dict(json.loads(json.dumps(record.backbone.to_dict()))) == record.backbone
    older = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dinocache_version": "0.1.0", "num_frames": 40,
             "dtype": "float16", "chunk_frames": 8, "unit_frames": 16, "cameras": ["top"], "backbone": "dinov2_vits14",
             "weights": {"source": "random", "seed": 0}, "weights_path": None, "preprocess": {"image_size": [28, 42]},
             "source": {"format": "lerobot-v2.1", "fingerprint": "abc"}, "from_the_future": 1}
    old = StoreRecord.from_dict(older)
    assert old.backbone.name == "dinov2_vits14" and old.backbone.weights.seed == 0 and old.cameras == ("top",)
    assert (old.compression, old.precision, old.fps, old.camera_sizes, old.source_path) == ("none", DEFAULT_PRECISION,
                                                                                          None, {}, None)
    assert old.extra == {"from_the_future": 1} and old.to_dict()["from_the_future"] == 1
    with pytest.raises(StoreError, match="format version 99"):
        StoreRecord.from_dict({**older, "format_version": 99})


def unit_features(store: FeatureStore, unit: int, seed: int = 1) -> dict:
    start, stop = store.unit_range(unit)
    rng = np.random.default_rng(seed + unit)
    return {cam: (rng.normal(size=(stop - start, 2, 3, 8)).astype("float16"),
                  rng.normal(size=(stop - start, 8)).astype("float16")) for cam in store.cameras}


def test_layout_roundtrip_and_exact_stats(tmp_path: Path):
    layout = make_layout()
    store = create_or_open(tmp_path / "f.zarr", layout)
    assert store.num_units == 3 and not store.done_units().any()
    assert np.isnan(store.patch("top", slice(0, 40))).all(), "unwritten frames must read as NaN"
    written = {u: unit_features(store, u) for u in range(3)}
    for unit, feats in written.items():
        store.write_unit(unit, feats)
    assert store.done_units().all()
    reopened = FeatureStore(tmp_path / "f.zarr")
    np.testing.assert_array_equal(reopened.patch("wrist", slice(32, 40)), written[2]["wrist"][0])
    np.testing.assert_array_equal(reopened.cls("top", slice(0, 16)), written[0]["top"][1])
    stats = reopened.stats("action")
    np.testing.assert_allclose(stats["mean"], layout.lowdim["action"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], layout.lowdim["action"].std(0), rtol=1e-5)
    assert reopened.episodes() == [(0, 0, 15, "pick"), (1, 15, 25, "place")]
    assert reopened.lowdim_keys == ["action", "observation.state"]
    # a unit is exactly one shard: one file per camera array per unit
    assert len(list((tmp_path / "f.zarr/cameras/top/patch/c").rglob("*"))) - \
        len([p for p in (tmp_path / "f.zarr/cameras/top/patch/c").rglob("*") if p.is_dir()]) == 3


def test_flipped_byte_is_detected_naming_the_array(tmp_path: Path):
    store = create_or_open(tmp_path / "f.zarr", make_layout())
    store.write_unit(0, unit_features(store, 0))
    shard = next(p for p in (tmp_path / "f.zarr/cameras/top/patch/c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="cameras/top/patch"):
        FeatureStore(tmp_path / "f.zarr").patch("top", slice(0, 16))
    # the other camera is untouched and still reads
    FeatureStore(tmp_path / "f.zarr").patch("wrist", slice(0, 16))


def test_different_identity_is_refused_with_both_values(tmp_path: Path):
    create_or_open(tmp_path / "f.zarr", make_layout())
    other = make_layout(backbone={"name": "dinov3_vits16"})
    with pytest.raises(StoreError) as err:
        create_or_open(tmp_path / "f.zarr", other)
    assert "dinov2_vits14" in str(err.value) and "dinov3_vits16" in str(err.value) and "--overwrite" in str(err.value)
    store = create_or_open(tmp_path / "f.zarr", other, overwrite=True)
    assert store.record.to_dict()["backbone"]["name"] == "dinov3_vits16"


def test_not_a_store_and_future_version_are_refused(tmp_path: Path):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore(tmp_path)
    store = create_or_open(tmp_path / "f.zarr", make_layout())
    meta = dict(store.root.attrs["dinocache"], format_version=99)
    store.root.attrs["dinocache"] = meta
    with pytest.raises(StoreError, match="format version 99"):
        FeatureStore(tmp_path / "f.zarr")


@pytest.mark.parametrize("compression", ["zstd", "bitround:7"])
def test_compression_choices_roundtrip(tmp_path: Path, compression: str):
    store = create_or_open(tmp_path / "f.zarr", make_layout(compression=compression))
    feats = unit_features(store, 0)
    store.write_unit(0, feats)
    got = store.patch("top", slice(0, 16)).astype(np.float32)
    want = feats["top"][0].astype(np.float32)
    if compression == "zstd":
        np.testing.assert_array_equal(got, want)
    else:
        rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
        assert 0 < rel.max() < 2 ** -7


def test_bad_compression_is_refused():
    with pytest.raises(StoreError, match="bitround"):
        Compression.parse("bitround:99")
    with pytest.raises(StoreError, match="lz5"):
        Compression.parse("lz5")


def _create(path: str, barrier) -> str:
    barrier.wait()
    return str(create_or_open(path, make_layout()).path)


def test_concurrent_creation_yields_one_store(tmp_path: Path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        paths = pool.starmap(_create, [(str(tmp_path / "f.zarr"), barrier)] * 3)
    assert len(set(paths)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".f.zarr.creating")]
    assert FeatureStore(tmp_path / "f.zarr").num_units == 3


def test_a_creation_killed_midway_is_swept_by_the_next_one(tmp_path: Path):
    """A SIGKILLed creation leaves its hidden folder; the next creation deletes those of this host
    whose process is gone and in which nothing was written for ABANDONED_AFTER_S, and leaves alone a
    running process's (however old), a recent one's, and another host's."""
    import signal
    import socket
    import subprocess
    import sys

    from dinocache.pipeline.store import ABANDONED_AFTER_S

    script = ("import sys, time\nsys.path[:0] = [{tests!r}]\nfrom test_store import make_layout\n"
              "from dinocache.pipeline import store\n"
              "def build(root, layout):\n    time.sleep(600)\n"
              "store._build = build\nstore.create_or_open({out!r}, make_layout())\n")
    out = tmp_path / "f.zarr"
    code = script.format(tests=str(Path(__file__).parent), out=str(out))
    killed, recent, running = (subprocess.Popen([sys.executable, "-c", code]) for _ in range(3))
    host = socket.gethostname()
    try:
        folders = {proc: tmp_path / f".f.zarr.creating-{host}-{proc.pid}" for proc in (killed, recent, running)}
        deadline = time.monotonic() + 60
        while not all(f.exists() for f in folders.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(f.exists() for f in folders.values())
        for proc in (killed, recent):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        old = time.time() - ABANDONED_AFTER_S - 60
        for proc in (killed, running):
            for item in [folders[proc], *folders[proc].rglob("*")]:
                os.utime(item, (old, old))
        elsewhere = tmp_path / ".f.zarr.creating-another-host-1"
        elsewhere.mkdir()
        os.utime(elsewhere, (old, old))
        create_or_open(out, make_layout())
        assert not folders[killed].exists()
        assert folders[recent].exists() and folders[running].exists() and elsewhere.exists()
    finally:
        running.kill()
        running.wait()
