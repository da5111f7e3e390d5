"""ACTConfig / ACTInputs: LeRobot defaults, validation, JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinocache.policy.model.config import ACTConfig, ACTInputs

LEROBOT_DEFAULTS = {
    "n_obs_steps": 1,
    "chunk_size": 100,
    "n_action_steps": 100,
    "dim_model": 512,
    "n_heads": 8,
    "dim_feedforward": 3200,
    "feedforward_activation": "relu",
    "pre_norm": False,
    "n_encoder_layers": 4,
    "n_decoder_layers": 1,
    "use_vae": True,
    "latent_dim": 32,
    "n_vae_encoder_layers": 4,
    "dropout": 0.1,
    "kl_weight": 10.0,
    "temporal_ensemble_coeff": None,
    "optimizer_lr": 1e-5,
    "optimizer_lr_backbone": 1e-5,
    "optimizer_weight_decay": 1e-4,
    "grad_clip_norm": 10.0,
    "use_cls_token": False,
}


def test_defaults_are_lerobots():
    assert ACTConfig().to_dict() == LEROBOT_DEFAULTS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_action_steps": 101}, "upper bound for the number of action steps"),
        ({"temporal_ensemble_coeff": 0.01}, "must be 1 when using temporal ensembling"),
        ({"n_obs_steps": 2}, "n_obs_steps"),
        ({"dim_model": 36, "n_heads": 8}, "divisible by `n_heads`"),
        ({"dim_model": 18, "n_heads": 2}, "divisible by 4"),
        ({"feedforward_activation": "swish"}, "feedforward_activation"),
        ({"chunk_size": 0, "n_action_steps": 0}, "chunk_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"kl_weight": -1.0}, "kl_weight"),
    ],
)
def test_invalid_configs_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ACTConfig(**overrides)


def test_temporal_ensembling_accepted_with_single_action_step():
    config = ACTConfig(temporal_ensemble_coeff=0.01, n_action_steps=1)
    assert config.temporal_ensemble_coeff == 0.01


def test_config_json_round_trip():
    config = ACTConfig(chunk_size=20, n_action_steps=1, temporal_ensemble_coeff=0.01, use_cls_token=True)
    assert ACTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_from_dict_rejects_unknown_and_defaults_missing():
    with pytest.raises(ValueError, match="chunksize"):
        ACTConfig.from_dict({"chunksize": 10})
    assert ACTConfig.from_dict({"chunk_size": 10, "n_action_steps": 10}).dim_model == 512


def test_inputs_json_round_trip_restores_tuples():
    inputs = ACTInputs(
        cameras=[("top", 384, 16, 16), ("wrist", 384, 12, 16)], state_dim=14, action_dim=14, env_state_dim=3
    )
    restored = ACTInputs.from_dict(json.loads(json.dumps(inputs.to_dict())))
    assert restored == inputs
    assert restored.cameras[1] == ("wrist", 384, 12, 16)
    assert restored.camera_names == ["top", "wrist"]
    assert ACTInputs.feature_key("top") == "features.top"
    assert ACTInputs.cls_key("top") == "cls.top"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cameras": [], "state_dim": 2, "action_dim": 2}, "at least one camera"),
        ({"cameras": [("a", 8, 2, 2), ("a", 8, 2, 2)], "state_dim": 2, "action_dim": 2}, "unique"),
        ({"cameras": [("a", 8, 0, 2)], "state_dim": 2, "action_dim": 2}, "positive"),
        ({"cameras": [("a.b", 8, 2, 2)], "state_dim": 2, "action_dim": 2}, "without '.'"),
        ({"cameras": [("a", 8, 2, 2)], "state_dim": 0, "action_dim": 2}, "state_dim"),
        ({"cameras": [("a", 8, 2, 2)], "state_dim": 2, "action_dim": 2, "env_state_dim": 0}, "env_state_dim"),
    ],
)
def test_invalid_inputs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ACTInputs(**kwargs)


def test_inputs_accept_numpy_integers_and_stay_json_serialisable():
    inputs = ACTInputs(cameras=[("top", *np.array([384, 16, 16]))], state_dim=np.int64(14), action_dim=14)
    assert inputs.cameras == [("top", 384, 16, 16)]
    assert type(inputs.state_dim) is int
    json.dumps(inputs.to_dict())


def test_environment_state_alone_is_a_valid_input():
    assert ACTInputs(cameras=[], state_dim=2, action_dim=2, env_state_dim=5).camera_names == []
