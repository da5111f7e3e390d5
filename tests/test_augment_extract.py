"""Augmented views at extraction (``extract --views K --augment RECIPE``) on real generated videos and
real stores: recipes, the transforms, view 0 against a store of one view, provenance and `inspect`,
and a kill, a rerun and shards, byte for byte."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dinocache.datasets import open_dataset
from dinocache.datasets.synthetic import write_synthetic_dataset
from dinocache.encoders.augment import ViewAugmenter, augment_frame, draw_transforms, frame_seed
from dinocache.encoders.augment_recipe import PRESETS, TRANSFORMS, AugmentRecipe, parse_recipe
from dinocache.encoders.backbone import create_backbone
from dinocache.errors import DinocacheError, StoreError
from dinocache.pipeline.extract import ExtractConfig, extract
from dinocache.pipeline.store import FORMAT_VERSION, VIEWS_FORMAT_VERSION, FeatureStore, StoreRecord

sys.path.insert(0, str(Path(__file__).parent))
from test_extract import BACKBONE, SIZE, _kill_midway, cli, config, extract_args, store_files  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# --- recipes -----------------------------------------------------------------------------------------

def test_presets_are_lerobots_names_and_ranges_and_a_file_fills_in_defaults(tmp_path: Path):
    lerobot = parse_recipe("lerobot", seed=7)
    assert list(lerobot.transforms) == ["brightness", "contrast", "saturation", "hue", "sharpness", "affine"]
    assert lerobot.max_num_transforms == 3 and not lerobot.random_order and lerobot.seed == 7
    assert lerobot.transforms["saturation"] == {"weight": 1.0, "range": [0.5, 1.5]}
    assert lerobot.transforms["affine"] == {"weight": 1.0, "degrees": [-5.0, 5.0], "translate": [0.05, 0.05]}
    assert parse_recipe(None) == parse_recipe("lerobot")  # the default preset
    assert set(PRESETS["all"]["transforms"]) == set(TRANSFORMS) - {"affine"}

    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"transforms": {"crop": {"scale": [0.6, 0.9]}, "hue": {}}, "random_order": True}))
    mine = parse_recipe(str(recipe), seed=2)
    assert mine.name == "mine" and mine.max_num_transforms == 2 and mine.random_order and mine.seed == 2
    assert mine.transforms == {"crop": {"weight": 1.0, "scale": [0.6, 0.9]}, "hue": {"weight": 1.0, "range": [-0.05, 0.05]}}
    assert AugmentRecipe.from_dict(mine.to_dict()) == mine  # what a store records reads back as the same recipe


@pytest.mark.parametrize("content, message", [
    ({"transforms": {"blur": {}}}, r"mine\.json: unknown transform 'blur'; known: brightness"),
    ({"transforms": {"contrast": {"range": [1.2, 0.8]}}}, r"mine\.json: contrast\.range \[1\.2, 0\.8\] must be low <= high"),
    ({"transforms": {"shift": {"pixels": 4}}}, r"mine\.json: transform 'shift' has no parameter\(s\) \['pixels'\]"),
    ({"transforms": {"hue": {}}, "max_num_transforms": 2}, r"max_num_transforms 2 must be a whole number from 1 to the 1"),
    ({"transform": {}}, r"mine\.json: unknown recipe field\(s\) \['transform'\]"),
])
def test_a_bad_recipe_file_is_one_line_naming_the_file_and_the_field(tmp_path: Path, content, message):
    (tmp_path / "mine.json").write_text(json.dumps(content))
    with pytest.raises(DinocacheError, match=message):
        parse_recipe(str(tmp_path / "mine.json"))


def test_views_options_are_checked_before_any_work(small_dataset: Path, tmp_path: Path):
    with pytest.raises(DinocacheError, match="--augment drq: augmented views need --views 2 or more"):
        ExtractConfig(dataset=small_dataset, out=tmp_path / "f.zarr", augment="drq")
    result = cli(*extract_args(small_dataset, tmp_path / "f.zarr", "--views", "3", "--augment", "strong"))
    assert result.exit_code != 0 and "--augment 'strong': neither a preset (lerobot, drq, all) nor a recipe file" in \
        result.output and not (tmp_path / "f.zarr").exists()


# --- the transforms ------------------------------------------------------------------------------------

def test_a_views_draw_depends_on_its_frame_view_and_camera_only_not_its_batch():
    """Views 1..K-1 of a frame are the same whether the frame came in a batch of one or of four, and
    other for another row, view, camera or seed: what lets batches, shards and reruns agree."""
    recipe = parse_recipe("all", seed=5)
    frames = torch.randint(0, 256, (4, 24, 32, 3), dtype=torch.uint8)
    augmenter = ViewAugmenter(recipe, views=3)
    batched = augmenter(frames, "top", range(10, 14))
    alone = [augmenter(frames[i:i + 1], "top", [10 + i]) for i in range(4)]
    assert len(batched) == 2 and all(view.shape == frames.shape and view.dtype == torch.uint8 for view in batched)
    for v in range(2):
        assert torch.equal(batched[v], torch.cat([one[v] for one in alone]))
    assert not torch.equal(batched[0], batched[1]) and not torch.equal(batched[0], frames)
    other_camera = augmenter(frames, "wrist", range(10, 14))
    other_seed = ViewAugmenter(parse_recipe("all", seed=6), views=3)(frames, "top", range(10, 14))
    assert not torch.equal(other_camera[0], batched[0]) and not torch.equal(other_seed[0], batched[0])


def test_the_shift_is_drqs_edge_replicated_shift_and_the_colours_are_torchvisions():
    recipe = parse_recipe("drq")
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    seed = frame_seed(0, 3, 1, "top")
    [(name, params)] = draw_transforms(recipe, torch.Generator().manual_seed(seed), 40, 60)
    assert name == "shift" and params["pad"] == [3, 2]  # 5 % of 60 and of 40 pixels
    padded = np.pad(image.numpy(), ((0, 0), (2, 2), (3, 3)), mode="edge")
    top, left = 2 + params["dy"], 3 + params["dx"]
    np.testing.assert_array_equal(augment_frame(image, recipe, seed).numpy(), padded[:, top:top + 40, left:left + 60])

    colour = AugmentRecipe.from_dict({"transforms": {"brightness": {"range": [1.3, 1.3]}}})
    assert torch.equal(augment_frame(image, colour, seed), TF.adjust_brightness(image, 1.3))


# --- stores with views ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores(small_dataset: Path, tmp_path_factory) -> dict[int, Path]:
    """The two-camera dataset extracted once with one view and once with four (batches of 3, so that a
    batch straddles neither units nor cameras evenly)."""
    torch.set_num_threads(1)  # a module fixture runs before the one_thread fixture: tiny models run best on one
    root = tmp_path_factory.mktemp("views")
    out = {}
    for views in (1, 4):
        out[views] = root / f"k{views}.zarr"
        extract(config(small_dataset, out[views], batch_size=3, views=views))
    return out


def test_view_0_of_a_k4_store_is_a_k1_store_array_for_array(stores: dict[int, Path]):
    one, four = FeatureStore(stores[1]), FeatureStore(stores[4])
    extra = set(four.array_names()) - set(one.array_names())
    assert extra == {f"cameras/{c}/views/{p}" for c in one.cameras for p in ("patch", "cls")}
    for name in one.array_names():
        if name == "units/digest":  # bound to the store's identity, which records its views
            continue
        np.testing.assert_array_equal(four.read(name), one.read(name), err_msg=name, strict=True)
    # a store of one view is what dinocache has always written: version 1, no view keys anywhere
    root = json.loads((stores[1] / "zarr.json").read_text())["attributes"]["dinocache"]
    assert root["format_version"] == FORMAT_VERSION and "views" not in root and "augment" not in root
    assert four.record.format_version == VIEWS_FORMAT_VERSION and four.views == 4
    assert four.record.augment == parse_recipe("lerobot").to_dict()
    for camera in four.cameras:
        views = four.view_features(f"cameras/{camera}/patch", 0, four.num_frames).astype(np.float32)
        assert views.shape[1] == 4 and not np.isnan(views).any()
        for a in range(4):
            for b in range(a):
                assert np.abs(views[:, a] - views[:, b]).mean() > 1e-3, (camera, a, b)


def test_augmented_views_are_the_backbone_on_the_augmented_frames(stores: dict[int, Path], small_dataset: Path):
    """Views 1..3 are the backbone's features of the decoded frames through the recipe, applied
    before the preprocessing (to float16 rounding)."""
    store = FeatureStore(stores[4])
    backbone = create_backbone(BACKBONE, weights="random", image_size=int(SIZE), seed=0)
    augmenter = ViewAugmenter(AugmentRecipe.from_dict(store.record.augment), store.views)
    source = open_dataset(small_dataset)
    index, start, length, _ = store.episodes()[1]
    camera = store.cameras[1]
    frames = torch.from_numpy(source.read_frames(index, camera))
    with torch.no_grad():
        for view, images in enumerate(augmenter(frames, camera, range(start, start + length)), start=1):
            grid, cls = backbone(images)
            np.testing.assert_allclose(store.read(f"cameras/{camera}/views/patch", slice(start, start + length))[:, view - 1]
                                       .astype(np.float32), grid.permute(0, 2, 3, 1).numpy(), rtol=4e-3, atol=4e-3)
            np.testing.assert_allclose(store.read(f"cameras/{camera}/views/cls", slice(start, start + length))[:, view - 1]
                                       .astype(np.float32), cls.numpy(), rtol=4e-3, atol=4e-3)


def test_inspect_shows_the_recipe_its_seed_and_the_k_times_size(stores: dict[int, Path]):
    result = cli("inspect", str(stores[4]))
    assert result.exit_code == 0, result.output
    assert "(format dinocache-features v2," in result.output
    assert "views       4 per frame: view 0 the clean frame, views 1-3 augmented by lerobot (seed 0): 3 of [brightness" \
        in result.output
    assert '"seed": 0' in result.output and "views (42, 3, ...)" in result.output
    one_view = 42 * 2 * (4 * 4 * 384 + 384) * 2  # frames x cameras x (patch grid + CLS) x float16
    assert f"features    {4 * one_view / 2**20:.1f} MiB in memory = 4 views x {one_view / 2**20:.1f} MiB" in result.output
    assert "every array reads and every frame is written" in result.output
    plain = cli("inspect", str(stores[1]))
    line = next(line for line in plain.output.splitlines() if line.startswith("features "))
    assert plain.exit_code == 0 and "views" not in line and "\nviews " not in plain.output


def test_an_augmented_view_lost_is_found_by_inspect_and_redone_by_extract(stores: dict[int, Path], small_dataset: Path,
                                                                          tmp_path: Path):
    """The views arrays are part of every unit: their shard files carry digests like view 0's."""
    out = tmp_path / "k4.zarr"
    shutil.copytree(stores[4], out)
    camera = FeatureStore(out).cameras[0]
    (out / "cameras" / camera / "views" / "patch" / "c" / "2" / "0" / "0" / "0" / "0").unlink()
    inspected = cli("inspect", str(out))
    assert inspected.exit_code == 1 and f"cameras/{camera}/views/patch/c/2/0/0/0/0 is missing" in inspected.output
    rerun = extract(config(small_dataset, out, batch_size=3, views=4))
    assert rerun.units == 1
    assert store_files(out) == store_files(stores[4])


