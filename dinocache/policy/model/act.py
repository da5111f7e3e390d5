"""The ACT head (Zhao et al. 2023, "Learning Fine-Grained Bimanual Manipulation with Low-Cost
Hardware"), trained directly on cached DINO patch grids instead of on images.

It follows LeRobot's ``lerobot/policies/act/modeling_act.py`` (module names, token layout, CVAE,
initialisation) so that anyone who knows ACT there recognises every piece. What changes:

* There is no vision backbone. Each camera's cached ``(C, h, w)`` grid goes straight into the 1x1
  input projection, and because the grid shape of every camera is known up front (it is recorded in
  the store) the 2D sinusoidal position embeddings are precomputed buffers.
* Cameras are told apart by a learned per-camera embedding added to their position embedding. (In
  LeRobot, cameras share one projection and one sinusoidal embedding, so the tokens at the same grid
  position of two cameras carry identical position embeddings and attention, being order-blind,
  cannot tell which view a token came from.)
* Optionally each camera's CLS vector becomes one more encoder token.
* All ``n_decoder_layers`` decoder layers are run (see the note in :class:`ACTDecoder`).
* The L1 loss is averaged over the non-padded action elements only (LeRobot averages over all of
  them, padded ones included as zeros, so episodes ending inside the chunk get down-weighted).
* Tensors are batch-first throughout.

Token layout of the transformer encoder (``T = n_1d + sum(h*w)``)::

    [latent, robot_state, (env_state), (cls_cam0, cls_cam1, ...), cam0 grid (h0*w0), cam1 grid, ...]
     └────────────── learned 1D position embeddings ─────────────┘ └─ 2D sinusoid + camera embed ─┘
"""

from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dinocache.policy.model.config import ACTION, ACTION_IS_PAD, OBS_ENV_STATE, OBS_STATE, ACTConfig, ACTInputs
from dinocache.policy.model.transformer import (
    ACTDecoder, ACTEncoder, create_sinusoidal_pos_embedding, sinusoidal_position_embedding_2d,
)

__all__ = ["ACTHead", "act_optimizer"]


# --------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------


