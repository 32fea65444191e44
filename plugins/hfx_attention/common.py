"""What the three long-context backends share: reading their settings, the padding mask, global
tokens, and running many small attention tiles through SDPA.

Mask contract. The ``AttentionMaskInterface`` function of every hfx long-context backend returns
the 2-D key padding mask (bool ``(batch, kv_length)``, True on real tokens) or ``None``, exactly as
transformers' flash-attention mask does; causality comes from ``module.is_causal`` (the attribute
flash and SDPA read too). A dense ``(batch, 1, q, kv)`` mask is never built, so memory stays linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torch.nn.functional as F

from hfx.attention import repeat_kv

GLOBAL_TOKEN_IDS = "global_attention_token_ids"


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` function: the key padding mask of the keys the layer will see."""
    if int(q_offset) + q_length != kv_offset + kv_length:
        # The queries are not the last keys: a pre-allocated StaticCache (empty slots, ring order on sliding
        # layers) or keys from elsewhere (cross-attention, prefix tuning). The backends would misplace them.
        raise ValueError(
            f"hfx long-context attention: queries at {int(q_offset)}..{int(q_offset) + q_length - 1} against "
            f"{kv_length} key slots from {kv_offset}: the queries must be the last keys (self-attention with the "
            "default dynamic KV cache). A static cache (cache_implementation='static') or cross-attention needs "
            "attn_implementation='sdpa'; to keep this backend with generate(), use the dynamic cache instead: "
            "generate(..., cache_implementation=\"dynamic\")."
        )
    if attention_mask is None:
        return None
    # With a window-bounded cache the keys are the last kv_length tokens seen so far.
    attention_mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(attention_mask.all()) else attention_mask


def key_padding(attention_mask: torch.Tensor | None, batch: int, kv_length: int, device, name: str) -> torch.Tensor:
    """Normalise what the model passed as ``attention_mask`` to bool (batch, kv_length), True = may be attended."""
    if attention_mask is None:
        return torch.ones(batch, kv_length, dtype=torch.bool, device=device)
    mask = attention_mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]  # a (batch, 1, 1, kv) key-padding mask handed in by the caller
    if mask.dim() != 2:
        raise ValueError(
            f"{name} takes a 2-D key padding mask (batch, kv_length) or a (batch, 1, 1, kv_length) one; got a mask "
            f"of shape {tuple(attention_mask.shape)}. A dense 4-D mask would defeat linear memory: pass the 2-D "
            "attention_mask to the model instead."
        )
    if mask.dtype != torch.bool:
        # additive float masks use 0 for kept keys and a large negative number for dropped ones
        mask = mask == 0 if mask.is_floating_point() and bool((mask <= 0).all()) else mask != 0
    if mask.shape != (batch, kv_length):
        raise ValueError(
            f"{name}: attention_mask has shape {tuple(mask.shape)}, expected (batch, kv_length)=({batch}, {kv_length})."
        )
    return mask.to(device)


def layer_setting(config, name: str, layer_idx: int | None, default):
    """A config value that may be given once or once per layer (Longformer's ``attention_window``)."""
    value = getattr(config, name, default) if config is not None else default
    if isinstance(value, Sequence) and not isinstance(value, str):
        if layer_idx is None:
            raise ValueError(f"{name} is given per layer ({list(value)}) but the attention module has no layer_idx.")
        if layer_idx >= len(value):
            raise ValueError(f"{name} has {len(value)} per-layer values; layer {layer_idx} has none.")
        return value[layer_idx]
    return value


def is_causal(module, kwargs: dict) -> bool:
    return bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))


def global_flags(kwargs: dict, config, batch: int, length: int, device, name: str) -> torch.Tensor | None:
    """Bool (batch, length) of global tokens from ``global_attention_mask`` and/or the always-global token ids."""
    flags = None
    given = kwargs.get("global_attention_mask")
    if given is not None:
        if given.dim() != 2 or given.shape[0] != batch or given.shape[1] != length:
            raise ValueError(
                f"{name}: global_attention_mask must have shape (batch, seq_len)=({batch}, {length}) "
                f"with 1 on global tokens and 0 elsewhere; got shape {tuple(given.shape)}."
            )
        flags = given.to(device=device) != 0
    token_ids = getattr(config, GLOBAL_TOKEN_IDS, None) if config is not None else None
    if token_ids:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            if flags is None:
                raise ValueError(
                    f"{name}: config.{GLOBAL_TOKEN_IDS}={list(token_ids)} but neither input_ids nor a "
                    "global_attention_mask reached the attention function; on a stock transformers model call "
                    "hfx_attention.attach_global_token_ids(model) once, or pass global_attention_mask."
                )
        else:
            if input_ids.shape != (batch, length):
                raise ValueError(f"{name}: input_ids of shape {tuple(input_ids.shape)} do not match the queries ({batch}, {length}).")
            by_id = torch.isin(input_ids.to(device), torch.as_tensor(list(token_ids), device=device))
            flags = by_id if flags is None else flags | by_id
    return flags