def test_a_store_of_other_views_or_another_recipe_is_refused(stores: dict[int, Path], small_dataset: Path):
    with pytest.raises(StoreError, match=r"built differently \(views: store has 4, asked for 1; augment: store has "):
        extract(config(small_dataset, stores[4], batch_size=3))
    with pytest.raises(StoreError, match=r"augment\.seed: store has 0, asked for 1"):
        extract(config(small_dataset, stores[4], batch_size=3, views=4, augment_seed=1))
    with pytest.raises(StoreError, match=r"views: store has 1, asked for 2"):
        extract(config(small_dataset, stores[1], batch_size=3, views=2))


def test_a_version_2_record_is_a_record_with_views():
    base = {"format": "dinocache-features", "num_frames": 4, "cameras": ["top"], "backbone": {"name": "dinov2_vits14"}}
    with pytest.raises(StoreError, match="format version 2 without augmented views"):
        StoreRecord.from_dict({**base, "format_version": 2})
    with pytest.raises(StoreError, match="format version 1 with augmented views"):
        StoreRecord.from_dict({**base, "format_version": 1, "views": 2, "augment": parse_recipe("drq").to_dict()})
    with pytest.raises(StoreError, match="it reads versions 1 and 2"):
        StoreRecord.from_dict({**base, "format_version": 3})


