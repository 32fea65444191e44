"""RMSNorm: scale by the root mean square of each token's features, no centring, no bias."""

from __future__ import annotations

import torch
from torch import nn

from hfx.registry import Component


class HfxRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Accumulate in fp32 so bf16/fp16 activations do not lose the mean of squares.
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def build(config, hidden_size: int) -> nn.Module:
    return HfxRMSNorm(hidden_size, eps=config.layer_norm_eps)


COMPONENT = Component(
    kind="norm",
    name="rmsnorm",
    factory=build,
    description="RMSNorm (no mean subtraction, no bias) over each token's features (eps: layer_norm_eps).",
)