def sequence_ids(kwargs: dict, batch: int, q_length: int, kv_length: int, device, name: str) -> torch.Tensor | None:
    """Which packed sequence each token belongs to: int64 (batch, length), or None for one sequence per row.

    Padding-free batches (``DataCollatorWithFlattening``) put several sequences in one row. Their boundaries
    come as the flash-attention varlen kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (cumulative lengths over
    the flattened ``batch * length`` tokens) or, failing those, as ``position_ids`` restarts: a position that
    does not continue the previous one by +1 starts a new sequence (how transformers itself detects packing).
    Only a full forward is packed; with fewer queries than keys (cached decoding) positions continue the
    cache and every row is one sequence.
    """
    if q_length != kv_length:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is not None and cu_k is not None and not torch.equal(cu_q.to(cu_k.device), cu_k):
            raise ValueError(
                f"{name} is self-attention: cu_seq_lens_q {cu_q.tolist()} and cu_seq_lens_k {cu_k.tolist()} must be equal."
            )
        cu = (cu_k if cu_q is None else cu_q).to(device=device, dtype=torch.long)
        total = batch * q_length
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() < 0).any()):
            raise ValueError(
                f"{name}: cu_seq_lens must be a 1-D non-decreasing tensor from 0 to batch * length = {total} "
                f"(cumulative sequence lengths over the flattened tokens); got {cu.tolist()}."
            )
        rows = torch.arange(1, batch, device=device) * q_length
        if not bool(torch.isin(rows, cu).all()):
            raise ValueError(
                f"{name}: a packed sequence crosses a batch row (rows of {q_length} tokens, cu_seq_lens {cu.tolist()}); "
                "every multiple of the row length must be a sequence boundary."
            )
        ids = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True).view(batch, q_length)
        return ids if bool((ids != ids[:, :1]).any()) else None
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() > 2:
        return None  # no positions, or multi-axis (rope-per-axis) positions: nothing to read boundaries from
    position_ids = position_ids.to(device).view(-1, position_ids.shape[-1])
    if position_ids.shape[-1] != q_length or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"{name}: position_ids of shape {tuple(position_ids.shape)} do not match the queries "
            f"(batch, length)=({batch}, {q_length})."
        )
    starts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if not bool(starts.any()):
        return None
    ids = F.pad(starts.long(), (1, 0)).cumsum(-1)
    return ids.expand(batch, -1)


