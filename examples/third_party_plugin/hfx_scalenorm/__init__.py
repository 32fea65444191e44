"""ScaleNorm: ``g * x / max(||x||, eps)`` with one learned scalar ``g`` (initialised to sqrt(hidden_size)).

An example of a third-party hfx plugin: a module, a ``Component``, and an entry point in
``pyproject.toml``. After ``pip install``, ``HfxConfig(norm_type="scalenorm")`` selects it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hfx.registry import Component


class ScaleNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        # A tensor of shape (1,), not a bare scalar: hfx resets every norm's `weight` to ones at init,
        # so the sqrt(d) scale lives in the forward and the parameter is a multiplier on it.
        self.weight = nn.Parameter(torch.ones(1))
        self.scale = math.sqrt(hidden_size)
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        norm = hidden_states.float().norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (hidden_states.float() / norm * (self.weight * self.scale)).to(hidden_states.dtype)


def build(config, hidden_size: int) -> nn.Module:
    return ScaleNorm(hidden_size, eps=config.scalenorm_eps)


def validate(config) -> None:
    if config.scalenorm_eps <= 0:
        raise ValueError(f"scalenorm_eps must be > 0, got {config.scalenorm_eps}.")


COMPONENT = Component(
    kind="norm",
    name="scalenorm",
    factory=build,
    description="ScaleNorm: one learned scale times the unit-length token vector (eps: scalenorm_eps).",
    config_defaults={"scalenorm_eps": 1e-5},
    validate_config=validate,
)
