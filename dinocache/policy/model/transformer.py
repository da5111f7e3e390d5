"""ACT's transformer: DETR-style encoder and decoder layers and the sinusoidal position embeddings.

As in LeRobot's ``modeling_act.py`` (same module names and parameter names, so that state dicts
and readers map one to one): position embeddings are added to queries and keys at every layer,
never to values; tensors here are batch-first. The head that assembles them is
:class:`~dinocache.policy.model.act.ACTHead`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dinocache.policy.model.config import ACTConfig

__all__ = [
    "ACTEncoder",
    "ACTEncoderLayer",
    "ACTDecoder",
    "ACTDecoderLayer",
    "create_sinusoidal_pos_embedding",
    "sinusoidal_position_embedding_2d",
]


# --------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------


def create_sinusoidal_pos_embedding(num_positions: int, dimension: int) -> Tensor:
    """1D sinusoidal position embeddings as in "Attention Is All You Need", ``(num_positions, dimension)``.

    Even channels are ``sin(pos / 10000^(2i/d))``, odd channels the matching ``cos``; the same table
    LeRobot builds for the CVAE encoder input (computed in float64, returned as float32).
    """
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = 2 * torch.div(torch.arange(dimension), 2, rounding_mode="floor") / dimension
    angles = position / torch.pow(10000.0, exponent.to(torch.float64))
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table.float()


def sinusoidal_position_embedding_2d(height: int, width: int, dimension: int) -> Tensor:
    """ACT's 2D sinusoidal embedding of an ``height x width`` grid, ``(2 * dimension, height, width)``.

    Numerically the same as LeRobot's ``ACTSinusoidalPositionEmbedding2d(dimension)`` applied to a
    feature map of that size: row and column indices run over ``1..H`` / ``1..W``, are scaled into
    ``(0, 2*pi]``, and each gets ``dimension`` interleaved sin/cos channels; the row channels come
    first. Here it is a function of the grid size alone, because the head knows every camera's grid
    size when it is built and can keep the result as a constant buffer (nothing to trace at export).
    """
    if dimension % 2:
        raise ValueError(f"The 2D sinusoidal embedding needs an even per-axis dimension. Got {dimension}.")
    eps = 1e-6  # kept from the original code, where it guarded a masked cumulative sum
    rows = torch.arange(1, height + 1, dtype=torch.float32) / (height + eps) * (2 * math.pi)
    cols = torch.arange(1, width + 1, dtype=torch.float32) / (width + eps) * (2 * math.pi)
    inverse_frequency = 10000 ** (
        2 * torch.div(torch.arange(dimension, dtype=torch.float32), 2, rounding_mode="floor") / dimension
    )

    def embed(positions: Tensor) -> Tensor:  # (n,) -> (n, dimension), sin/cos interleaved
        angles = positions.unsqueeze(-1) / inverse_frequency
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    row_embed = embed(rows).unsqueeze(1).expand(height, width, dimension)
    col_embed = embed(cols).unsqueeze(0).expand(height, width, dimension)
    return torch.cat((row_embed, col_embed), dim=-1).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# Transformer blocks (DETR-style: position embeddings are added to queries and keys at every layer,
# never to values)
# --------------------------------------------------------------------------------------------------


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    return {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}[name]


def _with_pos(x: Tensor, pos_embed: Tensor | None) -> Tensor:
    return x if pos_embed is None else x + pos_embed


class _TransformerLayer(nn.Module):
    """What encoder and decoder layers share: the feed-forward block and the residual wiring."""

    def __init__(self, config: ACTConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        # GLU halves its input, so its first projection is twice as wide. (LeRobot accepts "glu"
        # but keeps the width, which fails with a shape error on the first forward.)
        expansion = 2 if config.feedforward_activation == "glu" else 1
        self.linear1 = nn.Linear(config.dim_model, expansion * config.dim_feedforward)
        self.dropout = nn.Dropout(config.dropout)
        self.linear2 = nn.Linear(config.dim_feedforward, config.dim_model)
        self.activation = _activation(config.feedforward_activation)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _residual(
        self, x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.LayerNorm, dropout: nn.Dropout
    ) -> Tensor:
        """``x + f(norm(x))`` with ``pre_norm``, else ``norm(x + f(x))`` (the original ACT/DETR)."""
        if self.pre_norm:
            return x + dropout(sublayer(norm(x)))
        return norm(x + dropout(sublayer(x)))


class ACTEncoderLayer(_TransformerLayer):
    """Self-attention then feed-forward, each in a residual block."""

    def __init__(self, config: ACTConfig):
        super().__init__(config)
        self.self_attn = nn.MultiheadAttention(
            config.dim_model, config.n_heads, dropout=config.dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(config.dim_model)
        self.norm2 = nn.LayerNorm(config.dim_model)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, pos_embed: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """``x``: (B, T, D); ``pos_embed`` broadcasts to it; ``key_padding_mask``: (B, T), True = ignore."""

        def attend(h: Tensor) -> Tensor:
            q = k = _with_pos(h, pos_embed)
            return self.self_attn(q, k, h, key_padding_mask=key_padding_mask, need_weights=False)[0]

        x = self._residual(x, attend, self.norm1, self.dropout1)
        return self._residual(x, self._feed_forward, self.norm2, self.dropout2)


class ACTDecoderLayer(_TransformerLayer):
    """Self-attention over the action queries, cross-attention to the encoder, then feed-forward."""

    def __init__(self, config: ACTConfig):
        super().__init__(config)
        self.self_attn = nn.MultiheadAttention(
            config.dim_model, config.n_heads, dropout=config.dropout, batch_first=True
        )
        self.multihead_attn = nn.MultiheadAttention(
            config.dim_model, config.n_heads, dropout=config.dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(config.dim_model)
        self.norm2 = nn.LayerNorm(config.dim_model)
        self.norm3 = nn.LayerNorm(config.dim_model)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.dropout3 = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        encoder_out: Tensor,
        decoder_pos_embed: Tensor | None = None,
        encoder_pos_embed: Tensor | None = None,
    ) -> Tensor:
        """``x``: (B, chunk, D) queries; ``encoder_out``: (B, T, D); position embeddings broadcast to them."""

        def self_attend(h: Tensor) -> Tensor:
            q = k = _with_pos(h, decoder_pos_embed)
            return self.self_attn(q, k, h, need_weights=False)[0]

        def cross_attend(h: Tensor) -> Tensor:
            return self.multihead_attn(
                _with_pos(h, decoder_pos_embed),
                _with_pos(encoder_out, encoder_pos_embed),
                encoder_out,
                need_weights=False,
            )[0]

        x = self._residual(x, self_attend, self.norm1, self.dropout1)
        x = self._residual(x, cross_attend, self.norm2, self.dropout2)
        return self._residual(x, self._feed_forward, self.norm3, self.dropout3)


class ACTEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm when ``pre_norm`` (which leaves it un-normalised)."""

    def __init__(self, config: ACTConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([ACTEncoderLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.dim_model) if config.pre_norm else nn.Identity()

    def forward(
        self, x: Tensor, pos_embed: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos_embed=pos_embed, key_padding_mask=key_padding_mask)
        return self.norm(x)


class ACTDecoder(nn.Module):
    """A stack of decoder layers followed by a LayerNorm.

    Every layer is run and the last one's output is used. The original ACT code built
    ``n_decoder_layers`` (7) layers but returned the intermediate output of the first one only, so
    six layers were dead weight (tonyzhaozh/act#25); LeRobot sidesteps that by defaulting to one layer.
    Here ``n_decoder_layers > 1`` means what it says, so do not expect to reproduce the original
    7-layer numbers by setting 7.
    """

    def __init__(self, config: ACTConfig):
        super().__init__()
        self.layers = nn.ModuleList([ACTDecoderLayer(config) for _ in range(config.n_decoder_layers)])
        self.norm = nn.LayerNorm(config.dim_model)

    def forward(
        self,
        x: Tensor,
        encoder_out: Tensor,
        decoder_pos_embed: Tensor | None = None,
        encoder_pos_embed: Tensor | None = None,
    ) -> Tensor:
        for layer in self.layers:
            x = layer(
                x, encoder_out, decoder_pos_embed=decoder_pos_embed, encoder_pos_embed=encoder_pos_embed
            )
        return self.norm(x)
