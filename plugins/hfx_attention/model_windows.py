"""transformers' own sliding-window models under ``attn_implementation="hfx_sliding_window"``.

Mistral, Qwen2, Gemma2/3, ModernBERT (and every model built the same way) call the attention function
with a ``sliding_window`` keyword: the layer's window, or ``None`` on a full-attention layer. The value
follows flash-attention's convention, which transformers' sdpa masks agree with model by model, so one
rule serves them all: with ``s = sliding_window``, query ``q`` may attend key ``k`` when

- causal layers (``module.is_causal``; Mistral, Qwen2, Gemma): ``q - s < k <= q``, i.e. the current
  token and the ``s - 1`` before it (transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - s``);
- bidirectional layers: ``|q - k| <= s - 1``. ModernBERT passes ``config.sliding_window + 1``
  (``local_attention // 2 + 1``), which gives ``|q - k| <= local_attention // 2``
  (``sliding_window_bidirectional_overlay``, inclusive); Gemma3 with ``use_bidirectional_attention``
  passes ``config.sliding_window``, giving its exclusive ``|q - k| < sliding_window``;
- ``sliding_window=None``: full causal / bidirectional attention.

Padded keys (the 2-D mask from ``common.padding_mask``) are never attended. Packed rows (no padding
mask, ``position_ids`` restarting, or flash-style ``cu_seq_lens_q``) keep each sequence to itself, as
transformers' sdpa mask does for packed position ids. With a KV cache the keys are the last ones seen
(``DynamicSlidingWindowLayer`` keeps ``s - 1`` of them) and the queries are the last keys.

No dense ``(q, kv)`` mask is built: sliding layers go through :func:`banded_attention` (O(n * s)),
full layers through SDPA's ``is_causal`` or a key-padding row mask where that is exact, else through
query tiles that each see only the keys they may attend.

Refused, with what to use instead: logit soft-capping (``softcap``, Gemma2's
``attn_logit_softcapping``), attention sinks (``s_aux``, gpt-oss style), position biases, paged caches
and cross-attention. Not seen (as with flash-attention, only the padding mask reaches the backend): mask
overlays a model adds through ``or_mask_function`` / ``block_sequence_ids`` (Gemma3's image-token blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_self_attention, expand_kv, is_causal, key_padding, sequence_ids
from .sliding_window import banded_attention

NAME = "hfx_sliding_window"
# Query rows per tile on the tiled path: enough rows that a tile is one efficient SDPA call, few
# enough that a tile's (rows, keys) mask stays small next to the keys themselves.
TILE_ROWS = 256

_REFUSED = {
    "softcap": "logit soft-capping (Gemma2's attn_logit_softcapping)",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
}


def model_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry for models that pass ``sliding_window``: query (B, H, q, d),
    key/value (B, H_kv, kv, d) -> ((B, q, H, d), None)."""
    window = kwargs.pop("sliding_window")
    check_supported(kwargs)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{NAME}: sliding_window must be a positive integer or None (full attention), got {window!r}.")
    causal = is_causal(module, kwargs)
    check_self_attention(query, key, causal, NAME)
    batch, _, length, head_dim = query.shape
    kv_length = key.shape[2]
    keep = None if attention_mask is None else key_padding(attention_mask, batch, kv_length, query.device, NAME)
    # Packed rows only without a padding mask, as transformers' sdpa mask reads packed position_ids.
    segments = None if keep is not None else sequence_ids(kwargs, batch, length, kv_length, query.device, NAME)
    key, value = expand_kv(query, key, value, NAME)
    scaling = head_dim**-0.5 if scaling is None else scaling
    half = None if window is None or window - 1 >= kv_length - 1 else window - 1  # a window covering all keys is full
    if half is not None:
        if keep is None:
            keep = torch.ones(batch, kv_length, dtype=torch.bool, device=query.device)
        return banded_attention(query, key, value, keep, None, half, causal, scaling, dropout, segments=segments), None
    if segments is None:
        out = full_attention(query, key, value, keep, causal, scaling, dropout)
        if out is not None:
            return out, None
    return tiled_attention(query, key, value, keep, segments, causal, scaling, dropout), None


def check_supported(kwargs: dict) -> None:
    """Options that change the scores in ways the band does not reproduce: one clear error, before any work."""
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            given = kwargs[name]
            shown = f"a tensor of shape {tuple(given.shape)}" if isinstance(given, torch.Tensor) else repr(given)
            raise ValueError(
                f"{NAME} does not implement {what}: the model passed {name}={shown}. Load it with "
                "attn_implementation='eager' (or 'sdpa' where that supports it), or disable the option in its config."
            )
    if kwargs.get("cache") is not None:
        raise ValueError(
            f"{NAME} does not support paged KV caches (continuous batching got cache={type(kwargs['cache']).__name__}); "
            "use attn_implementation='sdpa' or 'paged|sdpa' there."
        )


def full_attention(query, key, value, keep, causal: bool, scaling: float, dropout: float):
    """Full attention without an (n, kv) mask where SDPA can express it exactly; None where it cannot."""
    length, kv_length = query.shape[2], key.shape[2]
    if causal and length > 1:
        # queries are the last `length` keys; SDPA's is_causal aligns them at the top-left, so only n == kv works
        right_padded = keep is None or bool((keep.long().cumsum(-1) == torch.arange(1, kv_length + 1, device=keep.device)).eq(keep).all())
        if length != kv_length or not right_padded:
            return None
        # Right padding only: a real query's earlier keys are all real; padded rows are don't-care.
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    else:
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def tiled_attention(query, key, value, keep, segments, causal: bool, scaling: float, dropout: float):
    """Exact full attention by query tiles, each against the contiguous key range it may reach.

    Allowed (q, k): k real (``keep``), same packed sequence (``segments``), causal: k <= q. Queries are
    the last ``n`` of the ``kv`` keys. Memory per tile: a (rows, reach) mask, never (n, kv).
    """
    batch, heads, length, head_dim = query.shape
    kv_length = key.shape[2]
    offset = kv_length - length
    device = query.device
    if segments is not None:
        # each query's sequence spans keys [first, end): packed rows have no cache, so positions = indices
        index = torch.arange(length, device=device).expand(batch, -1)
        boundary = segments[:, 1:] != segments[:, :-1]
        first = torch.cummax(torch.where(F.pad(boundary, (1, 0), value=True), index, 0), dim=-1).values
        last = torch.where(F.pad(boundary, (0, 1), value=True), index, length - 1)
        end = torch.flip(torch.cummin(torch.flip(last, [-1]), dim=-1).values, [-1]) + 1
    outputs = []
    for start in range(0, length, TILE_ROWS):
        stop = min(start + TILE_ROWS, length)
        lo, hi = 0, (stop + offset if causal else kv_length)
        if segments is not None:
            lo, hi = int(first[:, start].min()), min(hi, int(end[:, stop - 1].max()))
        allowed = torch.ones(1, 1, stop - start, hi - lo, dtype=torch.bool, device=device)
        if causal:
            q_pos = torch.arange(start + offset, stop + offset, device=device)[:, None]
            allowed = allowed & (torch.arange(lo, hi, device=device) <= q_pos)
        if keep is not None:
            allowed = allowed & keep[:, None, None, lo:hi]
        if segments is not None:
            allowed = allowed & (segments[:, None, start:stop, None] == segments[:, None, None, lo:hi])
        mask = None if bool(allowed.all()) else allowed
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop], key[:, :, lo:hi], value[:, :, lo:hi], attn_mask=mask, dropout_p=dropout, scale=scaling
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)
