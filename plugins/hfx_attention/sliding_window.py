"""Longformer-style attention: a sliding window around each token plus global tokens.

Semantics (Longformer's, for any model):

- ``attention_window`` is the TOTAL window and must be even: token i attends to j when
  |i - j| <= attention_window / 2; causal: the current token and the attention_window / 2 before it.
  One value for all layers or one per layer.
- global tokens (``global_attention_mask`` forward argument, 1 = global, and/or the token ids in
  ``config.global_attention_token_ids``) attend to every key and are attended by every query
  (causal: only by queries at or after them); each key is counted once.
- padded keys are never attended; outputs at padded query positions are meaningless.

How: queries are cut into tiles of ``chunk`` rows; each tile sees one strided view of the keys,
``chunk + attention_window`` wide, and the whole stack of tiles goes through SDPA as one batch. Memory is
O(n * attention_window); no (n, n) tensor exists. Global keys are appended to every tile, global queries
are one dense row each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfx.registry import Component

from .common import (
    check_self_attention,
    expand_kv,
    global_flags,
    global_index,
    global_rows,
    is_causal,
    key_padding,
    layer_setting,
    padding_mask,
    scatter_rows,
    sdpa_tiles,
    sequence_ids,
    with_global_keys,
)

NAME = "hfx_sliding_window"
DEFAULT_WINDOW = 512
# Query rows per tile: at least half a window (so each tile wastes at most half of its columns), and
# large enough that tiny windows do not turn into thousands of one-row SDPA calls.
MIN_CHUNK = 64


def check_window(window, where: str = "attention_window") -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2 or window % 2:
        raise ValueError(
            f"{NAME}: {where} must be an even integer >= 2 (the total window; a token attends to "
            f"attention_window/2 tokens on each side), got {window!r}."
        )


def sliding_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, q, d), key/value (B, H_kv, kv, d) -> (B, q, H, d), None."""
    if "sliding_window" in kwargs:
        # A transformers model that passes its own per-layer window (Mistral, Qwen2, Gemma, ModernBERT):
        # its semantics, not Longformer's. See model_windows.py.
        from .model_windows import model_window_attention

        return model_window_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    config = getattr(module, "config", None)
    window = layer_setting(config, "attention_window", getattr(module, "layer_idx", None), DEFAULT_WINDOW)
    check_window(window)
    causal = is_causal(module, kwargs)
    check_self_attention(query, key, causal, NAME)
    batch, _, length, head_dim = query.shape
    keep = key_padding(attention_mask, batch, key.shape[2], query.device, NAME)
    flags = global_flags(kwargs, config, batch, length, query.device, NAME)
    if flags is not None and key.shape[2] != length:
        raise ValueError(
            f"{NAME}: global tokens need the full sequence as keys; incremental decoding with a window-bounded "
            f"KV cache ({length} new queries, {key.shape[2]} keys) has dropped them."
        )
    segments = sequence_ids(kwargs, batch, length, key.shape[2], query.device, NAME)
    key, value = expand_kv(query, key, value)
    scaling = head_dim**-0.5 if scaling is None else scaling
    out = banded_attention(query, key, value, keep, flags, window // 2, causal, scaling, dropout, segments=segments)
    return out, None


def banded_attention(query, key, value, keep, flags, half: int, causal: bool, scaling: float, dropout: float, segments=None):
    """Band of half-width ``half`` plus global tokens. query (B, H, n, d); key/value (B, H, K, d), K >= n
    (causal decoding: the n queries are the last n of the K keys). Returns (B, n, H, d).

    ``segments`` (B, n) int, from :func:`common.sequence_ids`: packed sequences, none of which sees another
    (global tokens included); only with as many keys as queries."""
    batch, heads, length, head_dim = query.shape
    offset = key.shape[2] - length
    if segments is not None and offset:
        raise ValueError(f"{NAME}: packed sequences need as many keys as queries; got {length} queries, {key.shape[2]} keys.")
    chunk = min(max(half, MIN_CHUNK), length)
    tiles = -(-length // chunk)
    padded = tiles * chunk
    after = 0 if causal else half
    span = chunk + half + after
    right = padded - length + after

    def key_tiles(x):
        x = F.pad(x, (0, 0, half, right))[:, :, offset:]
        return x.unfold(2, span, chunk).transpose(-1, -2)

    def flag_tiles(x):
        return F.pad(x, (half, right), value=False)[:, offset:].unfold(1, span, chunk)

    q_tiles = F.pad(query, (0, 0, 0, padded - length)).view(batch, heads, tiles, chunk, head_dim)
    k_tiles, v_tiles = key_tiles(key), key_tiles(value)
    relative = torch.arange(span, device=query.device) - torch.arange(chunk, device=query.device)[:, None]
    band = (relative >= 0) & (relative <= half + after)
    local_keys = flag_tiles(keep if flags is None else keep & ~flags)
    allowed = band & local_keys[:, :, None, :]
    if segments is not None:
        q_segments = F.pad(segments, (0, padded - length), value=-1).view(batch, tiles, chunk, 1)
        k_segments = F.pad(segments, (half, right), value=-2).unfold(1, span, chunk)[:, :, None, :]
        allowed = allowed & (q_segments == k_segments)
    allowed = allowed.unsqueeze(1)

    if flags is not None:
        index, valid = global_index(flags)
        k_tiles, v_tiles, allowed = with_global_keys(
            k_tiles, v_tiles, allowed, key, value, keep, index, valid, causal, chunk, segments=segments
        )

    out = sdpa_tiles(q_tiles, k_tiles, v_tiles, allowed, scaling, dropout)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded, heads, head_dim)[:, :length]
    if flags is not None:
        rows = global_rows(query, key, value, index, valid, keep, causal, scaling, dropout, segments=segments)
        out = scatter_rows(out, index, valid, rows)
    return out


def validate(config) -> None:
    window = config.attention_window
    layers = config.num_hidden_layers
    if isinstance(window, (list, tuple)):
        if len(window) != layers:
            raise ValueError(
                f"{NAME}: attention_window has {len(window)} per-layer values; num_hidden_layers={layers} needs {layers}."
            )
        for i, w in enumerate(window):
            check_window(w, f"attention_window[{i}]")
        largest = max(window)
    else:
        check_window(window)
        largest = window
    # A causal layer keeps its current token and attention_window/2 before it: transformers'
    # DynamicCache builds window-bounded layers from `sliding_window` (current token included).
    config.sliding_window = largest // 2 + 1


COMPONENT = Component(
    kind="attention",
    name=NAME,
    factory=sliding_window_attention,
    mask_factory=padding_mask,
    description="Longformer sliding window (attention_window = total, even) + global tokens; O(n*w) memory.",
    config_defaults={"attention_window": DEFAULT_WINDOW, "global_attention_token_ids": None},
    validate_config=validate,
)
