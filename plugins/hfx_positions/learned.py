"""Learned absolute position embeddings (BERT, GPT-2): one trained vector per position."""

from __future__ import annotations

import torch
from torch import nn

from hfx.registry import Component


class LearnedPositionEmbedding(nn.Module):
    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        limit = self.position_embeddings.num_embeddings
        if position_ids.numel() and int(position_ids.max()) >= limit:
            raise ValueError(
                f"Position {int(position_ids.max())} is beyond max_position_embeddings={limit} of the learned "
                "position embeddings; use a shorter input, or position_embedding_type='sinusoidal'/'rotary'."
            )
        return inputs_embeds + self.position_embeddings(position_ids), None


def build(config) -> nn.Module:
    return LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)


COMPONENT = Component(
    kind="position",
    name="learned",
    factory=build,
    description="Trained absolute position embeddings, up to max_position_embeddings.",
)
