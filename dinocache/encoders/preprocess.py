"""The one image preprocessing path: camera frame (uint8) -> normalised backbone input (float32).

Extraction (stage one) and the exported live policy (stage three) both run *this* module, so the
features a head is trained on and the features it sees on the robot come from identical pixels.
That rules out PIL / torchvision transforms on one side and tensor code on the other: everything
here is plain torch on tensors, branches only on static facts (ndim, the size of the channel axis,
image height/width), and therefore traces under ``torch.export`` and exports to ONNX. Traced, the
resize is written as gathers and weighted sums with PyTorch's own weights
(:mod:`dinocache.encoders.resample`), so compiled and ONNX policies need no resize op of their own.

The configuration is recorded in the feature store (``PreprocessConfig.to_dict``) so a later stage
can rebuild the very same preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dinocache.encoders.image_size import ImageSize, check_image_size, parse_image_size
from dinocache.encoders.resample import AxisTaps, axis_taps, resample
from dinocache.errors import BackboneError

if TYPE_CHECKING:
    from dinocache.encoders.registry import BackboneSpec

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class PreprocessConfig:
    """How frames become backbone input; JSON-able via :meth:`to_dict`.

    ``image_size`` is the (H, W) fed to the backbone. ``center_crop=False`` resizes the frame to it
    (aspect ratio may change, nothing is lost); ``center_crop=True`` scales the frame until it
    covers (H, W) -- for a square target that is "resize the shorter side" -- and crops the centre.
    Resizing is ``interpolation`` ('bilinear' | 'bicubic') with ``antialias`` (what PIL does when
    downscaling; without it small objects alias badly at 224 px from 480x640 cameras).
    """

    image_size: tuple[int, int]
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: bool = False
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        # Normalise list inputs (e.g. from JSON) to tuples so configs compare and hash equal.
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BackboneError(
                f"preprocess mean/std must be 3 values each, std > 0: {self.mean} / {self.std}")
        if not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise BackboneError(f"patch size must be a positive integer, got {self.patch_size!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise BackboneError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        check_image_size(self.image_size, self.patch_size)

    @classmethod
    def for_backbone(cls, spec: BackboneSpec, image_size: ImageSize | None = None,
                     center_crop: bool = False) -> PreprocessConfig:
        """The config for ``spec`` at ``image_size`` (default: the spec's default size)."""
        size = parse_image_size(spec.default_image_size if image_size is None else image_size)
        check_image_size(size, spec.patch_size, spec.name)
        return cls(image_size=size, patch_size=spec.patch_size, mean=spec.mean, std=spec.std,
                   center_crop=center_crop)

    def describe(self) -> str:
        """What this preprocessing does, in one line, for people wiring a deployed graph (ONNX metadata)."""
        h, w = self.image_size
        fit = (f"scale to cover {h}x{w} and crop the centre" if self.center_crop
               else f"resize to {h}x{w}")
        mean = ", ".join(f"{v:.4g}" for v in self.mean)
        std = ", ".join(f"{v:.4g}" for v in self.std)
        return (f"uint8 RGB frames (B, H, W, 3) at the camera's native size -> {fit} ({self.interpolation}"
                f"{', antialiased' if self.antialias else ''}) -> scale to [0, 1] -> subtract mean ({mean}), "
                f"divide by std ({std})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (lists, not tuples), as recorded in the feature store."""
        data = asdict(self)
        for key in ("image_size", "mean", "std"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {"image_size", "patch_size", "mean", "std", "center_crop", "interpolation", "antialias"}
        unknown = sorted(set(data) - known)
        missing = sorted({"image_size", "patch_size", "mean", "std"} - set(data))
        if unknown or missing:
            raise BackboneError(
                f"preprocess config has unknown keys {unknown} / missing keys {missing}")
        return cls(**data)


class ImagePreprocessor(nn.Module):
    """uint8 frames -> float32 ``(B, 3, H, W)`` normalised with the backbone's mean/std.

    Accepts ``(B, H, W, 3)``, ``(B, 3, H, W)``, ``(H, W, 3)`` or ``(3, H, W)``; a 3-d input is one
    image and comes back with a batch axis of 1. The layout is read from where the size-3 axis is:
    channels-last when the last axis has size 3, otherwise channels-first when the axis after the
    batch has size 3. Ambiguity rule: an input whose last axis *and* channel-first axis both have
    size 3 (a 3-pixel-wide CHW image) is read as channels-last, since camera frames arrive HWC.
    Every branch depends only on static shapes, so the module exports with ``torch.export``/ONNX,
    once :meth:`prepare_export` has seen the frame size it will be exported for.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__()
        self.config = config
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x/255 normalised = x * scale - shift; buffers follow .to(device) and are not weights.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def prepare_export(self, images: torch.Tensor) -> None:
        """Get ready to be traced on frames shaped like ``images``: the resize's taps for their size,
        computed here (a trace cannot compute them) and kept as buffers, which follow ``.to(device)``."""
        in_h, in_w = (int(n) for n in self._to_batched_chw(images).shape[-2:])
        size = self._resize_size(in_h, in_w)
        if size == (in_h, in_w) or hasattr(self, self._taps_name(in_h, in_w, "rows_index")):
            return
        for axis, (n_in, n_out) in (("rows", (in_h, size[0])), ("cols", (in_w, size[1]))):
            taps = axis_taps(n_in, n_out, self.config.interpolation, self.config.antialias, images.device)
            self.register_buffer(self._taps_name(in_h, in_w, f"{axis}_index"), taps.index, persistent=False)
            self.register_buffer(self._taps_name(in_h, in_w, f"{axis}_weight"), taps.weight, persistent=False)

    @staticmethod
    def _taps_name(in_h: int, in_w: int, what: str) -> str:
        return f"taps_{in_h}x{in_w}_{what}"

    def _taps(self, in_h: int, in_w: int, axis: str) -> AxisTaps:
        try:
            return AxisTaps(getattr(self, self._taps_name(in_h, in_w, f"{axis}_index")),
                            getattr(self, self._taps_name(in_h, in_w, f"{axis}_weight")))
        except AttributeError:
            raise BackboneError(f"preprocessing is being exported for {in_h}x{in_w} frames without their resize "
                                "taps: call prepare_export() with such frames before tracing") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._to_batched_chw(images).float()
        x = self._resize(x)
        return (x * self.scale - self.shift).contiguous()

    @staticmethod
    def _to_batched_chw(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            how = ("convert float frames in [0, 1] with (x * 255).round().to(torch.uint8)" if images.is_floating_point()
                   else "cast integer frames holding 0-255 with x.to(torch.uint8) (check the range first: "
                        "16-bit or raw sensor values must be scaled)")
            raise BackboneError(f"images must be uint8 (0-255), got {images.dtype}; {how}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        elif images.ndim != 4:
            raise BackboneError(
                f"images must be (H,W,3), (3,H,W), (B,H,W,3) or (B,3,H,W), got shape {tuple(images.shape)}")
        if images.shape[-1] == 3:
            return images.permute(0, 3, 1, 2)
        if images.shape[1] == 3:
            return images
        raise BackboneError(f"images have no RGB axis of size 3: shape {tuple(images.shape)}")

    def _resize_size(self, in_h: int, in_w: int) -> tuple[int, int]:
        """The size a frame is resized to: the target, or with ``center_crop`` what covers it."""
        out_h, out_w = self.config.image_size
        if not self.config.center_crop:
            return out_h, out_w
        scale = max(out_h / in_h, out_w / in_w)
        return max(out_h, round(in_h * scale)), max(out_w, round(in_w * scale))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out_h, out_w = cfg.image_size
        in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
        size = self._resize_size(in_h, in_w)
        if size != (in_h, in_w) and torch.compiler.is_exporting():
            x = resample(x, self._taps(in_h, in_w, "rows"), self._taps(in_h, in_w, "cols"))
        elif size != (in_h, in_w):
            x = F.interpolate(x, size=size, mode=cfg.interpolation, align_corners=False,
                              antialias=cfg.antialias)
        if size != (out_h, out_w):
            top, left = (size[0] - out_h) // 2, (size[1] - out_w) // 2
            x = x[:, :, top:top + out_h, left:left + out_w]
        return x
