"""Which tokens are real: a per-token bool mask from the attention mask a model was given.

Norms that pool over tokens (``norm_type="batchnorm"``) need to know which positions hold real
tokens. Callers describe that in one of two ways:

- a **2-D** mask ``(batch, keys)``: 1/True on real tokens, 0/False on padding (tokenizers, collators);
- a **4-D** mask ``(batch, 1 or heads, queries, keys)`` (or 3-D without the head axis): which key each
  query may attend to, either boolean (True: attend) or additive float (0: attend, a large negative
  value such as ``finfo.min``, ``-inf`` or ``-10000``: blocked). Packed rows (several blocks in one
  sequence, as the evaluation scorer builds them) and custom causal masks come this way.

From a 4-D mask a position of the current step is **padding** when

1. no query may attend to it (its key column is blocked everywhere: the usual key-padding form), or
2. it attends only to itself and no other query attends to it (the "idle" positions of a packed row,
   which attend to themselves only so that no softmax row is empty).

Everything else is real. Rule 2 cannot tell padding from a sequence of exactly one token that is
alone in its row; pass a 2-D mask when that distinction matters.
"""

from __future__ import annotations

import torch

# Additive masks block with finfo(dtype).min, -inf, or (older BERT code) -10000; allowed entries are 0
# or a small bias. Anything at or below this counts as blocked.
ADDITIVE_BLOCKED_AT = -1e4


def allowed_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor of the same shape: True where attention is allowed."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return attention_mask > ADDITIVE_BLOCKED_AT
    return attention_mask != 0


def real_token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Bool ``(batch, seq_len)`` with True on the real tokens of the current step, or None (all real).

    ``seq_len`` is the number of tokens in this forward; with a KV cache the mask also covers earlier
    positions, and the current tokens are its last ``seq_len`` keys.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:].bool()
    if attention_mask.dim() not in (3, 4):
        raise ValueError(
            f"attention_mask must be 2-D (batch, seq), 3-D (batch, q, k) or 4-D (batch, heads, q, k); "
            f"got shape {tuple(attention_mask.shape)}."
        )
    allowed = allowed_from_mask(attention_mask)
    if allowed.dim() == 4:
        allowed = allowed.any(dim=1)  # a key any head may see
    batch, queries, keys = allowed.shape
    if keys < seq_len:
        raise ValueError(
            f"attention_mask covers {keys} key positions but the input has {seq_len} tokens "
            f"(mask shape {tuple(attention_mask.shape)})."
        )
    current = allowed[:, :, keys - seq_len :]  # (batch, queries, seq_len): who may read each current token
    attended = current.any(dim=1)
    if queries != seq_len:
        # A broadcast key mask (batch, 1, 1, keys): only rule 1 applies.
        return attended
    eye = torch.eye(seq_len, dtype=torch.bool, device=allowed.device)
    read_by_other = (current & ~eye).any(dim=1)
    own_key = torch.zeros(queries, keys, dtype=torch.bool, device=allowed.device)
    own_key[:, keys - seq_len :] = eye
    reads_other = (allowed & ~own_key).any(dim=2)
    return attended & (read_by_other | reads_other)


__all__ = ["real_token_mask", "allowed_from_mask", "ADDITIVE_BLOCKED_AT"]