# --- resumable, shardable, identical ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def views_dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("views_long") / "data", format="lerobot-v2.1",
                                   num_episodes=3, episode_length=24, image_size=(48, 64), cameras=("top",), seed=4)


def test_kill_rerun_and_shards_give_the_uninterrupted_stores_bytes(views_dataset: Path, tmp_path: Path):
    """Every transform of the "all" recipe, two views: killed part-way and rerun, or made by two shards,
    the store is byte for byte the uninterrupted single-process one."""
    options = ("--views", "2", "--augment", "all", "--augment-seed", "3")
    clean = tmp_path / "clean.zarr"
    assert cli(*extract_args(views_dataset, clean, *options, "--decode-workers", "1")).exit_code == 0
    reference = store_files(clean)

    resumed = tmp_path / "resumed.zarr"
    _kill_midway(extract_args(views_dataset, resumed, *options), resumed, at_least=2)
    done = FeatureStore(resumed).done_units()
    assert 0 < done.sum() < len(done), "the kill must land part-way"
    rerun = cli(*extract_args(views_dataset, resumed, *options))
    assert rerun.exit_code == 0 and f"({int(done.sum())} already done)" in rerun.output, rerun.output
    assert store_files(resumed) == reference

    sharded = tmp_path / "sharded.zarr"
    for k in (1, 0):
        assert cli(*extract_args(views_dataset, sharded, *options, "--shard", f"{k}/2")).exit_code == 0
    assert store_files(sharded) == reference


def test_a_head_trained_on_views_exports_checked_against_view_0(stores: dict[int, Path], tmp_path: Path):
    """Export is unchanged: the fused policy computes features from the raw frames, which the export's
    check compares with the head on view 0 of the cache (an augmented view would fail it)."""
    from dinocache.policy.deployment.fused import build_fused_policy
    from dinocache.policy.deployment.parity import check_run
    from dinocache.policy.training.train import TrainConfig, train
    from test_train import TINY

    train(TrainConfig(store=stores[4], out=tmp_path / "run", steps=6, batch_size=8, act=TINY, val_episodes="none",
                      log_every=3, progress=False, grid_shift=1))
    report, *_ = check_run(build_fused_policy(tmp_path / "run"))
    assert report.passed and report.frames == 8 and report.origin.startswith("dataset"), report.format()
