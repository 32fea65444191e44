"""Reformer-style LSH attention: tokens are sorted by a locality-sensitive hash and attend within chunks.

Semantics (Reformer's, with transformers' config names):

- each of ``num_hashes`` rounds hashes every key with random rotations R (per head, ``(head_dim,
  num_buckets/2)``): bucket = argmax([kR, -kR]); ``num_buckets`` is a power of two (``None``: about
  2 * seq_len / chunk, as Reformer picks it); padded keys go to an extra last bucket;
- tokens are stably sorted by (round, bucket, position); the sorted sequence is cut into chunks of
  ``lsh_attn_chunk_length``; each chunk's queries attend to the keys of the chunk itself,
  ``lsh_num_chunks_before`` chunks before and ``lsh_num_chunks_after`` after (circularly, as Reformer);
- masked keys (padding inside a row; causal: later positions) score -1e9 instead of being removed, as in
  Reformer;
  ``lsh_exclude_self=True`` gives a token's own key -1e5 (Reformer's rule for tied query/key projections);
- the rounds are combined with weights softmax over rounds of each round's log-sum-exp; both softmaxes
  subtract the maximum, so a query whose only admissible key is itself gets exactly its own value
  (Reformer's float32 ``exp(x - logsumexp(x))`` is off by up to ~0.5% there, see docs/long-context.md).

Tokens are bucketed by their *key*: with tied query/key projections (Reformer) this is exactly
Reformer's shared-QK hashing, since the bucket of a vector does not change when it is scaled.
Rotations come from ``hash_seed`` (``None``: fresh ones every call, as Reformer does in training), drawn
with the same generator call as Reformer, so equal seeds give equal buckets.
Memory: O(n * num_hashes * chunk * (1 + chunks before + chunks after)).

Padding invariance: everything above is done per row, with the row's own length (its last real token + 1)
as ``seq_len``: a right-padded row, or a row next to longer ones, gives the outputs it gives alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hfx.registry import Component

from .common import (
    check_positive_int,
    expand_kv,
    flash_cpu_ops,
    fold_strided,
    is_causal,
    key_padding,
    padding_mask,
    real_lengths,
    refuse_packed,
    require_full_sequence,
)

NAME = "hfx_lsh"
DEFAULTS = {
    "num_hashes": 1,
    "num_buckets": None,
    "lsh_attn_chunk_length": 64,
    "hash_seed": 0,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "lsh_exclude_self": False,
}


ROUTES = ("auto", "tiled")  # the tiled path only; flex_route.ROUTES less "flex"


def route_setting(config) -> str:
    """``config.attention_route`` ("auto" when absent), checked as sliding_window / block_sparse check theirs."""
    route = getattr(config, "attention_route", "auto") if config is not None else "auto"
    if route == "flex":
        raise ValueError(
            f"{NAME} has no Flex route: attention_route must be one of {', '.join(map(repr, ROUTES))}; got 'flex' "
            "(the Flex route serves hfx_sliding_window and hfx_block_sparse)."
        )
    if route not in ROUTES:
        raise ValueError(f"{NAME}: attention_route must be one of {', '.join(map(repr, ROUTES))}; got {route!r}.")
    return route


def settings(config) -> dict:
    route_setting(config)
    values = {name: getattr(config, name, default) for name, default in DEFAULTS.items()}
    check_positive_int(values["num_hashes"], "num_hashes", NAME)
    check_positive_int(values["lsh_attn_chunk_length"], "lsh_attn_chunk_length", NAME)
    check_positive_int(values["lsh_num_chunks_before"], "lsh_num_chunks_before", NAME, minimum=0)
    check_positive_int(values["lsh_num_chunks_after"], "lsh_num_chunks_after", NAME, minimum=0)
    buckets = values["num_buckets"]
    if buckets is not None and (
        isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2 or buckets & (buckets - 1)
    ):
        raise ValueError(
            f"{NAME}: num_buckets must be a power of two >= 2 (2, 4, 8, ...) or None for automatic, got {buckets!r}."
        )
    if values["hash_seed"] is not None:
        check_positive_int(values["hash_seed"], "hash_seed", NAME, minimum=0)
    return values


def automatic_buckets(length: int, chunk: int) -> int:
    """About two buckets per chunk, a power of two (Reformer's choice when num_buckets is unset)."""
    return 2 ** max(1, (2 * (length // chunk)).bit_length() - 1)


def rotations(heads: int, head_dim: int, num_hashes: int, num_buckets: int, seed, device, dtype):
    shape = (heads, head_dim, num_hashes, num_buckets // 2)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def hash_buckets(key, keep, num_hashes: int, num_buckets: int, seed) -> torch.Tensor:
    """(B, H, num_hashes, n) bucket of every key in every round; padded keys get the extra bucket num_buckets."""
    heads, head_dim = key.shape[1], key.shape[3]
    rotation = rotations(heads, head_dim, num_hashes, num_buckets, seed, key.device, key.dtype)
    batch, _, length, _ = key.shape
    rotated = torch.matmul(key.detach(), rotation.reshape(heads, head_dim, -1))  # (B, H, n, rounds * half)
    rotated = rotated.view(batch, heads, length, num_hashes, num_buckets // 2)
    # argmax over [kR, -kR] without building it: where -kR holds the larger maximum take argmax of -kR
    # (argmin of kR), else argmax of kR; ties go to the first half, as argmax's first maximum would.
    # (amax and amin are vectorised reductions; aminmax is not, and takes longer than both together)
    flip = rotated.amax(dim=-1, keepdim=True) < -rotated.amin(dim=-1, keepdim=True)
    buckets = rotated.mul_(torch.where(flip, -1.0, 1.0).to(rotated.dtype)).argmax(dim=-1)
    flip = flip[..., 0]
    buckets = (buckets + flip * (num_buckets // 2)).transpose(2, 3)
    return buckets.masked_fill(~keep[:, None, None, :], num_buckets)


def windows_of(source, spans):
    """Each chunk's window as a view: source (BH, (chunks + shifts - 1) * c, d) holds the sorted chunks with
    the wrap-around ones added at both ends, so window j is rows j*c .. (j+shifts)*c; nothing is copied."""
    chunks, shifts, chunk = spans
    bh, _, head_dim = source.shape
    return source.as_strided((bh, chunks, shifts * chunk, head_dim), (source.stride(0), chunk * head_dim, head_dim, 1))


def fold_windows(grad, spans):
    """Adjoint of :func:`windows_of`: (BH, chunks, shifts * c, d) window gradients summed into the source rows."""
    chunks, shifts, chunk = spans
    bh, _, _, head_dim = grad.shape
    out = grad.new_zeros(bh, chunks + shifts - 1, chunk, head_dim)
    # a view, not a reshape: the flash backward's layout is not contiguous
    fold_strided(out, grad.unflatten(2, (shifts, chunk)), axis=1, step=1)
    return out.view(bh, -1, head_dim)


def chunk_forward(query, key, value, blocked, own, scaling, fill, own_fill):
    """Softmax attention of independent chunks: queries (BH, T, c, d) against their windows (BH, T, W, d).

    Returns (out (BH, T, c, d), log-sum-exp (BH, T, c), probs (BH*T, c, W) or None). Keys where ``blocked``
    (BH*T, 1 or c, W) is True score ``fill``, keys where ``own`` is True score ``own_fill`` (applied second;
    both replace the score, as ``masked_fill``). Without either mask, on CPU, torch's fused flash kernel does
    scores, softmax and weighted sum in one pass over cache-sized blocks, reads the windows in place (strided
    views), and returns the log-sum-exp itself (its exp is a fast approximation, ~1e-7 relative, as SDPA's on
    CPU; float64 keeps the exact path). Otherwise, or where this torch lacks a working kernel
    (:func:`common.flash_cpu_ops`), the scores are materialised.
    """
    bh, tiles, chunk, head_dim = query.shape
    window = key.shape[2]
    if blocked is None and own is None and query.device.type == "cpu" and query.dtype != torch.float64:
        ops = flash_cpu_ops()
        if ops is not None:
            out, lse = ops[0](query, key, value, 0.0, False, scale=scaling)[:2]
            return out, lse, None
    query, key, value = (x.reshape(bh * tiles, -1, head_dim) for x in (query, key, value))
    scores = torch.baddbmm(query.new_empty(()), query, key.transpose(1, 2), beta=0, alpha=scaling)
    if blocked is not None:
        scores.masked_fill_(blocked, fill)
    if own is not None:
        scores.masked_fill_(own, own_fill)
    # Normalised with softmax (max subtracted), not exp(scores - logsumexp) as Reformer: a query whose only
    # admissible key is itself has every score at the -1e5 self value, where float32 spacing is 2**-7 (bf16:
    # 512), so the rounded log-sum-exp would leave weights summing to 1 +- 0.4% (bf16: 2 with two copies).
    probs = torch.softmax(scores, dim=-1)
    # log-sum-exp from the softmax just taken: the largest weight is exp(max - lse), so no second pass.
    lse = scores.amax(dim=-1).sub_(probs.amax(dim=-1).log_())
    out = torch.bmm(probs, value)
    return out.view(bh, tiles, chunk, head_dim), lse.view(bh, tiles, chunk), probs.view(bh * tiles, chunk, window)


def combine_rounds(out, lse, slots, shape):
    """Sorted chunk outputs back to token order and the rounds mixed by softmax over their log-sum-exp.

    out (..., c, d) and lse (..., c) in sorted order; ``slots`` (B*H*R*P,) the sorted row of each (round,
    position); shape (B*H, R, P, d). Returns the (B*H, P, d) result and the (B*H, R, P) weights (None: 1 round).
    """
    bh, rounds, padded, head_dim = shape
    out = out.reshape(-1, head_dim).index_select(0, slots).view(bh, rounds, padded, head_dim)
    if rounds == 1:
        return out[:, 0], None
    lse = lse.reshape(-1).index_select(0, slots).view(bh, rounds, padded)
    weights = torch.softmax(lse.to(torch.promote_types(lse.dtype, torch.float32)), dim=1).to(out.dtype)
    return (out * weights[..., None]).sum(1), weights


class _LSHRounds(torch.autograd.Function):
    """Chunk attention of every round plus the rounds' mix, with the backward written out.

    The mix's gradient folds into the attention backward: with w_r the round weights and o the mixed result,
    round r's output gradient is w_r * g and its log-sum-exp gradient w_r * g . (o_r - o), so the softmax
    backward's row term rowsum(dO_r * o_r) - dlse_r is rowsum(dO_r * o): the flash backward kernel, handed
    the mixed result in place of o_r, gives the exact gradient without any per-round bookkeeping.
    ``spans`` set: key/value are the extended sorted rows of :func:`windows_of`, else the windows themselves.
    """

    @staticmethod
    def forward(ctx, query, key, value, blocked, own, slots, sorted_rows, weight_rows, spans, scaling, fill, own_fill, shape):
        k_win, v_win = (key, value) if spans is None else (windows_of(key, spans), windows_of(value, spans))
        out, lse, probs = chunk_forward(query, k_win, v_win, blocked, own, scaling, fill, own_fill)
        mixed, weights = combine_rounds(out, lse, slots, shape)
        ctx.save_for_backward(query, key, value, lse, mixed, weights, probs, blocked, own, sorted_rows, weight_rows)
        ctx.scaling, ctx.spans = scaling, spans
        return mixed

    @staticmethod
    @once_differentiable  # the saved probs / log-sum-exp carry no graph: a second derivative would be wrong
    def backward(ctx, grad):
        query, key, value, lse, mixed, weights, probs, blocked, own, sorted_rows, weight_rows = ctx.saved_tensors
        spans = ctx.spans
        k_win, v_win = (key, value) if spans is None else (windows_of(key, spans), windows_of(value, spans))
        bh, tiles, chunk, head_dim = query.shape
        grad_out = grad.reshape(-1, head_dim).index_select(0, sorted_rows)
        if weights is not None:
            grad_out.mul_(weights.reshape(-1).index_select(0, weight_rows)[:, None])
        grad_out = grad_out.view(query.shape)
        mixed = mixed.reshape(-1, head_dim).index_select(0, sorted_rows).view(query.shape)
        if probs is None:  # the forward ran the fused kernel (flash_cpu_ops() is not None)
            grad_query, grad_key, grad_value = flash_cpu_ops()[1](
                grad_out, query, k_win, v_win, mixed, lse, 0.0, False, scale=ctx.scaling
            )
        else:
            q3, k3, v3 = (x.reshape(bh * tiles, -1, head_dim) for x in (query, k_win, v_win))
            g3, m3 = grad_out.view(-1, chunk, head_dim), mixed.view(-1, chunk, head_dim)
            grad_value = torch.bmm(probs.transpose(1, 2), g3)
            row = (g3 * m3).sum(dim=-1, keepdim=True)
            grad_scores = torch.bmm(g3, v3.transpose(1, 2)).sub_(row).mul_(probs)
            for mask in (blocked, own):
                if mask is not None:  # overwritten scores do not depend on query or key
                    grad_scores.masked_fill_(mask, 0)
            grad_query = torch.baddbmm(q3.new_empty(()), grad_scores, k3, beta=0, alpha=ctx.scaling)
            grad_key = torch.baddbmm(k3.new_empty(()), grad_scores.transpose(1, 2), q3, beta=0, alpha=ctx.scaling)
            grad_query, grad_key, grad_value = (
                x.view(bh, tiles, -1, head_dim) for x in (grad_query, grad_key, grad_value)
            )
        if spans is not None:
            grad_key, grad_value = fold_windows(grad_key, spans), fold_windows(grad_value, spans)
        return grad_query.reshape(query.shape), grad_key.reshape(key.shape), grad_value.reshape(value.shape), *[None] * 10


def attend_rounds(query, key, value, blocked, own, order, padded, shape, scaling, fill, own_fill, dropout, spans=None):
    """(B*H, P, d) LSH output from the sorted chunks (query (BH, T, c, d); key/value as :class:`_LSHRounds`
    takes them); ``order`` (B*H, R*P) is the sort of (round, position)."""
    bh, rounds, _, _ = shape
    device = query.device
    undo = torch.empty_like(order).scatter_(1, order, torch.arange(rounds * padded, device=device).expand_as(order))
    slots = (undo + (torch.arange(bh, device=device) * rounds * padded)[:, None]).flatten()
    if dropout == 0:
        sorted_rows = ((order % padded) + (torch.arange(bh, device=device) * padded)[:, None]).flatten()
        weight_rows = (order + (torch.arange(bh, device=device) * rounds * padded)[:, None]).flatten()
        return _LSHRounds.apply(query, key, value, blocked, own, slots, sorted_rows, weight_rows, spans, scaling, fill, own_fill, shape)
    # attention dropout: the same steps, recorded by autograd
    if spans is not None:
        key, value = windows_of(key, spans), windows_of(value, spans)
    head_dim = query.shape[-1]
    query, key, value = (x.reshape(-1, x.shape[2], head_dim) for x in (query, key, value))
    scores = torch.baddbmm(query.new_empty(()), query, key.transpose(1, 2), beta=0, alpha=scaling)
    if blocked is not None:
        scores = scores.masked_fill(blocked, fill)
    if own is not None:
        scores = scores.masked_fill(own, own_fill)
    out = torch.bmm(F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=True), value)
    return combine_rounds(out, torch.logsumexp(scores, dim=-1), slots, shape)[0]


def take_rows(x, index):
    """x (B, H, P, d) at positions index (B, H, m) -> (B, H, m, d), one row copy each.

    Reads x in place when it is (B, H, P, d) or a head-transposed (B, P, H, d) tensor (what a projection
    followed by ``.view(...).transpose(1, 2)`` gives), so no contiguous copy of q, k or v is made first.
    """
    batch, heads, length, head_dim = x.shape
    device = x.device
    if x.stride(-1) == 1 and x.transpose(1, 2).is_contiguous():
        flat = x.transpose(1, 2).reshape(-1, head_dim)
        base = (torch.arange(batch, device=device) * length * heads)[:, None, None] + torch.arange(heads, device=device)[None, :, None]
        rows = index * heads + base
    else:
        flat = x.contiguous().view(-1, head_dim)
        rows = index + (torch.arange(batch * heads, device=device) * length).view(batch, heads, 1)
    return flat.index_select(0, rows.flatten()).view(*index.shape, head_dim)


def lsh_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, n, d), key/value (B, H_kv, n, d) -> (B, n, H, d), None.

    Every row is laid out as it would be alone: its own padded length, bucket count, chunk boundaries and
    circular neighbours, so its real-token outputs do not depend on padding or on the other rows of the
    batch. Positions past a row's last real token output zeros.
    """
    s = settings(getattr(module, "config", None))
    causal = is_causal(module, kwargs)
    batch, heads, length, head_dim = query.shape
    require_full_sequence(key, length, NAME)
    keep = key_padding(attention_mask, batch, length, query.device, NAME)
    refuse_packed(kwargs, keep, NAME)
    key, value = expand_kv(query, key, value, NAME)
    scaling = head_dim**-0.5 if scaling is None else scaling
    chunk, rounds = s["lsh_attn_chunk_length"], s["num_hashes"]
    before, after = s["lsh_num_chunks_before"], s["lsh_num_chunks_after"]
    device = query.device

    lengths = real_lengths(keep)
    padded_list = [max(-(-n // chunk), 1) * chunk for n in lengths.tolist()]
    padded = max(padded_list)  # P_max
    tiles = padded // chunk  # T_max: chunks per round in the batch layout
    real = torch.arange(length, device=device) < lengths[:, None]  # (B, n)
    if not bool(real.all()):  # what lies past a row's real length is not part of the row
        zero = ~real[:, None, :, None]
        query, key, value = (x.masked_fill(zero, 0) for x in (query, key, value))
    if padded > length:
        query, key, value = (F.pad(x, (0, 0, 0, padded - length)) for x in (query, key, value))
        keep = F.pad(keep, (0, padded - length), value=False)
    elif padded < length:
        query, key, value, keep = query[:, :, :padded], key[:, :, :padded], value[:, :, :padded], keep[:, :padded]
    row_padded = torch.as_tensor(padded_list, device=device)  # P_b
    outside = torch.arange(padded, device=device) >= row_padded[:, None]  # (B, P_max): not in the row alone

    # Buckets: each row with its own count (num_buckets=None: from its own padded length); rows that share a
    # count share one rotation draw. Positions outside a row sort after its padding bucket, so every round's
    # first P_b sorted slots are exactly the row alone's.
    counts = [s["num_buckets"] or automatic_buckets(p, chunk) for p in padded_list]
    top = max(counts)
    if len(set(counts)) == 1:
        buckets = hash_buckets(key, keep, rounds, top, s["hash_seed"])
    else:
        buckets = torch.empty(batch, heads, rounds, padded, dtype=torch.long, device=device)
        for count in sorted(set(counts)):
            index = torch.as_tensor([b for b, c in enumerate(counts) if c == count], device=device)
            buckets[index] = hash_buckets(key[index], keep[index], rounds, count, s["hash_seed"])
    buckets = buckets.masked_fill(outside[:, None, None, :], top + 1)
    round_offset = (top + 2) * torch.arange(rounds, device=device)[:, None]
    order = torch.sort((buckets + round_offset).flatten(2), dim=-1, stable=True).indices  # (B, H, R * P_max)
    positions = order % padded  # token at each sorted slot
    q_pos = positions.view(batch, heads, rounds * tiles, chunk)
    shifts = before + after + 1
    window = shifts * chunk

    if all(p == padded for p in padded_list):
        # Every row has the batch's layout: the neighbours of chunk j are chunks j-before .. j+after of the
        # round-major chunk sequence, circularly. The sorted rows are gathered once with the wrapped chunks
        # added at both ends, and each window is a view into them.
        spans = (rounds * tiles, shifts, chunk)
        ext = (torch.arange(rounds * tiles + shifts - 1, device=device) - before) % (rounds * tiles)
        ext_pos = q_pos[:, :, ext].flatten(2)  # (B, H, (R*T + shifts - 1) * c)
        k_pos = ext_pos.unfold(2, window, chunk)  # (B, H, R*T, W)
        k_src, v_src = (take_rows(x, ext_pos).flatten(0, 1) for x in (key, value))
    else:
        # Chunk j of round r of row b is the row alone's chunk g = r * T_b + j; its neighbour at shift t is
        # g' = (g + t) mod (R * T_b), found in the batch layout at (g' // T_b) * T_max + g' % T_b.
        spans = None
        own_tiles = row_padded // chunk  # T_b
        slot_round = torch.arange(rounds * tiles, device=device) // tiles
        slot_tile = torch.arange(rounds * tiles, device=device) % tiles
        g = slot_round * own_tiles[:, None] + slot_tile  # (B, R * T_max)
        g_shift = (g[:, :, None] + torch.arange(-before, after + 1, device=device)) % (rounds * own_tiles)[:, None, None]
        neighbour = (g_shift // own_tiles[:, None, None]) * tiles + g_shift % own_tiles[:, None, None]
        mine = (slot_tile[None] < own_tiles[:, None])[:, :, None]  # chunks past a row's own look at themselves
        neighbour = torch.where(mine, neighbour, torch.arange(rounds * tiles, device=device)[None, :, None])
        chunk_of = neighbour[:, None].expand(batch, heads, -1, -1).flatten(2)  # (B, H, R*T_max*shifts)
        k_pos = q_pos.gather(2, chunk_of[..., None].expand(-1, -1, -1, chunk)).view(batch, heads, rounds * tiles, window)
        k_src, v_src = (take_rows(x, k_pos.flatten(2)).view(batch * heads, rounds * tiles, window, head_dim) for x in (key, value))
    q_chunks = take_rows(query, positions).view(batch * heads, rounds * tiles, chunk, head_dim)

    half = query.dtype == torch.float16
    blocked = own = None
    masked = keep | outside  # in the row alone every key of its P_b slots is real: nothing to mask
    if causal or not bool(masked.all()):
        allowed = torch.gather(keep[:, None, :].expand(-1, heads, -1), 2, k_pos.flatten(2)).view(k_pos.shape)[..., None, :]
        if causal:
            allowed = allowed & (k_pos[..., None, :] <= q_pos[..., None])
        blocked = ~allowed  # (B, H, R * T_max, 1 or c, W): broadcast over the queries unless causal
        blocked = blocked.reshape(-1, blocked.shape[3], window)
    if s["lsh_exclude_self"]:
        own = (k_pos[..., None, :] == q_pos[..., None]).reshape(-1, chunk, window)
    out = attend_rounds(
        q_chunks, k_src, v_src, blocked, own, order.view(batch * heads, -1), padded,
        (batch * heads, rounds, padded, head_dim), scaling, -1e4 if half else -1e9, -1e3 if half else -1e5, dropout, spans,
    )
    out = out.view(batch, heads, padded, head_dim).transpose(1, 2)
    if padded >= length:
        out = out[:, :length]
    else:
        out = F.pad(out, (0, 0, 0, 0, 0, length - padded))
    if not bool(real.all()):
        out = out.masked_fill(~real[:, :, None, None], 0)
    return out, None


def validate(config) -> None:
    settings(config)


COMPONENT = Component(
    kind="attention",
    name=NAME,
    factory=lsh_attention,
    mask_factory=padding_mask,
    description="Reformer LSH: hash-sorted chunks (num_hashes, num_buckets, lsh_attn_chunk_length, hash_seed).",
    config_defaults={**DEFAULTS, "attention_route": "auto"},  # ROUTES: "auto" or "tiled"
    validate_config=validate,
    supports_kv_cache=False,  # every call needs the whole sequence (require_full_sequence)
)
