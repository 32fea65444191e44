"""Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"): ``weight * tanh(alpha * x) + bias``.

No statistics at all: a learned scalar ``alpha`` squashes each feature, and per-channel ``weight``
/ ``bias`` rescale it, so a token's output never depends on other tokens, the batch or padding.
``alpha`` starts at ``dyt_alpha_init`` (the paper's default 0.5); it is not called ``weight`` so
that the model's norm initialisation (``weight`` to 1, ``bias`` to 0) leaves it to
``hfx_init_weights``, which sets it only where no checkpoint value was loaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hfx.registry import Component


class DynamicTanh(nn.Module):
    def __init__(self, hidden_size: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tanh in at least fp32: under bf16 its saturation region would round away small differences.
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        x = torch.tanh(self.alpha.to(dtype) * hidden_states.to(dtype))
        return (x * self.weight.to(dtype) + self.bias.to(dtype)).to(hidden_states.dtype)

    def hfx_init_weights(self, config) -> None:
        from transformers import initialization as init

        init.constant_(self.alpha, self.alpha_init)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}"


def build(config, hidden_size: int) -> nn.Module:
    return DynamicTanh(hidden_size, alpha_init=config.dyt_alpha_init)


def validate(config) -> None:
    value = config.dyt_alpha_init
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"dyt_alpha_init={value!r} is invalid; valid values: a finite number > 0 (paper default 0.5).")


COMPONENT = Component(
    kind="norm",
    name="dyt",
    factory=build,
    description="Dynamic Tanh, weight * tanh(alpha * x) + bias with a learned scalar alpha (no statistics).",
    config_defaults={"dyt_alpha_init": 0.5},
    validate_config=validate,
)
