"""Rotary position embedding (RoPE): queries and keys are rotated by position-dependent angles,
so their dot product depends on relative position only."""

from __future__ import annotations

import torch
from torch import nn

from hfx.registry import Component


class RotaryPositionEncoding(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)

    @torch.no_grad()
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        # Frequencies are recomputed rather than buffered: a non-persistent buffer would be left
        # uninitialised when from_pretrained builds the model on the meta device.
        exponents = torch.arange(0, self.head_dim, 2, device=inputs_embeds.device, dtype=torch.float32) / self.head_dim
        inv_freq = self.base**-exponents
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return inputs_embeds, (angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype))


def build(config) -> nn.Module:
    return RotaryPositionEncoding(config.hidden_size // config.num_attention_heads, config.rope_theta)


def validate(config) -> None:
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        raise ValueError(f"rotary position embeddings need an even head dimension, got {head_dim}.")


COMPONENT = Component(
    kind="position",
    name="rotary",
    factory=build,
    description="Rotary embedding of queries and keys (base: rope_theta); relative, any length.",
    validate_config=validate,
)
