"""Sentence embeddings from any encoder: mean over real tokens, or the first ([CLS]) token.

Works for hfx models and stock encoders alike, bare or with a head: a model with a head is
reduced to its ``base_model`` so the embedding is the last hidden state, never head logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS = ("mean", "cls")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is invalid; valid values: {list(POOLINGS)}.")


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The bare transformer under a head (``model.base_model``), or the model itself."""
    return getattr(model, "base_model", model)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H); ``mean`` averages the tokens where ``attention_mask`` is 1."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], pooling: str = "mean", batch_size: int = 32,
                max_length: int | None = None) -> torch.Tensor:
    """(len(texts), hidden) float32 embeddings, in the order of ``texts``.

    Texts are batched in order of length so little compute goes into padding; padding never
    changes a result because pooling and attention both ignore it.
    """
    check_pooling(pooling)
    encoder = encoder_of(model)
    encoder.eval()
    device = next(encoder.parameters()).device
    max_length = max_length or min(tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", 512))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state
        out[rows] = pool(hidden, batch["attention_mask"], pooling).float().cpu()
    return out
