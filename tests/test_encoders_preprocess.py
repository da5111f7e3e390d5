"""Preprocessing: one tensor whatever the frame layout, exact normalisation, size rules, round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dinocache.encoders.resample import axis_taps, resample
from dinocache.encoders.preprocess import ImagePreprocessor, PreprocessConfig, parse_image_size
from dinocache.encoders.lookup import get_backbone_spec
from dinocache.errors import BackboneError


def _frames(batch: int = 2, height: int = 60, width: int = 90, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("center_crop", [False, True])
def test_same_tensor_whatever_the_layout(center_crop):
    config = PreprocessConfig.for_backbone(get_backbone_spec("dinov2_vits14"), (56, 84), center_crop)
    preprocess = ImagePreprocessor(config)
    hwc = _frames()
    chw = hwc.permute(0, 3, 1, 2).contiguous()
    reference = preprocess(hwc)
    assert reference.shape == (2, 3, 56, 84) and reference.dtype == torch.float32
    assert torch.equal(preprocess(chw), reference)
    for i in range(2):
        assert torch.equal(preprocess(hwc[i]), reference[i:i + 1])
        assert torch.equal(preprocess(chw[i]), reference[i:i + 1])


def test_normalisation_is_exact_without_resize():
    spec = get_backbone_spec("dinov3_vitl16_sat")
    preprocess = ImagePreprocessor(PreprocessConfig.for_backbone(spec, 32))
    frame = torch.full((32, 32, 3), 200, dtype=torch.uint8)
    frame[..., 1] = 10
    out = preprocess(frame)[0, :, 0, 0]
    expected = (torch.tensor([200.0, 10.0, 200.0]) / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_center_crop_keeps_the_middle_and_resize_keeps_everything():
    """A 64x128 frame, white but for black 16-px side bands: the square crop (the middle 64x64,
    minus the resampling footprint) sees only white; a plain resize keeps the bands."""
    frame = torch.zeros(64, 128, 3, dtype=torch.uint8)
    frame[:, 16:112] = 255
    spec = get_backbone_spec("dinov2_vits14")
    white = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    cropped = ImagePreprocessor(PreprocessConfig.for_backbone(spec, 28, center_crop=True))(frame)
    torch.testing.assert_close(cropped[0].amax(dim=(1, 2)), white)
    torch.testing.assert_close(cropped[0].amin(dim=(1, 2)), white)
    squashed = ImagePreprocessor(PreprocessConfig.for_backbone(spec, 28))(frame)
    assert (squashed[0, :, :, 0] < 0).all()  # the black left edge survives a plain resize


def test_non_multiple_size_names_the_nearest_valid_sizes():
    spec = get_backbone_spec("dinov2_vits14")
    with pytest.raises(BackboneError) as info:
        PreprocessConfig.for_backbone(spec, 230)
    assert str(info.value) == ("230 is not a multiple of the patch size 14 of dinov2_vits14; "
                               "nearest valid sizes: 224 or 238")
    with pytest.raises(BackboneError, match=r"224x320: width 320 .* 308 or 322"):
        PreprocessConfig.for_backbone(spec, "224x320")
    with pytest.raises(BackboneError, match="nearest valid sizes: 32$"):
        PreprocessConfig.for_backbone(get_backbone_spec("resnet18"), 20)


def test_round_trip_through_json():
    config = PreprocessConfig.for_backbone(get_backbone_spec("dinov3_vits16"), "224x320", True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"image_size": [224, 320], "patch_size": 16, "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "center_crop": True, "interpolation": "bilinear",
                    "antialias": True}
    assert PreprocessConfig.from_dict(data) == config
    with pytest.raises(BackboneError, match="unknown keys"):
        PreprocessConfig.from_dict({**data, "resize": 256})


def test_default_size_and_parsing():
    assert PreprocessConfig.for_backbone(get_backbone_spec("resnet18")).image_size == (224, 224)
    assert parse_image_size("224x320") == (224, 320) == parse_image_size((224, 320))
    assert parse_image_size(448) == (448, 448) == parse_image_size("448")
    for bad in ("224x", "0", (224,), 22.4):
        with pytest.raises(BackboneError):
            parse_image_size(bad)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 32, 32, 3), "must be uint8"),
    (torch.zeros(32, 32, dtype=torch.uint8), "got shape"),
    (torch.zeros(1, 4, 32, 32, dtype=torch.uint8), "no RGB axis"),
])
def test_bad_frames_are_refused(bad, message):
    preprocess = ImagePreprocessor(PreprocessConfig.for_backbone(get_backbone_spec("resnet18"), 32))
    with pytest.raises(BackboneError, match=message):
        preprocess(bad)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(("n_in", "n_out"), [(480, 224), (640, 56), (100, 224), (60, 56), (7, 7)])
def test_axis_taps_are_interpolates_own_weights(interpolation, antialias, n_in, n_out):
    """The band of taps reproduces F.interpolate along one axis, shrinking and enlarging alike."""
    rows = axis_taps(n_in, n_out, interpolation, antialias)
    identity = axis_taps(5, 5, interpolation, antialias)
    x = torch.rand(2, 3, n_in, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(1)) * 255
    expected = F.interpolate(x, size=(n_out, 5), mode=interpolation, align_corners=False, antialias=antialias)
    torch.testing.assert_close(resample(x, rows, identity), expected, rtol=0, atol=1e-3)
    assert rows.index.shape == rows.weight.shape and rows.index.shape[0] == n_out
    assert rows.index.shape[1] < n_in or n_in <= 8  # a band, not the dense matrix


@pytest.mark.parametrize("center_crop", [False, True])
@pytest.mark.parametrize("size", [(56, 84), (70, 70)])
def test_exported_preprocessing_resizes_without_a_resize_op(center_crop, size):
    """Traced, the resize is gathers and sums (AOTInductor has no C shim for the antialiased resize, and
    TensorRT no antialiased Resize) that give what eager F.interpolate gives, batch size left free."""
    config = PreprocessConfig.for_backbone(get_backbone_spec("dinov2_vits14"), size, center_crop)
    frames = _frames(batch=3, height=60, width=90)
    # The refusal on a module of its own: an export that raised leaves torch <= 2.11's buffer hook on
    # its module, and a buffer registered there afterwards would fail inside torch.
    with pytest.raises(BackboneError, match="60x90 frames without their resize taps: call prepare_export"):
        torch.export.export(ImagePreprocessor(config), (frames,))
    preprocess = ImagePreprocessor(config)
    preprocess.prepare_export(frames)
    assert preprocess.state_dict() == {}  # the taps are derived, never saved with weights
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(preprocess, (frames,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "upsample" in t or "interpolate" in t], targets
    more = _frames(batch=5, height=60, width=90, seed=3)
    torch.testing.assert_close(program.module()(more), preprocess(more), rtol=0, atol=1e-4)
