"""Augmentation recipes: which image transforms make a store's augmented views, with which ranges.

A feature store freezes each frame's pixels, so the augmentation imitation learning leans on with a
few dozen demonstrations (random crop and shift, colour jitter) has to happen when the features are
computed: ``dinocache extract --views K --augment RECIPE`` stores, beside every clean frame, K-1
transformed copies of it (:mod:`dinocache.encoders.augment` applies them). This module is only the
description of what to apply, plain data that the store records and compares, so it imports no torch
(the command line reads a recipe before torch loads).

Names and default ranges are LeRobot's ``ImageTransformsConfig`` (``brightness``, ``contrast``,
``saturation``, ``hue``, ``sharpness``, ``affine``; ``max_num_transforms`` of them drawn per frame by
weight, without replacement, applied in the listed order unless ``random_order``), so a LeRobot user's
settings carry over. Three more cover what LeRobot's set does not: ``crop`` (crop and scale back, as
``RandomResizedCrop`` at the frame's aspect ratio), ``shift`` (DrQ's pad-by-replication random shift)
and ``rotation``.

A recipe is a preset name (:data:`PRESETS`) or a JSON file of the shape :meth:`AugmentRecipe.to_dict`
writes; a file may leave out any field or parameter, which then takes the default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinocache.errors import DinocacheError

__all__ = ["TRANSFORMS", "PRESETS", "DEFAULT_PRESET", "AugmentRecipe", "parse_recipe"]

#: Every transform a recipe may name: its parameters and their defaults (LeRobot's where it has the
#: transform). Ranges are ``[low, high]`` drawn uniformly; ``translate`` and ``max`` are fractions of
#: the frame's width and height; ``scale`` is the fraction of the frame's area a crop keeps.
TRANSFORMS: dict[str, dict[str, Any]] = {
    "brightness": {"range": [0.8, 1.2]},
    "contrast": {"range": [0.8, 1.2]},
    "saturation": {"range": [0.5, 1.5]},
    "hue": {"range": [-0.05, 0.05]},
    "sharpness": {"range": [0.5, 1.5]},
    "affine": {"degrees": [-5.0, 5.0], "translate": [0.05, 0.05]},
    "crop": {"scale": [0.8, 1.0]},
    "shift": {"max": 0.05},
    "rotation": {"degrees": [-5.0, 5.0]},
}
_PAIRS = {"range", "degrees", "translate", "scale"}

#: The named recipes: ``lerobot`` is LeRobot's ``image_transforms`` default (3 of its 6 per frame);
#: ``drq`` DrQ's random shift alone (4 pixels at 84, about 5 %, with edge replication); ``all`` every
#: transform above, 3 per frame.
PRESETS: dict[str, dict[str, Any]] = {
    "lerobot": {"max_num_transforms": 3, "transforms": {name: {} for name in
                                                        ("brightness", "contrast", "saturation", "hue", "sharpness",
                                                         "affine")}},
    "drq": {"max_num_transforms": 1, "transforms": {"shift": {}}},
    "all": {"max_num_transforms": 3, "transforms": {name: {} for name in
                                                    ("crop", "shift", "rotation", "brightness", "contrast",
                                                     "saturation", "hue", "sharpness")}},
}
DEFAULT_PRESET = "lerobot"


@dataclass(frozen=True)
class AugmentRecipe:
    """What makes views 1..K-1 of a frame: the transforms and their parameters, how many of them each
    frame gets, in what order, and the seed every frame's draw derives from.

    ``transforms`` maps a name of :data:`TRANSFORMS` to its parameters, each complete (defaults filled
    in) plus a ``weight`` (the chance of being drawn, relative to the others'), in application order.
    """

    name: str
    transforms: Mapping[str, Mapping[str, Any]]
    max_num_transforms: int
    random_order: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, as the store's provenance records it (and as a recipe file may be written)."""
        return {"name": self.name, "max_num_transforms": self.max_num_transforms, "random_order": self.random_order,
                "seed": self.seed, "transforms": {name: dict(params) for name, params in self.transforms.items()}}

    def describe(self) -> str:
        """One line for `inspect` and the extraction summary."""
        shown = ", ".join(f"{name} {_short(params)}" for name, params in self.transforms.items())
        order = "random order" if self.random_order else "in this order"
        return (f"{self.name} (seed {self.seed}): {self.max_num_transforms} of [{shown}] per view, drawn by weight, "
                f"{order}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the recipe") -> AugmentRecipe:
        """A recipe from its JSON form, defaults filled in; anything unknown or out of range is refused,
        naming ``where`` (the file, or the store's record) and the field."""
        if not isinstance(data, Mapping):
            raise DinocacheError(f"{where}: an augmentation recipe is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "max_num_transforms", "random_order", "seed", "transforms"})
        if unknown:
            raise DinocacheError(f"{where}: unknown recipe field(s) {unknown}; known: name, transforms, "
                                 "max_num_transforms, random_order, seed")
        given = data.get("transforms")
        if not isinstance(given, Mapping) or not given:
            raise DinocacheError(f"{where}: 'transforms' must name at least one of {', '.join(TRANSFORMS)}")
        transforms = {str(name): _transform(str(name), params, where) for name, params in given.items()}
        count = data.get("max_num_transforms", len(transforms))
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(transforms):
            raise DinocacheError(f"{where}: max_num_transforms {count!r} must be a whole number from 1 to the "
                                 f"{len(transforms)} transform(s) named")
        if not any(params["weight"] > 0 for params in transforms.values()):
            raise DinocacheError(f"{where}: every transform has weight 0: nothing could be drawn")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DinocacheError(f"{where}: seed {seed!r} must be a whole number of at least 0")
        return cls(name=str(data.get("name", "custom")), transforms=transforms, max_num_transforms=count,
                   random_order=bool(data.get("random_order", False)), seed=seed)


def _transform(name: str, params: Any, where: str) -> dict[str, Any]:
    """One transform's parameters, complete and checked."""
    if name not in TRANSFORMS:
        raise DinocacheError(f"{where}: unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise DinocacheError(f"{where}: transform {name!r} takes an object of parameters, got {params!r}")
    unknown = sorted(set(params) - set(TRANSFORMS[name]) - {"weight"})
    if unknown:
        raise DinocacheError(f"{where}: transform {name!r} has no parameter(s) {unknown}; it takes weight, "
                             f"{', '.join(TRANSFORMS[name])}")
    out: dict[str, Any] = {"weight": params.get("weight", 1.0)}
    for key, default in TRANSFORMS[name].items():
        value = params.get(key, default)
        try:
            out[key] = [float(v) for v in value] if key in _PAIRS else float(value)
        except (TypeError, ValueError):
            raise DinocacheError(f"{where}: {name}.{key} {value!r} must be "
                                 f"{'two numbers' if key in _PAIRS else 'a number'}") from None
        if key in _PAIRS and len(out[key]) != 2:
            raise DinocacheError(f"{where}: {name}.{key} {value!r} must be two numbers")
    if isinstance(out["weight"], bool) or not isinstance(out["weight"], (int, float)) or out["weight"] < 0:
        raise DinocacheError(f"{where}: {name}.weight {out['weight']!r} must be a number of at least 0")
    out["weight"] = float(out["weight"])
    _check_ranges(name, out, where)
    return out


def _check_ranges(name: str, params: Mapping[str, Any], where: str) -> None:
    """Refuse parameters torchvision would refuse or that make no image (a negative factor, a crop of nothing)."""
    low_high = {"range": (0.0, None), "scale": (1e-3, 1.0), "translate": (0.0, 1.0)}
    if name == "hue":
        low_high["range"] = (-0.5, 0.5)
    for key, (least, most) in low_high.items():
        if key not in params:
            continue
        values = params[key]
        ordered = key == "translate" or values[0] <= values[1]
        if not ordered or min(values) < least or (most is not None and max(values) > most):
            bound = f"[{least:g}, {most:g}]" if most is not None else f"at least {least:g}"
            raise DinocacheError(f"{where}: {name}.{key} {values} must be {'two values' if key == 'translate' else 'low <= high'}, "
                                 f"each {bound}")
    if "degrees" in params and params["degrees"][0] > params["degrees"][1]:
        raise DinocacheError(f"{where}: {name}.degrees {params['degrees']} must be low <= high")
    if "max" in params and not 0.0 <= params["max"] < 0.5:
        raise DinocacheError(f"{where}: {name}.max {params['max']} must be a fraction of the frame in [0, 0.5)")


def _short(params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if not (k == "weight" and v == 1.0)}
    return json.dumps(shown, separators=(",", ":"))


def parse_recipe(text: str | None, seed: int = 0) -> AugmentRecipe:
    """``--augment``: a preset name (:data:`PRESETS`), or the path of a JSON recipe file; ``seed`` is
    ``--augment-seed`` (a file's own ``seed`` gives way to it: the seed is the command's)."""
    text = DEFAULT_PRESET if text is None else str(text)
    if text in PRESETS:
        return AugmentRecipe.from_dict({"name": text, **PRESETS[text], "seed": seed}, where=f"--augment {text}")
    path = Path(text)
    if not path.is_file():
        raise DinocacheError(f"--augment {text!r}: neither a preset ({', '.join(PRESETS)}) nor a recipe file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DinocacheError(f"{path}: not a JSON augmentation recipe ({err})") from None
    if isinstance(data, Mapping):
        data = {"name": path.stem, **data, "seed": seed}
    return AugmentRecipe.from_dict(data, where=str(path))
