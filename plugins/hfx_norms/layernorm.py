"""LayerNorm: normalise each token over its features (independent of batch size and padding)."""

from __future__ import annotations

import torch
from torch import nn

from hfx.registry import Component


class HfxLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the hfx norm signature; the padding mask is irrelevant per token."""

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(hidden_states)


def build(config, hidden_size: int) -> nn.Module:
    return HfxLayerNorm(hidden_size, eps=config.layer_norm_eps)


COMPONENT = Component(
    kind="norm",
    name="layernorm",
    factory=build,
    description="LayerNorm over the hidden features of each token (eps: layer_norm_eps).",
)