def attach_global_token_ids(model) -> None:
    """Make ``config.global_attention_token_ids`` work on a stock model: a forward pre-hook turns the ids
    found in ``input_ids`` into the ``global_attention_mask`` keyword (OR-ed with one given explicitly)."""

    def hook(module, args, kwargs):
        token_ids = getattr(module.config, GLOBAL_TOKEN_IDS, None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not token_ids or input_ids is None:
            return None
        flags = torch.isin(input_ids, torch.as_tensor(list(token_ids), device=input_ids.device))
        if kwargs.get("global_attention_mask") is not None:
            flags = flags | (kwargs["global_attention_mask"] != 0)
        return args, {**kwargs, "global_attention_mask": flags.long()}

    model.register_forward_pre_hook(hook, with_kwargs=True)


def check_kv_heads(query: torch.Tensor, key: torch.Tensor, name: str) -> None:
    """Grouped-query attention: every key/value head serves the same number of query heads."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"{name}: {heads} query heads cannot share {kv_heads} key/value heads; the number of query heads must "
            "be a multiple of the number of key/value heads (grouped-query attention)."
        )


def expand_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, name: str = "hfx long-context attention"):
    """Repeat grouped key/value heads so that every query head has its own."""
    check_kv_heads(query, key, name)
    n_rep = query.shape[1] // key.shape[1]
    return repeat_kv(key, n_rep), repeat_kv(value, n_rep)


def real_lengths(keep: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last real key + 1 (0 for a row without one); keep bool (B, n)."""
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    return (positions * keep).amax(dim=1)


def refuse_packed(kwargs: dict, keep: torch.Tensor, name: str) -> None:
    """Backends that lay out a whole row (hashing, blocks) cannot keep packed sequences apart: one clear error.

    keep bool (B, n), True on real tokens. Only boundaries between real tokens count, so position ids that
    restart on padding (left padding in ``generate``) are not mistaken for packing."""
    batch, length = keep.shape
    ids = sequence_ids(kwargs, batch, length, length, keep.device, name)
    if ids is None:
        return
    first = ids.masked_fill(~keep, ids.numel()).amin(dim=-1)
    last = ids.masked_fill(~keep, -1).amax(dim=-1)
    if bool((last > first).any()):
        raise ValueError(
            f"{name} does not support packed sequences (several sequences in one row, from position_ids restarts "
            "or cu_seq_lens_q/cu_seq_lens_k): it would attend across them. Packed rows are supported by "
            "hfx_sliding_window; use padded rows (one sequence per row, with an attention_mask) or "
            "attn_implementation='hfx_sliding_window' with this data."
        )


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """Bool mask -> additive float mask of ``dtype``: 0 where allowed, -inf elsewhere (same shape and device)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@cache
def flash_cpu_ops():
    """``(forward, backward)``: PyTorch's private fused flash-attention CPU kernels
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``), or ``None`` where this torch
    lacks them or they do not behave as the backends use them.

    Checked once (cached) on a tiny float32 probe with the call signature the backends use (attention mask
    and scale as keywords): the output and log-sum-exp must match a direct computation and the backward
    must return three gradients of the inputs' shapes. Callers take their exact materialised or SDPA path
    on ``None``."""
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None:
        return None
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, 3, 4, generator=generator) for _ in range(3))
            mask = torch.zeros(1, 1, 3, 3)
            mask[..., 2] = float("-inf")
            out, lse = forward(q, k, v, 0.0, False, attn_mask=mask, scale=0.5)
            scores = torch.matmul(q, k.transpose(-1, -2)) * 0.5 + mask
            want_lse = torch.logsumexp(scores, dim=-1)
            want = torch.matmul(torch.softmax(scores, dim=-1), v)
            if out.shape != q.shape or lse.shape != want_lse.shape:
                return None
            if not (torch.allclose(out, want, atol=1e-4) and torch.allclose(lse, want_lse, atol=1e-4)):
                return None
            grads = backward(torch.ones_like(out), q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=0.5)
            if len(grads) != 3 or any(g.shape != x.shape or not bool(torch.isfinite(g).all()) for g, x in zip(grads, (q, k, v))):
                return None
    except Exception:  # a torch build whose kernels refuse the call: the exact paths serve instead
        return None
    return forward, backward


def sdpa_tiles(query, key, value, allowed, scaling: float, dropout: float) -> torch.Tensor:
    """Attention inside independent tiles.

    query (B, H, T, c, d); key, value (B, H, T, L, d); allowed bool (B, 1 or H, T, c, L).
    Returns (B, H, T, c, d). Tiles become the batch of one SDPA call: SDPA's fused CPU/GPU kernels
    never hold more than one tile of scores, and rows with no allowed key come out as zeros.
    """
    b, h, t, c, d = query.shape
    length = key.shape[3]

    def flat(x, rows):
        return x.transpose(1, 2).reshape(b * t, x.shape[1], rows, x.shape[-1])

    out = F.scaled_dot_product_attention(
        flat(query, c), flat(key, length), flat(value, length), attn_mask=flat(allowed, c), dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, t, h, c, d).transpose(1, 2)


def global_index(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the global tokens of each row, padded to the largest count.

    Returns ``index`` (B, g) and ``valid`` (B, g). Padding slots point at distinct non-global
    positions (a stable sort puts global positions first), so scattering into them is harmless.
    """
    count = int(flags.sum(-1).max())
    order = torch.sort(flags.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :count]
    return order, torch.gather(flags, 1, order)


