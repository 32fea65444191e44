"""Sinusoidal encoding: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

Computed from the position ids on every call, so it has no parameters, no maximum length, and
nothing to save: any offset k is a fixed linear map of it, which is why relative position is
recoverable.
"""

from __future__ import annotations

import torch
from torch import nn

from hfx.registry import Component


def sinusoidal_table(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) encodings for integer positions, exactly the formula above, in fp32."""
    pair_index = torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = torch.pow(10000.0, -pair_index / dim)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    table = torch.zeros(*position_ids.shape, dim, device=position_ids.device, dtype=torch.float32)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return table


class SinusoidalPositionEncoding(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        table = sinusoidal_table(position_ids, self.hidden_size).to(inputs_embeds.dtype)
        return inputs_embeds + table, None


def build(config) -> nn.Module:
    return SinusoidalPositionEncoding(config.hidden_size)


COMPONENT = Component(
    kind="position",
    name="sinusoidal",
    factory=build,
    description="Fixed sinusoidal absolute encoding (Vaswani et al.), any length, no parameters.",
)
