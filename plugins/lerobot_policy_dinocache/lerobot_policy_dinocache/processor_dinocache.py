"""The ``dinocache`` policy's processors: LeRobot's default pipelines, normalising as dinocache does.

The steps are LeRobot's own (rename, batch, device, normalise; unnormalise, to CPU), built by its
factory with their standard names, so ``lerobot-eval`` and ``lerobot-rollout`` override
``device_processor`` and ``rename_observations_processor`` as for any policy. Two choices differ
from LeRobot's ACT, both to compute what dinocache computes:

* images are not normalised (``VISUAL: IDENTITY`` in the config): the backbone's own preprocessing
  resizes and normalises them, as at extraction and in the exported policy;
* a state or action dimension whose std is below :data:`~dinocache.policy.model.normalize.DEFAULT_STD_EPS`
  (a joint that never moved in the demonstrations) is only centred (std taken as 1), as dinocache's
  :class:`~dinocache.policy.model.normalize.Normalizer` does, instead of being divided by ``std + 1e-8``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dinocache.policy.model.normalize import DEFAULT_STD_EPS
from lerobot.configs import NormalizationMode
from lerobot.processor import PolicyAction, PolicyProcessorPipeline, make_default_pre_post_processors

from .configuration_dinocache import DinocacheConfig

__all__ = ["make_dinocache_pre_post_processors", "floored_stats"]


def floored_stats(config: DinocacheConfig, stats: Mapping[str, Mapping[str, Any]] | None
                  ) -> dict[str, dict[str, Any]] | None:
    """``stats`` with each mean/std-normalised feature's std below ``DEFAULT_STD_EPS`` replaced by 1."""
    if stats is None:
        return None
    features = {**(config.input_features or {}), **(config.output_features or {})}
    floored = {key: dict(entry) for key, entry in stats.items()}
    for key, feature in features.items():
        mode = config.normalization_mapping.get(feature.type.value)
        if mode == NormalizationMode.MEAN_STD and key in floored and "std" in floored[key]:
            std = torch.as_tensor(floored[key]["std"], dtype=torch.float32)
            floored[key]["std"] = torch.where(std < DEFAULT_STD_EPS, torch.ones_like(std), std)
    return floored


def make_dinocache_pre_post_processors(
    config: DinocacheConfig, dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    """LeRobot's default pre- and post-processors (as ACT's), with the stats floored as dinocache floors them."""
    return make_default_pre_post_processors(config, floored_stats(config, dataset_stats),
                                            normalizer_device=config.device)