class ACTHead(nn.Module):
    """ACT on cached backbone features: observation tokens in, a normalised action chunk out.

    Inputs are expected already normalised (state, env state, actions; see
    :class:`~dinocache.policy.model.normalize.Normalizer`); cached features are used as they are, since the
    ViT's final LayerNorm already puts them on a common scale. Outputs are normalised actions.

    Batch keys (see :class:`~dinocache.policy.model.config.ACTInputs` for the shapes):

    * ``observation.state``: (B, state_dim).
    * ``features.<camera>``: (B, C, h, w) for every camera, channels-first (the store keeps grids
      channels-last) and in any float dtype (cast to the head's).
    * ``cls.<camera>``: (B, C) for every camera, only when ``config.use_cls_token``.
    * ``observation.environment_state``: (B, env_state_dim), only when ``inputs.env_state_dim``.
    * ``action``: (B, chunk_size, action_dim) and ``action_is_pad``: (B, chunk_size) bool (True
      where the chunk ran past the episode end), needed in training with the CVAE and by
      :meth:`compute_loss`.

    The CVAE encoder runs only in training mode; in eval mode the latent is zeros (the prior's mean),
    which is exactly what the live policy does. That path has no data-dependent control flow, so the
    eval-mode head can be traced with ``torch.export.export``.
    """

    def __init__(self, config: ACTConfig, inputs: ACTInputs):
        super().__init__()
        config.validate()
        inputs.validate()
        channels = sorted({c for _, c, _, _ in inputs.cameras})
        if len(channels) > 1:
            raise ValueError(
                f"All cameras must have the same feature width C (one backbone per store); got "
                f"{', '.join(f'{name}: {c}' for name, c, _, _ in inputs.cameras)}."
            )
        self.config = config
        self.inputs = inputs
        dim = config.dim_model

        # CVAE encoder: BERT-style, tokens [cls, robot_state, *action_chunk]; the cls output gives
        # the latent distribution's parameters [*mu, *log(sigma^2)].
        if config.use_vae:
            self.vae_encoder = ACTEncoder(config, config.n_vae_encoder_layers)
            self.vae_encoder_cls_embed = nn.Embedding(1, dim)
            self.vae_encoder_robot_state_input_proj = nn.Linear(inputs.state_dim, dim)
            self.vae_encoder_action_input_proj = nn.Linear(inputs.action_dim, dim)
            self.vae_encoder_latent_output_proj = nn.Linear(dim, 2 * config.latent_dim)
            self.register_buffer(
                "vae_encoder_pos_enc",
                create_sinusoidal_pos_embedding(2 + config.chunk_size, dim).unsqueeze(0),
                persistent=False,
            )

        # Transformer (the CVAE decoder during training, used alone at inference).
        self.encoder = ACTEncoder(config, config.n_encoder_layers)
        self.decoder = ACTDecoder(config)

        # Encoder inputs: 1D tokens first, each with its own learned position embedding.
        self.encoder_latent_input_proj = nn.Linear(config.latent_dim, dim)
        self.encoder_robot_state_input_proj = nn.Linear(inputs.state_dim, dim)
        if inputs.env_state_dim is not None:
            self.encoder_env_state_input_proj = nn.Linear(inputs.env_state_dim, dim)
        self._n_cls_tokens = len(inputs.cameras) if config.use_cls_token else 0
        if self._n_cls_tokens:
            self.encoder_cls_input_proj = nn.Linear(channels[0], dim)
        n_1d_tokens = 2 + (inputs.env_state_dim is not None) + self._n_cls_tokens
        self.encoder_1d_feature_pos_embed = nn.Embedding(n_1d_tokens, dim)

        # Camera grids: one shared 1x1 projection (as LeRobot), fixed 2D sinusoids per grid, plus a
        # learned embedding per camera so that the attention can tell the views apart.
        if inputs.cameras:
            self.encoder_img_feat_input_proj = nn.Conv2d(channels[0], dim, kernel_size=1)
            self.encoder_cam_embed = nn.Embedding(len(inputs.cameras), dim)
            sinusoids = [
                sinusoidal_position_embedding_2d(h, w, dim // 2).flatten(1).T for _, _, h, w in inputs.cameras
            ]
            camera_of_token = [
                torch.full((h * w,), index, dtype=torch.long)
                for index, (_, _, h, w) in enumerate(inputs.cameras)
            ]
            self.register_buffer("encoder_cam_feat_pos_embed", torch.cat(sinusoids), persistent=False)
            self.register_buffer("camera_token_index", torch.cat(camera_of_token), persistent=False)

        # Decoder: chunk_size learned queries (DETR object queries) over a zero input.
        self.decoder_pos_embed = nn.Embedding(config.chunk_size, dim)
        self.action_head = nn.Linear(dim, inputs.action_dim)

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier-uniform on the transformer's matrices, as the original code and LeRobot do.

        As there, this covers the encoder and decoder only; the CVAE encoder and the input/output
        projections keep PyTorch's default initialisation.
        """
        for p in chain(self.encoder.parameters(), self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    # ---------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Predict a normalised action chunk.

        Returns:
            ``(B, chunk_size, action_dim)`` normalised actions, and ``(mu, log_sigma_x2)`` (each
            ``(B, latent_dim)``; ``log_sigma_x2`` is ``2 log sigma``, as in the original code) when the
            CVAE encoder ran (``use_vae`` and training), else None.
        """
        self._check_batch(batch, with_targets=self.config.use_vae and self.training)
        state = batch[OBS_STATE]

        if self.config.use_vae and self.training:
            mu, log_sigma_x2 = self._encode_latent(state, batch[ACTION], batch[ACTION_IS_PAD])
            latent = mu + (log_sigma_x2 / 2).exp() * torch.randn_like(mu)  # reparameterisation
            latent_params: tuple[Tensor, Tensor] | None = (mu, log_sigma_x2)
        else:
            latent = state.new_zeros((state.shape[0], self.config.latent_dim))
            latent_params = None

        tokens, pos_embed = self._encoder_inputs(batch, latent)
        encoder_out = self.encoder(tokens, pos_embed=pos_embed)
        decoder_in = encoder_out.new_zeros(
            (encoder_out.shape[0], self.config.chunk_size, self.config.dim_model)
        )
        decoder_out = self.decoder(
            decoder_in,
            encoder_out,
            decoder_pos_embed=self.decoder_pos_embed.weight.unsqueeze(0),
            encoder_pos_embed=pos_embed,
        )
        return self.action_head(decoder_out), latent_params

    def _encode_latent(self, state: Tensor, action: Tensor, action_is_pad: Tensor) -> tuple[Tensor, Tensor]:
        """Run the CVAE encoder over [cls, state, actions]; padded actions are masked out of the keys."""
        batch_size = state.shape[0]
        tokens = torch.cat(
            [
                self.vae_encoder_cls_embed.weight.unsqueeze(0).expand(batch_size, -1, -1),
                self.vae_encoder_robot_state_input_proj(state).unsqueeze(1),
                self.vae_encoder_action_input_proj(action),
            ],
            dim=1,
        )
        never_pad = torch.zeros((batch_size, 2), dtype=torch.bool, device=action_is_pad.device)
        key_padding_mask = torch.cat([never_pad, action_is_pad], dim=1)
        cls_out = self.vae_encoder(
            tokens, pos_embed=self.vae_encoder_pos_enc.to(tokens.dtype), key_padding_mask=key_padding_mask
        )[:, 0]
        latent_pdf_params = self.vae_encoder_latent_output_proj(cls_out)
        return latent_pdf_params.split(self.config.latent_dim, dim=-1)

    def _encoder_inputs(self, batch: dict[str, Tensor], latent: Tensor) -> tuple[Tensor, Tensor]:
        """Assemble the encoder tokens ``(B, T, D)`` and their position embeddings ``(1, T, D)``."""
        one_d = [
            self.encoder_latent_input_proj(latent),
            self.encoder_robot_state_input_proj(batch[OBS_STATE]),
        ]
        if self.inputs.env_state_dim is not None:
            one_d.append(self.encoder_env_state_input_proj(batch[OBS_ENV_STATE]))
        # Cached features are often float16 (the store's default); compute in the head's own dtype.
        feature_dtype = self.encoder_latent_input_proj.weight.dtype
        if self._n_cls_tokens:
            cls_vectors = [batch[ACTInputs.cls_key(name)].to(feature_dtype) for name in self.inputs.camera_names]
            one_d.extend(self.encoder_cls_input_proj(vector) for vector in cls_vectors)
        tokens = [torch.stack(one_d, dim=1)]
        pos_embed = [self.encoder_1d_feature_pos_embed.weight]

        if self.inputs.cameras:
            for name in self.inputs.camera_names:
                grid = batch[ACTInputs.feature_key(name)].to(feature_dtype)
                grid = self.encoder_img_feat_input_proj(grid)  # (B, D, h, w)
                tokens.append(grid.flatten(2).transpose(1, 2))  # (B, h*w, D), row-major like the sinusoids
            camera_embed = self.encoder_cam_embed(self.camera_token_index)
            pos_embed.append(self.encoder_cam_feat_pos_embed + camera_embed)

        tokens_t = torch.cat(tokens, dim=1)
        return tokens_t, torch.cat(pos_embed, dim=0).unsqueeze(0).to(tokens_t.dtype)

    def _check_batch(self, batch: dict[str, Tensor], with_targets: bool) -> None:
        """Fail early, naming the key, instead of with a shape error deep inside attention.

        ``with_targets`` also requires ``action`` / ``action_is_pad``. Only static (non-batch)
        dimensions are checked, so this costs nothing at export time.
        """
        expected: dict[str, tuple[int, ...]] = {OBS_STATE: (self.inputs.state_dim,)}
        for name, channels, height, width in self.inputs.cameras:
            expected[ACTInputs.feature_key(name)] = (channels, height, width)
            if self._n_cls_tokens:
                expected[ACTInputs.cls_key(name)] = (channels,)
        if self.inputs.env_state_dim is not None:
            expected[OBS_ENV_STATE] = (self.inputs.env_state_dim,)
        if with_targets:
            expected[ACTION] = (self.config.chunk_size, self.inputs.action_dim)
            expected[ACTION_IS_PAD] = (self.config.chunk_size,)

        missing = [key for key in expected if key not in batch]
        if missing:
            why = " (targets are needed by compute_loss, and by forward when training the CVAE)"
            raise ValueError(f"ACT head batch is missing {', '.join(missing)}{why if with_targets else ''}.")
        for key, shape in expected.items():
            if tuple(batch[key].shape[1:]) != shape:
                raise ValueError(
                    f"ACT head input {key!r} has shape {tuple(batch[key].shape)}; expected (B, "
                    f"{', '.join(map(str, shape))})."
                )
        if with_targets and batch[ACTION_IS_PAD].dtype != torch.bool:
            raise ValueError(f"{ACTION_IS_PAD!r} must be a bool tensor. Got {batch[ACTION_IS_PAD].dtype}.")

    # ---------------------------------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
        """ACT's training loss: masked L1 on the chunk plus ``kl_weight`` times the CVAE KL divergence.

        The L1 term is the mean absolute error over the non-padded action elements only, so a chunk
        that runs past the episode end counts as much per real step as any other. The KL term is
        ``KL(N(mu, sigma^2) || N(0, I))`` summed over latent dimensions and averaged over the batch
        (Kingma & Welling, App. B); it is 0 when the CVAE encoder did not run (``use_vae`` off, or
        eval mode, where the loss is that of the zero latent the live policy uses).

        ``reduction="none"`` returns each sample's loss instead, ``(B,)``: its own masked L1 (over its
        non-padded elements) plus ``kl_weight`` times its KL term, for a caller that weighs samples
        (LeRobot's ``lerobot-train`` with sample weighting calls ``forward(batch, reduction="none")``).

        Returns:
            The scalar loss to back-propagate (or the per-sample losses), and ``{"l1_loss", "kld_loss",
            "loss"}`` (batch means, as with ``reduction="mean"``) as detached 0-dim tensors on the batch's
            device. They stay tensors so that computing the loss never waits for the device: the caller
            reads them (``float(info["loss"])``, a synchronisation on CUDA) when it needs a number, and
            a training loop sums them on the device between records.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'. Got {reduction!r}.")
        self._check_batch(batch, with_targets=True)
        actions_hat, latent_params = self(batch)

        valid = ~batch[ACTION_IS_PAD].unsqueeze(-1)  # (B, chunk, 1)
        abs_error = torch.where(valid, F.l1_loss(actions_hat, batch[ACTION], reduction="none"), 0.0)
        valid_per_sample = valid.sum(dim=(1, 2)) * abs_error.shape[-1]  # (B,)
        l1_loss = abs_error.sum() / valid_per_sample.sum().clamp_min(1)

        if latent_params is None:
            kld_per_sample = l1_loss.new_zeros(actions_hat.shape[0])
        else:
            mu, log_sigma_x2 = latent_params
            kld_per_sample = (-0.5 * (1 + log_sigma_x2 - mu.pow(2) - log_sigma_x2.exp())).sum(-1)
        kld_loss = kld_per_sample.mean()

        loss = l1_loss + self.config.kl_weight * kld_loss
        info = {"l1_loss": l1_loss.detach(), "kld_loss": kld_loss.detach(), "loss": loss.detach()}
        if reduction == "none":
            l1_per_sample = abs_error.sum(dim=(1, 2)) / valid_per_sample.clamp_min(1)
            return l1_per_sample + self.config.kl_weight * kld_per_sample, info
        return loss, info


def act_optimizer(params: list[Tensor] | list[dict], config: ACTConfig) -> torch.optim.AdamW:
    """LeRobot ACT's optimiser: AdamW at ``optimizer_lr`` with ``optimizer_weight_decay``, fused.

    Fused means one kernel updates every parameter (instead of several per parameter), on the CPU
    too, and the update can be skipped on the device by a ``found_inf`` flag, as a GradScaler does:
    how the training loop refuses a non-finite step without reading the gradient norm every step.
    """
    return torch.optim.AdamW(params, lr=config.optimizer_lr, weight_decay=config.optimizer_weight_decay, fused=True)
