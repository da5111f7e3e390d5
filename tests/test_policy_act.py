"""ACTHead: shapes, loss semantics, CVAE, decoder depth, trainability, torch.export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinocache.policy.model.act import ACTHead
from dinocache.policy.model.config import ACTConfig, ACTInputs
from dinocache.policy.model.transformer import create_sinusoidal_pos_embedding, sinusoidal_position_embedding_2d

CHUNK = 6
STATE_DIM = 5
ACTION_DIM = 4
INPUTS = ACTInputs(
    cameras=[("top", 16, 4, 4), ("wrist", 16, 3, 5)], state_dim=STATE_DIM, action_dim=ACTION_DIM
)


def small_config(**overrides) -> ACTConfig:
    values = dict(
        dim_model=32,
        n_heads=4,
        dim_feedforward=64,
        n_encoder_layers=2,
        n_decoder_layers=1,
        n_vae_encoder_layers=2,
        latent_dim=8,
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
    )
    values.update(overrides)
    return ACTConfig(**values)


def make_batch(
    inputs: ACTInputs = INPUTS, batch_size: int = 3, seed: int = 0, with_action: bool = True, with_cls: bool = False
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(batch_size, *shape, generator=generator)

    batch = {"observation.state": randn(inputs.state_dim)}
    for name, channels, height, width in inputs.cameras:
        batch[ACTInputs.feature_key(name)] = randn(channels, height, width)
        if with_cls:
            batch[ACTInputs.cls_key(name)] = randn(channels)
    if inputs.env_state_dim is not None:
        batch["observation.environment_state"] = randn(inputs.env_state_dim)
    if with_action:
        batch["action"] = randn(CHUNK, inputs.action_dim)
        is_pad = torch.zeros(batch_size, CHUNK, dtype=torch.bool)
        is_pad[0, -2:] = True  # first sample's episode ends two steps before the chunk does
        batch["action_is_pad"] = is_pad
    return batch


def observation_only(batch):
    return {key: value for key, value in batch.items() if not key.startswith("action")}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- shapes and inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_vae", [True, False])
@pytest.mark.parametrize("use_cls_token", [True, False])
def test_output_shapes_train_and_eval(use_vae, use_cls_token):
    inputs = ACTInputs(cameras=INPUTS.cameras, state_dim=STATE_DIM, action_dim=ACTION_DIM, env_state_dim=3)
    head = ACTHead(small_config(use_vae=use_vae, use_cls_token=use_cls_token), inputs)
    batch = make_batch(inputs, with_cls=use_cls_token)

    actions, latent_params = head(batch)
    assert actions.shape == (3, CHUNK, ACTION_DIM)
    if use_vae:
        mu, log_sigma_x2 = latent_params
        assert mu.shape == log_sigma_x2.shape == (3, 8)
    else:
        assert latent_params is None

    head.eval()
    actions, latent_params = head(observation_only(batch))
    assert actions.shape == (3, CHUNK, ACTION_DIM)
    assert latent_params is None


def test_environment_state_only_head():
    inputs = ACTInputs(cameras=[], state_dim=STATE_DIM, action_dim=ACTION_DIM, env_state_dim=7)
    head = ACTHead(small_config(use_cls_token=True), inputs)
    actions, _ = head(make_batch(inputs))
    assert actions.shape == (3, CHUNK, ACTION_DIM)


def test_cameras_are_distinguishable_by_their_embedding():
    """Swapping two same-shaped camera grids must change the output: the per-camera embedding tags them."""
    inputs = ACTInputs(
        cameras=[("left", 16, 4, 4), ("right", 16, 4, 4)], state_dim=STATE_DIM, action_dim=ACTION_DIM
    )
    head = ACTHead(small_config(), inputs).eval()
    batch = observation_only(make_batch(inputs))
    swapped = dict(batch)
    swapped["features.left"], swapped["features.right"] = batch["features.right"], batch["features.left"]
    assert not torch.allclose(head(batch)[0], head(swapped)[0])


def test_float16_cached_features_are_accepted():
    head = ACTHead(small_config(use_cls_token=True), INPUTS).eval()
    batch = observation_only(make_batch(with_cls=True))
    half = {key: v.half() if key.startswith(("features.", "cls.")) else v for key, v in batch.items()}
    rounded = {key: v.float() for key, v in half.items()}
    torch.testing.assert_close(head(half)[0], head(rounded)[0])


def test_cls_tokens_feed_the_model():
    head = ACTHead(small_config(use_cls_token=True), INPUTS).eval()
    batch = observation_only(make_batch(with_cls=True))
    changed = dict(batch, **{"cls.wrist": batch["cls.wrist"] + 1.0})
    assert not torch.allclose(head(batch)[0], head(changed)[0])


def test_missing_and_misshaped_inputs_are_named():
    head = ACTHead(small_config(use_cls_token=True), INPUTS)
    batch = make_batch(with_cls=True)
    with pytest.raises(ValueError, match="cls.top"):
        head({key: value for key, value in batch.items() if key != "cls.top"})
    with pytest.raises(ValueError, match="features.wrist"):
        head(dict(batch, **{"features.wrist": torch.randn(3, 16, 4, 4)}))
    with pytest.raises(ValueError, match="action"):
        head(observation_only(batch))  # training mode with the CVAE needs the target chunk


def test_cameras_with_different_channel_counts_are_rejected():
    inputs = ACTInputs(cameras=[("a", 16, 4, 4), ("b", 32, 4, 4)], state_dim=2, action_dim=2)
    with pytest.raises(ValueError, match="same feature width"):
        ACTHead(small_config(), inputs)


@pytest.mark.parametrize(("activation", "pre_norm"), [("gelu", True), ("glu", False), ("relu", True)])
def test_transformer_variants_train(activation, pre_norm):
    head = ACTHead(small_config(feedforward_activation=activation, pre_norm=pre_norm), INPUTS)
    loss, _ = head.compute_loss(make_batch())
    loss.backward()
    assert math.isfinite(loss.item())


def test_every_parameter_receives_gradient():
    """All modules (CVAE, CLS projection, camera and position embeddings, every decoder layer) are wired in.

    The first decoder layer's self-attention sees the all-zero decoder input (as in ACT/DETR), so at
    initialisation, with PyTorch's zero attention biases, its output projection and norm get no
    gradient; one warm-up step moves the biases, after which every parameter must learn.
    """
    inputs = ACTInputs(cameras=INPUTS.cameras, state_dim=STATE_DIM, action_dim=ACTION_DIM, env_state_dim=3)
    head = ACTHead(small_config(use_cls_token=True, n_decoder_layers=2), inputs)
    batch = make_batch(inputs, with_cls=True)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        head.compute_loss(batch)[0].backward()
        optimizer.step()
    without_grad = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert without_grad == []


# --- loss ------------------------------------------------------------------------------------------


def floats(info: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in info.items()}


def test_padded_actions_are_excluded_from_the_loss():
    head = ACTHead(small_config(dropout=0.0), INPUTS)
    batch = make_batch()
    is_pad = batch["action_is_pad"]

    def loss_of(b):
        torch.manual_seed(1)  # the same latent sample every time
        return floats(head.compute_loss(b)[1])

    reference = loss_of(batch)
    padded_changed = dict(batch, action=torch.where(is_pad.unsqueeze(-1), 100.0, batch["action"]))
    assert loss_of(padded_changed) == pytest.approx(reference, rel=1e-6)  # L1 and KL: the CVAE masks them too

    real_changed = dict(batch, action=batch["action"].clone())
    real_changed["action"][1, 0, 0] += 1.0
    assert loss_of(real_changed)["l1_loss"] != pytest.approx(reference["l1_loss"], rel=1e-6)


def test_l1_is_the_mean_over_non_padded_elements():
    head = ACTHead(small_config(use_vae=False, dropout=0.0), INPUTS)
    batch = make_batch()
    batch["action_is_pad"][2, 1:] = True  # a second sample with mostly padding
    predicted, _ = head(batch)
    expected = (predicted - batch["action"]).abs()[~batch["action_is_pad"]].mean()

    loss, info = head.compute_loss(batch)
    assert float(info["l1_loss"]) == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == float(info["loss"])
    assert all(not value.requires_grad and value.dim() == 0 for value in info.values()), \
        "terms are detached device scalars: reading them is the caller's choice (a sync on CUDA)"


def test_no_kl_term_without_vae():
    head = ACTHead(small_config(use_vae=False), INPUTS)
    assert not hasattr(head, "vae_encoder")
    info = floats(head.compute_loss(make_batch())[1])
    assert info["kld_loss"] == 0.0
    assert info["loss"] == pytest.approx(info["l1_loss"])


def test_kl_term_matches_closed_form_and_weight():
    head = ACTHead(small_config(kl_weight=3.0), INPUTS)
    batch = make_batch()
    torch.manual_seed(5)
    _, (mu, log_sigma_x2) = head(batch)
    sigma2 = log_sigma_x2.exp()
    expected = (0.5 * (mu**2 + sigma2 - 1 - log_sigma_x2)).sum(-1).mean()
    torch.manual_seed(5)
    info = floats(head.compute_loss(batch)[1])
    assert info["kld_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert info["loss"] == pytest.approx(info["l1_loss"] + 3.0 * info["kld_loss"], rel=1e-5)


def test_eval_mode_loss_uses_the_zero_latent():
    head = ACTHead(small_config(), INPUTS).eval()
    batch = make_batch()
    info = floats(head.compute_loss(batch)[1])
    assert info["kld_loss"] == 0.0
    predicted, _ = head(observation_only(batch))
    expected = (predicted - batch["action"]).abs()[~batch["action_is_pad"]].mean()
    assert info["l1_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_compute_loss_checks_targets():
    head = ACTHead(small_config(use_vae=False), INPUTS)
    batch = make_batch()
    with pytest.raises(ValueError, match="missing action_is_pad"):
        head.compute_loss({key: v for key, v in batch.items() if key != "action_is_pad"})
    with pytest.raises(ValueError, match="'action' has shape"):
        head.compute_loss(dict(batch, action=batch["action"][:, :-1]))
    with pytest.raises(ValueError, match="bool"):
        head.compute_loss(dict(batch, action_is_pad=batch["action_is_pad"].float()))


# --- architecture ----------------------------------------------------------------------------------


def test_all_decoder_layers_are_used():
    head = ACTHead(small_config(n_decoder_layers=2), INPUTS).eval()
    batch = observation_only(make_batch())
    before = head(batch)[0]
    for layer_index in (0, 1):
        layer = head.decoder.layers[layer_index]
        saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
        with torch.no_grad():
            layer.linear2.weight.add_(torch.randn_like(layer.linear2.weight))
        assert not torch.allclose(head(batch)[0], before), f"decoder layer {layer_index} has no effect"
        layer.load_state_dict(saved)
    torch.testing.assert_close(head(batch)[0], before)


def test_transformer_matrices_use_xavier_uniform():
    head = ACTHead(small_config(dim_feedforward=96), INPUTS)
    weight = head.encoder.layers[0].linear1.weight  # (96, 32): xavier bound sqrt(6 / (32 + 96))
    bound = math.sqrt(6 / (32 + 96))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound  # not PyTorch's default (bound 1/sqrt(32) ~ 0.18 < 0.2165)


def test_position_embeddings_match_act_formula():
    embedding = sinusoidal_position_embedding_2d(3, 5, 8)
    assert embedding.shape == (16, 3, 5)
    # Row r (1-based) at channel 2k/2k+1: sin/cos(2*pi*r/H / 10000^(2k/8)); columns follow in channels 8..15.
    row, col = 2, 4
    for k in range(4):
        row_angle = (row + 1) / (3 + 1e-6) * 2 * math.pi / 10000 ** (2 * k / 8)
        col_angle = (col + 1) / (5 + 1e-6) * 2 * math.pi / 10000 ** (2 * k / 8)
        assert embedding[2 * k, row, col].item() == pytest.approx(math.sin(row_angle), abs=1e-5)
        assert embedding[2 * k + 1, row, col].item() == pytest.approx(math.cos(row_angle), abs=1e-5)
        assert embedding[8 + 2 * k, row, col].item() == pytest.approx(math.sin(col_angle), abs=1e-5)
        assert embedding[8 + 2 * k + 1, row, col].item() == pytest.approx(math.cos(col_angle), abs=1e-5)

    table = create_sinusoidal_pos_embedding(7, 6)
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[3, 3].item() == pytest.approx(math.cos(3 / 10000 ** (2 / 6)), abs=1e-6)


def test_state_dict_round_trip_through_json_configs():
    config, inputs = small_config(use_cls_token=True), INPUTS
    head = ACTHead(config, inputs).eval()
    rebuilt = ACTHead(
        ACTConfig.from_dict(json.loads(json.dumps(config.to_dict()))),
        ACTInputs.from_dict(json.loads(json.dumps(inputs.to_dict()))),
    ).eval()
    rebuilt.load_state_dict(head.state_dict())  # strict: same parameter names and shapes
    batch = observation_only(make_batch(with_cls=True))
    torch.testing.assert_close(rebuilt(batch)[0], head(batch)[0])


# --- training --------------------------------------------------------------------------------------


def test_overfits_a_tiny_batch():
    head = ACTHead(small_config(dropout=0.0, kl_weight=1.0), INPUTS)
    batch = make_batch(batch_size=4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    first_l1 = None
    for _ in range(200):
        loss, info = head.compute_loss(batch)
        first_l1 = info["l1_loss"] if first_l1 is None else first_l1
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), head.config.grad_clip_norm)
        optimizer.step()
    assert info["l1_loss"] < 0.2 * first_l1
    # The deployed path (eval, zero latent) has learnt the batch too, not only the CVAE-conditioned one.
    _, eval_info = head.eval().compute_loss(batch)
    assert eval_info["l1_loss"] < 0.35 * first_l1


# --- export ----------------------------------------------------------------------------------------


def test_torch_export_matches_eager_with_dynamic_batch():
    inputs = ACTInputs(cameras=INPUTS.cameras, state_dim=STATE_DIM, action_dim=ACTION_DIM, env_state_dim=3)
    head = ACTHead(small_config(use_cls_token=True, n_decoder_layers=2), inputs).eval()
    example = observation_only(make_batch(inputs, batch_size=2, with_cls=True))
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(
        head, (example,), dynamic_shapes=({key: {0: batch_dim} for key in example},)
    )
    for batch_size in (1, 5):
        batch = observation_only(make_batch(inputs, batch_size=batch_size, seed=batch_size, with_cls=True))
        exported_actions, exported_latent = exported.module()(batch)
        eager_actions, _ = head(batch)
        assert exported_latent is None
        torch.testing.assert_close(exported_actions, eager_actions, rtol=1e-5, atol=1e-5)
