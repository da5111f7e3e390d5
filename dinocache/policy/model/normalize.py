"""Mean/std normalisation of low-dimensional inputs and targets (state, environment state, action).

ACT regresses normalised actions and reads normalised state, so the same statistics have to be
applied in training (from the feature store's stats) and in the live policy (baked into the
exported graph). Keeping them as buffers of an ``nn.Module`` does both: they travel in the
checkpoint's ``state_dict`` and ``torch.export`` / ONNX see them as constants.

Cached backbone features are not normalised here: the ViT's final LayerNorm already scales them.

Near-constant dimensions
    LeRobot computes ``(x - mean) / (std + 1e-8)``. For a dimension that never moved in the
    demonstrations (a locked joint, a gripper that was never used) that divides by ~1e-8, so a
    sensor drift of 0.001 rad at deployment becomes a state value of 1e5 and the policy goes off the
    rails. Here any ``std < eps`` (default ``1e-4``, below the resolution of real joint encoders: a
    12-bit one resolves 1.5e-3 rad) is replaced by 1, so such a dimension is only centred. Real
    variations keep their true scale, and since :meth:`Normalizer.unnormalize` uses the same stored
    ``std``, ``unnormalize(normalize(x)) == x`` for every dimension.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Normalizer", "DEFAULT_STD_EPS"]

DEFAULT_STD_EPS = 1e-4


def _as_float_tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        value = torch.from_numpy(np.array(value, dtype=np.float32))
    tensor = value.detach().to(dtype=torch.float32, device="cpu").clone()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Normalisation statistic {what} contains NaN or inf.")
    return tensor


class _MeanStd(nn.Module):
    """The two buffers of one key (a module so that each key gets its own ``state_dict`` prefix)."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)


class Normalizer(nn.Module):
    """Per-key mean/std normalisation with export-friendly buffers.

    Args:
        stats: ``{key: {"mean": array, "std": array}}`` as a feature store provides (numpy arrays,
            tensors or nested lists; other entries such as ``min``/``max`` are ignored). Mean and std
            must have the same shape, the trailing shape of the tensors they will normalise.
        eps: Stds below this are replaced by 1 (see the module docstring).

    ``state_dict`` keys are ``stats.<key with '.' replaced by '/'>.mean`` / ``.std`` (module names
    may not contain dots); :meth:`from_state_dict` rebuilds a normaliser from one.
    """

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], eps: float = DEFAULT_STD_EPS):
        super().__init__()
        if eps < 0:
            raise ValueError(f"`eps` must be non-negative. Got {eps}.")
        self.stats = nn.ModuleDict()
        for key, entry in stats.items():
            if "/" in key or not key:
                raise ValueError(f"Normaliser keys must be non-empty and contain no '/'. Got {key!r}.")
            missing = [name for name in ("mean", "std") if name not in entry]
            if missing:
                raise ValueError(f"Statistics for {key!r} lack {' and '.join(missing)}.")
            mean = _as_float_tensor(entry["mean"], f"{key}.mean")
            std = _as_float_tensor(entry["std"], f"{key}.std")
            if mean.shape != std.shape:
                raise ValueError(
                    f"Statistics for {key!r}: mean has shape {tuple(mean.shape)} "
                    f"but std has {tuple(std.shape)}."
                )
            if (std < 0).any():
                raise ValueError(f"Statistics for {key!r}: std has negative entries.")
            std = torch.where(std < eps, torch.ones_like(std), std)
            self.stats[self._module_name(key)] = _MeanStd(mean, std)

    @staticmethod
    def _module_name(key: str) -> str:
        return key.replace(".", "/")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], prefix: str = "") -> Normalizer:
        """Rebuild a normaliser from its ``state_dict`` (optionally nested under ``prefix``).

        The stored stds already had near-zero entries replaced by 1, so they are loaded as they are.
        """
        head = prefix + "stats."
        stats: dict[str, dict[str, Tensor]] = {}
        for name, tensor in state_dict.items():
            if not name.startswith(head):
                continue
            module_name, _, field = name[len(head):].rpartition(".")
            if field in ("mean", "std"):
                stats.setdefault(module_name.replace("/", "."), {})[field] = tensor
        if not stats:
            raise ValueError(f"No normaliser statistics under {head!r} in the state dict.")
        return cls(stats, eps=0.0)

    @property
    def keys(self) -> list[str]:
        """The keys this normaliser has statistics for."""
        return [name.replace("/", ".") for name in self.stats]

    @property
    def device(self) -> torch.device:
        """Where the statistics are (they move with the module, as every buffer does)."""
        return next(self.buffers()).device

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._module_name(key) in self.stats

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def _get(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        name = self._module_name(key)
        if name not in self.stats:
            known = ", ".join(self.keys) or "none"
            raise KeyError(f"No normalisation statistics for {key!r}; known keys: {known}.")
        entry = self.stats[name]
        return entry.mean.to(x.dtype), entry.std.to(x.dtype)

    def normalize(self, key: str, x: Tensor) -> Tensor:
        """``(x - mean) / std``, broadcasting the statistics over ``x``'s leading dimensions."""
        mean, std = self._get(key, x)
        return (x - mean) / std

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        """``x * std + mean``, the exact inverse of :meth:`normalize`."""
        mean, std = self._get(key, x)
        return x * std + mean

    def extra_repr(self) -> str:
        return f"keys={self.keys}"
