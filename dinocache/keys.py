"""The data keys of the whole package, in one place (as LeRobot keeps its in one constants module).

The dataset readers, the feature store, the ACT head, the training loop and the live policy all name
the same arrays; spelling them once here, at the bottom of the package (it imports nothing), keeps a
renamed key from silently splitting them.
"""

from __future__ import annotations

__all__ = ["OBS_STATE", "OBS_VELOCITY", "OBS_ENV_STATE", "ACTION", "ACTION_IS_PAD", "CAMERA_PREFIX", "FEATURES_PREFIX",
           "CLS_PREFIX", "camera_key", "short_name"]

#: Robot state, as recorded (LeRobot's key).
OBS_STATE = "observation.state"
#: Joint velocities, where a dataset records them (ALOHA's qvel).
OBS_VELOCITY = "observation.velocity"
#: State of the environment (object poses in simulation), where a dataset has one.
OBS_ENV_STATE = "observation.environment_state"
#: The demonstrated action.
ACTION = "action"
#: Which steps of an action chunk run past the episode's end (training targets only).
ACTION_IS_PAD = "action_is_pad"
#: Camera keys are ``observation.images.<name>``.
CAMERA_PREFIX = "observation.images."
#: The head's batch keys for each camera's cached patch grid and CLS vector.
FEATURES_PREFIX = "features."
CLS_PREFIX = "cls."


def camera_key(name: str) -> str:
    """``top`` -> ``observation.images.top`` (LeRobot's key of a camera's frames)."""
    return CAMERA_PREFIX + name


def short_name(key: str) -> str:
    """A key's last dotted component: ``top`` for ``observation.images.top``, ``state`` for
    ``observation.state``. Users may name cameras and inputs so (``--cameras top``, ``{"state": ...}``),
    and the head keys its cameras so (its batch keys ``features.<name>`` cannot hold another dot)."""
    return key.rsplit(".", 1)[-1]
