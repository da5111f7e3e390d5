"""Resizing as gathers and weighted sums: the same resampling as ``F.interpolate``, in ops every exporter lowers.

``F.interpolate(..., antialias=True)`` is one ATen op (``_upsample_bilinear2d_aa``) that AOTInductor has
no C shim for: a compiled policy calls it back through a host-side proxy executor, and ONNX needs a
``Resize`` with ``antialias``, which TensorRT does not implement. Yet at a fixed input and output size
any of these resamplings is a fixed linear map along each axis, and each output pixel reads only a
few neighbouring input pixels. :func:`axis_taps` reads that map off ``F.interpolate`` itself (so the
weights are PyTorch's, not a re-derivation) and keeps the band of taps; :func:`resample` applies it as
``index_select``, multiply and sum: ops Inductor generates kernels for (and can fuse), and ONNX writes
as Gather, Mul and ReduceSum.

Eager code keeps calling ``F.interpolate`` (faster on a CPU); traced programs use the taps. The two
agree to float32 rounding (the sums run in another order), which the export's parity check measures.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class AxisTaps(NamedTuple):
    """Output pixel ``o`` of one axis = ``sum_k weight[o, k] * input[index[o, k]]``; both ``(n_out, k)``."""

    index: torch.Tensor
    weight: torch.Tensor


def axis_taps(n_in: int, n_out: int, mode: str, antialias: bool, device: torch.device | str = "cpu") -> AxisTaps:
    """The taps of resizing one axis from ``n_in`` to ``n_out`` pixels as ``F.interpolate`` does it.

    The map is read off ``F.interpolate`` applied to the identity (along the height only; the width,
    unchanged, is the identity too), then cut to the narrowest band that holds every non-zero weight
    of each row. In float32, as the frames are resized: the op's weights are then its own to the bit.
    """
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]
    matrix = F.interpolate(eye, size=(n_out, n_in), mode=mode, align_corners=False, antialias=antialias)[0, 0]
    nonzero = matrix != 0
    positions = torch.arange(n_in)
    first = torch.where(nonzero, positions, n_in).min(dim=1).values.clamp(max=n_in - 1)
    last = torch.where(nonzero, positions, -1).max(dim=1).values.clamp(min=0)
    taps = int((last - first).max()) + 1
    index = (first.clamp(max=n_in - taps)[:, None] + torch.arange(taps)[None]).contiguous()
    weight = matrix.gather(1, index)
    return AxisTaps(index.to(device), weight.to(device))


def resample(x: torch.Tensor, rows: AxisTaps, cols: AxisTaps) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized with ``cols`` along the width, then ``rows`` along the height."""
    batch, channels, height, _ = x.shape
    out_w, taps_w = cols.index.shape
    x = (x.index_select(3, cols.index.reshape(-1)).view(batch, channels, height, out_w, taps_w)
         * cols.weight).sum(dim=4)
    out_h, taps_h = rows.index.shape
    x = (x.index_select(2, rows.index.reshape(-1)).view(batch, channels, out_h, taps_h, out_w)
         * rows.weight[:, :, None]).sum(dim=3)
    return x
