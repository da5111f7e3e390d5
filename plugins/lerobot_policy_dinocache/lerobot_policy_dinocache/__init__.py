"""LeRobot policy plugin ``dinocache``: ACT on any backbone dinocache registers, trained and run by LeRobot's tools.

LeRobot's ``register_third_party_plugins()`` imports every installed distribution whose name starts
with ``lerobot_policy_``; importing this package registers the ``dinocache`` policy type (its
configuration module). LeRobot then finds ``DinocachePolicy`` in ``modeling_dinocache`` and
``make_dinocache_pre_post_processors`` in ``processor_dinocache`` by its naming rules, importing
them only when a policy is made. See ``docs/lerobot.md`` in the dinocache repository.
"""

from .configuration_dinocache import POLICY_TYPE, DinocacheConfig

__all__ = ["DinocacheConfig", "POLICY_TYPE"]
