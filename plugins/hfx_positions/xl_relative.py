"""Transformer-XL relative position encoding (Dai et al. 2019, section 3.3).

The score of query i and key j is

    (q_i + u)^T k_j  +  (q_i + v)^T W_r R_{i-j}

with R the sinusoid of the distance i - j (XL's layout: sines then cosines), W_r a per-block projection of it
and u, v per-head global biases (content and position), all scaled by 1/sqrt(head_dim). Nothing is added to
the embeddings, so a memory position keeps its meaning in the next segment.

The standard attention functions do not compute the second term, so blocks score with the eager code below
(XL's relative shift done as a gather over the distances that occur); ``attention_type`` must be ``"eager"``.
Per-block parameters (``r_proj``, ``r_w_bias`` = u, ``r_r_bias`` = v) live on each attention layer, untied
across layers (as in transformers' former TransfoXL default ``untie_r=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from hfx.attention import attend, repeat_kv
from hfx.registry import Component

ATTENTION = ("eager",)


@dataclass(frozen=True)
class RelativePositions:
    """Handed to the blocks in place of rotary (cos, sin): the query positions of this forward."""

    positions: torch.Tensor  # (1 or batch, T)


def xl_sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) fp32: [sin(d * f), cos(d * f)] with f = 10000^(-2k/dim), k < dim/2."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.to(torch.float32)[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class XLRelativePositionEncoding(nn.Module):
    """No parameters and nothing added to the embeddings: the blocks score relative distances themselves."""

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        return inputs_embeds, RelativePositions(position_ids)


class XLRelativeScores(nn.Module):
    """One block's W_r, u and v, and the eager attention that uses them."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.r_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # u
        self.r_r_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # v

    @torch.no_grad()
    def hfx_init_weights(self, config) -> None:
        init.normal_(self.r_w_bias, mean=0.0, std=config.initializer_range)
        init.normal_(self.r_r_bias, mean=0.0, std=config.initializer_range)

    def forward(self, module, query, key, value, attention_mask, query_positions, key_positions, scaling, dropout=0.0):
        """query (B, H, T, D), key/value (B, H_kv, K, D), positions (1 or B, T) and (1 or B, K)."""
        n_rep = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        u = self.r_w_bias.to(query.dtype)[None, :, None, :]
        v = self.r_r_bias.to(query.dtype)[None, :, None, :]
        content = torch.matmul(query + u, key.transpose(2, 3))  # (B, H, T, K)
        distance = query_positions[..., :, None] - key_positions[..., None, :]  # (1 or B, T, K)
        low, high = torch.stack(torch.aminmax(distance)).tolist()  # one host sync for the table's range
        table = xl_sinusoid(torch.arange(low, high + 1, device=query.device), self.hidden_size).to(query.dtype)
        r = self.r_proj(table).view(-1, self.num_heads, self.head_dim)  # (L, H, D)
        by_distance = torch.einsum("bhtd,lhd->bhtl", query + v, r)  # (B, H, T, L)
        index = (distance - low)[:, None].expand(by_distance.shape[0], self.num_heads, -1, -1)
        position = torch.gather(by_distance, -1, index)  # XL's relative shift, as a gather
        return attend(module, (content + position) * scaling, value, attention_mask, dropout)


def build(config) -> nn.Module:
    return XLRelativePositionEncoding()


# hfx attention layers built with this position type call it for their per-block scoring module.
build.relative_attention = XLRelativeScores


def validate(config) -> None:
    if config.hidden_size % 2:
        raise ValueError(f"hidden_size={config.hidden_size!r} is invalid for xl_relative; valid values: an even size.")
    attention = config.attention_type
    if attention not in ATTENTION:
        raise ValueError(
            f"attention_type={attention!r} is invalid with position_embedding_type='xl_relative'; valid values: "
            f"{list(ATTENTION)} (its score has a position term the other backends do not compute)."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "position_embedding_type='xl_relative' is invalid for an encoder-decoder model; valid values: "
            "'rotary', 'learned', 'sinusoidal'."
        )


COMPONENT = Component(
    kind="position",
    name="xl_relative",
    factory=build,
    description="Transformer-XL relative encoding: sinusoid R_{i-j}, per-block W_r and biases u, v (eager attention).",
    validate_config=validate,
)