def fold_strided(dest: torch.Tensor, windows: torch.Tensor, axis: int, step: int, first: int = 0, index=None) -> None:
    """Adjoint of overlapping strided windows: add each window's gradient onto the rows it was read from.

    ``dest`` (..., N, size, ...) is the source cut into pieces of ``size`` rows, its piece axis at ``axis``;
    ``windows`` (..., T, pieces, size, ...) the gradients of T windows of ``pieces`` pieces each, with the same
    leading and trailing dimensions. Window t starts at piece ``(first + t) * step``, or at ``index[t] * step``
    when ``index`` (T,) gives the windows' tile numbers. Accumulates in place, one shifted add per piece."""
    lead = (slice(None),) * axis
    tiles = windows.shape[axis]
    for j in range(windows.shape[axis + 1]):
        part = windows.select(axis + 1, j)
        if index is None:
            start = first * step + j
            dest[lead + (slice(start, start + tiles * step, step),)] += part
        else:
            dest.index_add_(axis, index * step + j, part)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, d), index (B, g) -> (B, H, g, d)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def with_global_keys(k_tiles, v_tiles, allowed, key, value, keep, index, valid, causal: bool, chunk: int, segments=None):
    """Append the global keys to every tile: each query also sees every global key (causal: the earlier ones).

    k_tiles/v_tiles (B, H, T, L, d), allowed (B, 1 or H, T, c, L); index/valid (B, g) from :func:`global_index`.
    The tiles' own columns must already exclude global keys, so that none is counted twice. With packed
    ``segments`` (B, n) from :func:`sequence_ids`, a global key is seen only by queries of its own sequence.
    """
    batch, heads, tiles = k_tiles.shape[:3]
    g_keys = gather_positions(key, index)[:, :, None].expand(-1, -1, tiles, -1, -1)
    g_values = gather_positions(value, index)[:, :, None].expand(-1, -1, tiles, -1, -1)
    g_allowed = (valid & torch.gather(keep, 1, index))[:, None, None, :]
    if causal:
        positions = torch.arange(tiles * chunk, device=key.device).view(tiles, chunk, 1)
        g_allowed = g_allowed & (index[:, None, None, :] <= positions)
    if segments is not None:
        q_segments = F.pad(segments, (0, tiles * chunk - segments.shape[1]), value=-1).view(batch, tiles, chunk, 1)
        g_allowed = g_allowed & (torch.gather(segments, 1, index)[:, None, None, :] == q_segments)
    g_allowed = g_allowed.expand(batch, tiles, chunk, -1).unsqueeze(1).expand(-1, allowed.shape[1], -1, -1, -1)
    return (
        torch.cat([g_keys, k_tiles], dim=3),
        torch.cat([g_values, v_tiles], dim=3),
        torch.cat([g_allowed, allowed], dim=-1),
    )


def global_rows(query, key, value, index, valid, keep, causal: bool, scaling: float, dropout: float, segments=None) -> torch.Tensor:
    """Global queries attend to every (allowed) key: (B, H, g, d) outputs, one dense row each.
    With packed ``segments`` (B, n), only to the keys of their own sequence."""
    rows = gather_positions(query, index)
    allowed = keep[:, None, None, :] & valid[:, None, :, None]
    if causal:
        allowed = allowed & (torch.arange(key.shape[2], device=key.device) <= index[:, None, :, None])
    if segments is not None:
        allowed = allowed & (segments[:, None, None, :] == torch.gather(segments, 1, index)[:, None, :, None])
    return F.scaled_dot_product_attention(rows, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)


def scatter_rows(out: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Overwrite out (B, n, H, d) at the valid global positions with rows (B, H, g, d)."""
    b, _, h, d = out.shape
    index4 = index[:, :, None, None].expand(b, index.shape[1], h, d)
    rows = torch.where(valid[:, :, None, None], rows.transpose(1, 2), torch.gather(out, 1, index4))
    return out.scatter(1, index4, rows)


def check_self_attention(query, key, causal: bool, name: str) -> None:
    if query.shape[2] != key.shape[2] and not causal:
        raise ValueError(
            f"{name} is self-attention: {query.shape[2]} queries against {key.shape[2]} keys is only valid for "
            "causal decoding with a KV cache (cross-attention is not supported: load the model with "
            "attn_implementation='sdpa' or 'eager')."
        )


def check_positive_int(value, name: str, backend: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{backend}: {name} must be an integer >= {minimum}, got {value!r}.")


def require_full_sequence(key: torch.Tensor, length: int, name: str) -> None:
    """Backends that hash or block the whole sequence cannot decode incrementally from a KV cache."""
    if key.shape[2] != length:
        raise ValueError(
            f"{name} needs as many keys as queries (no KV-cache decoding, no cross-attention); got {length} "
            f"queries and {key.shape[2]} keys. For generate(), pass use_cache=False (each new token then runs a full "
            "forward over the sequence so far), or use hfx_sliding_window for incremental decoding."
        )
