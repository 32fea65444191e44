"""The position-wise feed-forward network: Linear -> activation -> Linear, applied to every token."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from hfx.registry import Component


class DenseFeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        # Plain nn.Linear on purpose: bitsandbytes only quantises modules whose type is exactly nn.Linear.
        self.up_proj = nn.Linear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


def build(config) -> nn.Module:
    return DenseFeedForward(config.hidden_size, config.intermediate_size, config.hidden_act)


def validate(config) -> None:
    if config.hidden_act not in ACT2FN:
        raise ValueError(f"hidden_act={config.hidden_act!r} is unknown; valid: {sorted(ACT2FN)}.")


COMPONENT = Component(
    kind="ffn",
    name="dense",
    factory=build,
    description="Two-layer position-wise feed-forward network (hidden_act, intermediate_size).",
    validate_config=validate,
)
