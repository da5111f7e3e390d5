"""Create timm models without paying for initialisation that would be thrown away.

timm initialises every parameter at construction. That is wasted work twice in dinocache: on the
``meta`` device (no data to fill, and meta tensors run init through slow Python decompositions) and
right before a strict checkpoint load (which replaces every parameter; on ViT-7B the random init
alone takes minutes on a CPU). :func:`create_timm_model` skips exactly those fills.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import timm
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Init = Literal["random", "skip", "meta"]


def create_timm_model(timm_id: str, seed: int = 0, init: Init = "random", **kwargs: Any) -> nn.Module:
    """``timm.create_model(timm_id, pretrained=False, num_classes=0, **kwargs)`` with ``init``:

    * ``'random'``: timm's initialisation drawn from ``seed`` (deterministic; the global RNG state
      is left untouched);
    * ``'skip'``: parameters left uninitialised, for a strict load that replaces every one of them;
      buffers (RoPE periods, BatchNorm statistics, ...) are computed as usual;
    * ``'meta'``: on the meta device, no data at all, for shape inference.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(seed)
        if init == "meta":
            stack.enter_context(torch.device("meta"))
            stack.enter_context(_SkipFills(lambda t: t.is_meta))
        elif init == "skip":
            stack.enter_context(_SkipFills(lambda t: isinstance(t, nn.Parameter)))
        return timm.create_model(timm_id, pretrained=False, num_classes=0, **kwargs)


class _SkipFills(TorchFunctionMode):
    """Skip in-place value fills on the tensors ``skip`` selects.

    Only value-filling ops are skipped, never ones that change shape or flags (``resize_``,
    ``requires_grad_``, ...), so the module built is structurally identical.
    """

    FILLS = frozenset({"normal_", "uniform_", "trunc_normal_", "zero_", "fill_", "copy_", "clamp_",
                       "clip_", "mul_", "add_", "sub_", "div_", "erfinv_", "exp_"})

    def __init__(self, skip: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.skip = skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in self.FILLS and args
                and isinstance(args[0], torch.Tensor) and self.skip(args[0])):
            return args[0]
        return func(*args, **(kwargs or {}))
