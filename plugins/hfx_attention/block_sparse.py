"""BigBird-style block-sparse attention (ITC): sliding blocks, global blocks and random blocks.

Semantics, on each row's real tokens (up to its last real token) cut into blocks of ``block_size``
(the last block padded internally):

- every query block attends to its own block and the one on each side (causal: the one before);
- the first and the last block are global (causal: the first only): they attend to every key and
  every query attends to them; ``global_attention_mask`` / ``config.global_attention_token_ids`` add
  global tokens exactly as in ``hfx_sliding_window``;
- each query block also attends to ``num_random_blocks`` random key blocks per head, drawn from the
  whole sequence among the blocks it does not already see (causal: among earlier blocks), reproducibly
  from ``block_sparse_seed`` and the layer index;
- causal: within a block, the causal mask holds token by token; padded keys are never attended.

Padding invariance: the number of blocks, the last global block, the random layout and the internal
padding of the last block follow each row's real length (its last real token + 1), not the padded
length of the batch; rows of different lengths are laid out separately. A row's outputs are therefore
the same alone, right-padded, or next to longer and shorter rows.

How: for each tile of query blocks, the key blocks it reads (global blocks, band, random, and a
segment of extra global tokens) are fetched with one ``index_select`` of contiguous blocks (its
backward is one ``index_add``), masked by a small additive mask that is broadcast over batch and heads
whenever it can be, and run through SDPA as one batch. Query rows of the global blocks are one dense
SDPA call over all keys. Memory is O(n * block_size * (5 + num_random_blocks)); no (n, n) tensor
exists (the layout itself is blocks x blocks, n^2 / block_size^2 numbers).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from hfx.registry import Component

from .common import (
    additive_mask,
    check_kv_heads,
    check_positive_int,
    flash_cpu_ops,
    fold_strided,
    gather_positions,
    global_flags,
    global_index,
    is_causal,
    key_padding,
    padding_mask,
    real_lengths,
    refuse_packed,
    require_full_sequence,
    scatter_rows,
)
from .flex_route import block_sparse_flex_rows, choose_route, route_setting

NAME = "hfx_block_sparse"
DEFAULTS = {"block_size": 64, "num_random_blocks": 3, "block_sparse_seed": 0, "global_attention_token_ids": None,
            "attention_route": "auto"}  # flex_route.ROUTES


def settings(config) -> tuple[int, int, int]:
    block_size = getattr(config, "block_size", DEFAULTS["block_size"])
    num_random = getattr(config, "num_random_blocks", DEFAULTS["num_random_blocks"])
    seed = getattr(config, "block_sparse_seed", DEFAULTS["block_sparse_seed"])
    check_positive_int(block_size, "block_size", NAME)
    check_positive_int(num_random, "num_random_blocks", NAME, minimum=0)
    check_positive_int(seed, "block_sparse_seed", NAME, minimum=0)
    return block_size, num_random, seed


@lru_cache(maxsize=64)
def block_layout(num_blocks: int, heads: int, num_random: int, seed: int, layer: int, causal: bool):
    """(index, valid), each (heads, num_blocks, 3 + num_random): the key blocks each query block reads
    besides the global ones. Invalid slots (outside the sequence, or too few candidates) are masked.

    ``valid`` does not depend on the head: every head of a query block has the same candidates, and
    topk returns the valid (non-negative) scores first."""
    blocks = torch.arange(num_blocks)
    neighbours = blocks[:, None] + torch.tensor([-1, 0] if causal else [-1, 0, 1])
    index = neighbours.clamp(0, num_blocks - 1)[None].expand(heads, -1, -1)
    valid = ((neighbours >= 0) & (neighbours < num_blocks))[None].expand(heads, -1, -1)
    if num_random:
        generator = torch.Generator().manual_seed(seed + 1_000_003 * layer)
        scores = torch.rand(heads, num_blocks, num_blocks, generator=generator)
        distance = blocks[None, :] - blocks[:, None]
        candidate = distance.abs() > 1
        candidate &= (blocks[None, :] > 0) & ((blocks[None, :] < num_blocks - 1) | causal)
        if causal:
            candidate &= distance < 0
        scores = scores.masked_fill(~candidate, -1.0)
        top = scores.topk(min(num_random, num_blocks), dim=-1)
        pad = num_random - top.indices.shape[-1]
        index = torch.cat([index, F.pad(top.indices, (0, pad))], dim=-1)
        valid = torch.cat([valid, F.pad(top.values >= 0, (0, pad), value=False)], dim=-1)
    return index, valid


@lru_cache(maxsize=64)
def tile_slots(num_blocks: int, heads: int, num_random: int, seed: int, layer: int, causal: bool):
    """What the query-block tiles read: (tiles, slots, valid).

    ``tiles`` are the query blocks computed as tiles (bidirectional: not the first and last block, whose
    rows are global and computed densely); ``slots`` (heads, T, S) key block indices, global blocks first;
    ``valid`` (T, S). A band or random slot that is a global block is invalid (it is already read as one).
    """
    index, valid = block_layout(num_blocks, heads, num_random, seed, layer, causal)
    global_ids = [0] if causal or num_blocks == 1 else [0, num_blocks - 1]
    tiles = torch.arange(num_blocks) if causal else torch.arange(1, max(num_blocks - 1, 1))
    index, valid = index[:, tiles], valid[0, tiles]
    duplicate = (index[0, ..., None] == torch.tensor(global_ids)).any(-1)  # band slots only: head-independent
    first = torch.tensor(global_ids).expand(heads, len(tiles), -1)
    slots = torch.cat([first, index], dim=-1)
    valid = torch.cat([torch.ones(len(tiles), len(global_ids), dtype=torch.bool), valid & ~duplicate], dim=-1)
    return tiles, slots.contiguous(), valid


def block_sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, n, d), key/value (B, H_kv, n, d) -> (B, n, H, d), None."""
    config = getattr(module, "config", None)
    block_size, num_random, seed = settings(config)
    causal = is_causal(module, kwargs)
    batch, heads, length, head_dim = query.shape
    require_full_sequence(key, length, NAME)
    check_kv_heads(query, key, NAME)
    keep = key_padding(attention_mask, batch, length, query.device, NAME)
    refuse_packed(kwargs, keep, NAME)
    extra = global_flags(kwargs, config, batch, length, query.device, NAME)
    scaling = head_dim**-0.5 if scaling is None else scaling
    layer = getattr(module, "layer_idx", None) or 0
    if choose_route(config, query, key, value, dropout, NAME) == "flex":  # config.attention_route; see flex_route.py
        return block_sparse_flex_rows(query, key, value, keep, extra, block_size, num_random, seed, layer, causal, scaling), None
    run = dict(block_size=block_size, num_random=num_random, seed=seed, layer=layer, causal=causal, scaling=scaling, dropout=dropout)

    lengths = real_lengths(keep)
    distinct = lengths.unique().tolist()
    if len(distinct) == 1:
        return _padded(_rows_of_length(query, key, value, keep, extra, distinct[0], **run), length), None
    # Rows of different real lengths have different layouts: each group is computed as if alone.
    pieces, order = [], []
    for real in distinct:
        rows = (lengths == real).nonzero().flatten()
        part = _rows_of_length(query[rows], key[rows], value[rows], keep[rows], None if extra is None else extra[rows], real, **run)
        pieces.append(_padded(part, length))
        order.append(rows)
    inverse = torch.empty(batch, dtype=torch.long, device=query.device)
    inverse[torch.cat(order)] = torch.arange(batch, device=query.device)
    return torch.cat(pieces).index_select(0, inverse), None


def _padded(out: torch.Tensor, length: int) -> torch.Tensor:
    """(b, L, H, d) -> (b, length, H, d): outputs at right-padded positions are zeros."""
    return F.pad(out, (0, 0, 0, 0, 0, length - out.shape[1]))


def _rows_of_length(query, key, value, keep, extra, real: int, **run):
    """Rows whose last real token is at ``real`` - 1: attention over their first ``real`` positions."""
    b, heads, _, head_dim = query.shape
    if real == 0:
        return query.new_zeros(b, 0, heads, head_dim)
    query, key, value, keep = query[:, :, :real], key[:, :, :real], value[:, :, :real], keep[:, :real]
    holes = None if bool(keep.all()) else keep
    if extra is not None:
        extra = extra[:, :real]
        extra = extra if bool(extra.any()) else None
    return _attend(query, key, value, holes, extra, **run)


def _attend(query, key, value, keep, extra, block_size, num_random, seed, layer, causal, scaling, dropout):
    """Block-sparse attention of b rows that all end at their last position; keep (b, L) or None (no
    masked key), extra (b, L) extra global tokens or None. Returns (b, L, H, d)."""
    b, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    device = query.device
    num_blocks = -(-length // block_size)
    tiles, slots, valid = (t.to(device) for t in tile_slots(num_blocks, heads, num_random, seed, layer, causal))
    num_tiles = len(tiles)

    block_global = torch.zeros(length, dtype=torch.bool, device=device)
    block_global[:block_size] = True
    if not causal:
        block_global[(num_blocks - 1) * block_size :] = True
    extra_only = None if extra is None else extra & ~block_global
    if extra_only is not None and not bool(extra_only.any()):
        extra_only = None

    out = split_rows = None
    first_rows = min(block_size, length)

    def global_rows():  # the global rows of the first and the last block are contiguous: sliced and concatenated, no gather
        return torch.cat([query[:, :, :first_rows], query[:, :, max((num_blocks - 1) * block_size, first_rows) :]], dim=2)

    if num_tiles:
        if _split_ready(query, keep, extra_only, dropout):
            index, layout_valid = (t.to(device) for t in block_layout(num_blocks, heads, num_random, seed, layer, causal))
            out, split_rows = _split_tiles(query, key, value, tiles, index, layout_valid, block_size, causal, scaling,
                                           rows=None if causal else global_rows())
        else:
            out = _tiles(query, key, value, keep, extra_only, tiles, slots, valid, block_size, causal, scaling, dropout)
    if causal:  # block 0's rows are exact as a tile: only extra global tokens need dense rows
        out = out[:, :length]
        if extra_only is None:
            return out
        flags = extra_only
    else:
        if split_rows is not None:
            rows = split_rows.transpose(1, 2)
        elif _split_ready(query, keep, None, dropout):
            rows = _split_key_rows(global_rows(), key, value, scaling, rep).transpose(1, 2)
        else:
            rows = _attend_all_keys(global_rows(), key, value, None, keep, scaling, dropout, rep).transpose(1, 2)
        out = torch.cat([rows[:, :first_rows], *([] if out is None else [out]), rows[:, first_rows:]], dim=1)
        if extra_only is None:
            return out
        flags = extra_only
    # extra global tokens attend to every key (causal: every earlier key)
    index, index_valid = global_index(flags)
    rows = _dense_rows(query, key, value, index, index_valid, keep, causal, scaling, dropout, rep)
    return scatter_rows(out, index, index_valid, rows)


def _tiles(query, key, value, keep, extra_only, tiles, slots, valid, block_size, causal, scaling, dropout):
    """Outputs (b, T * block_size, H, d) of the query blocks ``tiles`` (a contiguous range)."""
    b, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    device, dtype = query.device, query.dtype
    num_blocks = -(-length // block_size)
    padded = num_blocks * block_size
    num_tiles = len(tiles)
    first_tile = int(tiles[0])

    def blocks(x):
        return F.pad(x, (0, 0, 0, padded - length))

    # key/value bank: (b, H_kv, blocks, block_size, d), extra global tokens appended as whole blocks
    k_bank, v_bank = blocks(key), blocks(value)
    bank_blocks = num_blocks
    offsets = torch.arange(block_size, device=device)
    key_pos = (slots[..., None] * block_size + offsets).flatten(-2)  # (H, T, S * block)
    key_valid = (valid[..., None] & (key_pos[0].view(num_tiles, -1, block_size) < length)).flatten(-2)  # (T, S * block)
    if extra_only is not None:
        e_index, e_valid = global_index(extra_only)  # (b, g)
        extra_blocks = -(-e_index.shape[1] // block_size)
        fill = extra_blocks * block_size - e_index.shape[1]
        e_index_p = F.pad(e_index, (0, fill))
        e_valid = F.pad(e_valid, (0, fill), value=False)
        k_bank = torch.cat([k_bank, gather_positions(key, e_index_p)], dim=2)
        v_bank = torch.cat([v_bank, gather_positions(value, e_index_p)], dim=2)
        e_slots = torch.arange(num_blocks, num_blocks + extra_blocks, device=device)
        slots = torch.cat([slots, e_slots.expand(heads, num_tiles, -1)], dim=-1)
        bank_blocks += extra_blocks
    num_slots = slots.shape[-1]

    # one gather of whole blocks: (T, b, H, S) rows of the flattened bank
    kv_of_head = torch.arange(heads, device=device) // rep
    base = (torch.arange(b, device=device)[:, None] * kv_heads + kv_of_head) * bank_blocks  # (b, H)
    flat = (base[None, :, :, None] + slots.transpose(0, 1)[:, None]).flatten()
    k_tiles = k_bank.reshape(-1, block_size, head_dim).index_select(0, flat).view(num_tiles, b * heads, num_slots * block_size, head_dim)
    v_tiles = v_bank.reshape(-1, block_size, head_dim).index_select(0, flat).view(num_tiles, b * heads, num_slots * block_size, head_dim)
    q_tiles = blocks(query)[:, :, first_tile * block_size : (first_tile + num_tiles) * block_size]
    q_tiles = q_tiles.reshape(b, heads, num_tiles, block_size, head_dim).permute(2, 0, 1, 3, 4)
    q_tiles = q_tiles.reshape(num_tiles, b * heads, block_size, head_dim)

    # mask over the tile's local columns: (batch 1|b, heads 1|H, T, 1|c, S0 * block)
    query_pos = (tiles[:, None] * block_size + offsets).view(num_tiles, block_size, 1)
    if keep is None and extra_only is None:
        allowed = key_valid[None, None]  # random slots never hit padding or later positions: head-free
        positions = key_pos[0]
    else:
        positions = key_pos  # random blocks differ by head
        allowed = key_valid[None, None] & F.pad(keep if keep is not None else torch.ones_like(extra_only), (0, padded - length))[:, positions]
        if extra_only is not None:
            allowed = allowed & ~F.pad(extra_only, (0, padded - length))[:, positions]
    allowed = allowed[..., None, :]
    if causal:
        allowed = allowed & (positions[..., None, :] <= query_pos)
    if extra_only is not None:
        e_allowed = e_valid if keep is None else e_valid & torch.gather(keep, 1, e_index_p)
        e_allowed = e_allowed[:, None, None, None, :]
        if causal:
            e_allowed = e_allowed & (e_index_p[:, None, None, None, :] <= query_pos)
        shape = (b, heads, num_tiles, allowed.shape[-2], -1)
        allowed = torch.cat([allowed.expand(shape), e_allowed.expand(shape)], dim=-1)
    mask = additive_mask(allowed, dtype).permute(2, 0, 1, 3, 4)  # (T, 1|b, 1|H, 1|c, K)
    if mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0]
    else:  # batch-dependent: tiles x rows as SDPA's batch, heads broadcast where they can be
        mask = mask.expand(num_tiles, b, *mask.shape[2:]).reshape(num_tiles * b, *mask.shape[2:])
        q_tiles = q_tiles.reshape(num_tiles * b, heads, block_size, head_dim)
        k_tiles = k_tiles.reshape(num_tiles * b, heads, -1, head_dim)
        v_tiles = v_tiles.reshape(num_tiles * b, heads, -1, head_dim)
    out = F.scaled_dot_product_attention(q_tiles, k_tiles, v_tiles, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(num_tiles, b, heads, block_size, head_dim).permute(1, 0, 3, 2, 4).reshape(b, num_tiles * block_size, heads, head_dim)


def _dense_rows(query, key, value, index, valid, keep, causal, scaling, dropout, rep):
    """Global query rows at index (b, g) against all keys: (b, H, g, d)."""
    length = query.shape[2]
    allowed = valid[:, None, :, None]
    if causal:
        allowed = allowed & (torch.arange(length, device=query.device) <= index[:, None, :, None])
    return _attend_all_keys(gather_positions(query, index), key, value, allowed, keep, scaling, dropout, rep)


def _attend_all_keys(rows, key, value, allowed, keep, scaling, dropout, rep):
    """Query rows (b, H, g, d) against every key, ``allowed`` (b, 1, g, 1 | L) or None further restricting
    them. Grouped heads share their key head by stacking the group's rows, so keys are never repeated."""
    b, heads, g, head_dim = rows.shape
    length = key.shape[2]
    if keep is not None:
        allowed = keep[:, None, None, :] if allowed is None else allowed & keep[:, None, None, :]
    mask = None
    if allowed is not None and not bool(allowed.all()):
        allowed = allowed.expand(b, 1, g, length)
        mask = additive_mask(allowed, rows.dtype).repeat(1, 1, rep, 1)
    out = F.scaled_dot_product_attention(
        rows.reshape(b, key.shape[1], rep * g, head_dim), key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.view(b, heads, g, head_dim)


def _split_ready(query, keep, extra_only, dropout) -> bool:
    """The split path needs the CPU flash kernel's log-sum-exp; masks with holes, extra global tokens,
    dropout, other devices and a torch without working private CPU flash kernels (:func:`common.flash_cpu_ops`)
    take the gathered-tile path."""
    return (
        query.device.type == "cpu" and query.dtype == torch.float32 and keep is None and extra_only is None
        and not dropout and flash_cpu_ops() is not None
    )


class _Part:
    """One group of key blocks every tile reads: its keys/values (built from the padded banks), the query
    layout it uses (``stacked``: the heads sharing a key head stacked along the query axis), its additive
    mask and which query rows have any key at all (the CPU kernel reports log-sum-exp 0 for empty rows)."""

    def __init__(self, kind, mask, has_key, stacked):
        self.kind, self.mask, self.has_key, self.stacked = kind, mask, has_key, stacked


class _SplitTiles(torch.autograd.Function):
    """Tiles of query blocks against their band, random and global key blocks, as three flash-attention
    calls merged by log-sum-exp instead of one call on gathered, concatenated keys.

    The band is an overlapping strided view of the padded keys (no copy), the global blocks one small
    copy read as one key head shared by all tiles (the kernel's grouped-query heads: their key gradient
    comes out summed over tiles), and only the random blocks are gathered (saved for backward: their
    re-gather cost time and no less peak memory, which falls in the random part's backward either way). Backward feeds each call the merged output and log-sum-exp, which gives each part
    exactly its share of the joint softmax's gradient; the band's gradient is folded back with shifted
    adds, the random blocks' with one ``index_add_``.

    Given ``rows`` (the global query rows, (R, g, d)), the same Function also runs them against every
    key, split-KV over chunk views of the same padded banks (as :class:`_SplitKeys`, without copies of
    its own), their key gradients added in place into the banks' gradients; it returns (tiles' output,
    rows' output or an empty tensor).
    """

    @staticmethod
    def forward(ctx, q_tiles, k_pad, v_pad, rows, plan):
        outs, lses = [], []
        random_kv = (None, None)
        for part in plan["parts"]:
            q, k, v = _part_inputs(part, q_tiles, k_pad, v_pad, plan)
            if part.kind == "random":
                random_kv = (k, v)
            out, lse = flash_cpu_ops()[0](q, k, v, 0.0, False, attn_mask=part.mask, scale=plan["scale"])
            if part.kind == "global":  # (rows, tiles, ...) -> the tiles' layout
                out, lse = out.transpose(0, 1), lse.transpose(0, 1)
            lse = lse.reshape(q_tiles.shape[:3]).masked_fill(~part.has_key, float("-inf"))
            outs.append(out.reshape(q_tiles.shape))
            lses.append(lse)
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
        # in place where the kernel's fresh outputs allow: every large allocation costs page faults
        out = outs[0].float().mul_(torch.exp(lses[0] - lse)[..., None])
        for part_lse, part_out in zip(lses[1:], outs[1:]):
            out.addcmul_(part_out.float(), torch.exp(part_lse - lse)[..., None])
        out = out.to(q_tiles.dtype)
        merged = total = None
        if rows is not None:  # the global rows against every key, split-KV over the same padded banks
            q, k, v = _bank_chunks(rows, k_pad, v_pad, plan)
            row_out, row_lse = flash_cpu_ops()[0](q, k, v, 0.0, False, attn_mask=plan["key_mask"], scale=plan["scale"])
            total = torch.logsumexp(row_lse, dim=0)  # every chunk holds a real key: no empty rows
            merged = (row_out * torch.exp(row_lse - total)[..., None]).sum(0)
        ctx.save_for_backward(q_tiles, k_pad, v_pad, out, lse, rows, merged, total, *random_kv)
        ctx.plan = plan
        return out, (merged if merged is not None else out.new_zeros(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_rows):
        q_tiles, k_pad, v_pad, out, lse, row_q, merged, total, random_k, random_v = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_q = None
        grad_k, grad_v = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
        rows, blocks, block, head_dim = k_pad.shape[0], plan["bank_blocks"], plan["block_size"], k_pad.shape[-1]
        grad_k_blocks, grad_v_blocks = grad_k.view(rows, blocks, block, head_dim), grad_v.view(rows, blocks, block, head_dim)
        first = plan["first_tile"]
        for part in plan["parts"]:
            if part.kind == "random":  # the forward's gathered blocks, saved
                q, k, v = q_tiles.view(random_k.shape[0], 1, -1, q_tiles.shape[-1]), random_k, random_v
            else:
                q, k, v = _part_inputs(part, q_tiles, k_pad, v_pad, plan)
            if part.kind == "global":  # the tiles as grouped query heads of one key head: (rows, tiles, ...) views
                part_grad, part_out, part_lse = grad_out.transpose(0, 1), out.transpose(0, 1), lse.transpose(0, 1)
            else:
                shape = q.shape
                part_grad, part_out, part_lse = grad_out.view(shape), out.view(shape), lse.view(shape[:3])
            gq, gk, gv = flash_cpu_ops()[1](
                part_grad, q, k, v, part_out, part_lse, 0.0, False, attn_mask=part.mask, scale=plan["scale"],
            )
            gq = gq.transpose(0, 1) if part.kind == "global" else gq.reshape(q_tiles.shape)
            grad_q = gq if grad_q is None else grad_q.add_(gq)
            if part.kind == "band":
                # (tiles, rows, band_blocks * block, d) -> (rows, tiles, band_blocks, block, d) views
                fold_strided(grad_k_blocks, gk.transpose(0, 1).unflatten(2, (-1, block)), axis=1, step=1, first=first)
                fold_strided(grad_v_blocks, gv.transpose(0, 1).unflatten(2, (-1, block)), axis=1, step=1, first=first)
            elif part.kind == "random":
                grad_k.view(-1, block, head_dim).index_add_(0, plan["random_rows"], gk.view(-1, block, head_dim))
                grad_v.view(-1, block, head_dim).index_add_(0, plan["random_rows"], gv.view(-1, block, head_dim))
            else:
                ids = plan["global_blocks"]
                grad_k_blocks[:, ids] += gk.view(rows, len(ids), block, head_dim)
                grad_v_blocks[:, ids] += gv.view(rows, len(ids), block, head_dim)
        grad_row_q = None
        if row_q is not None:  # split-KV backward: each chunk's key gradient lands in place in the bank's gradient
            q, k, v = _bank_chunks(row_q, k_pad, v_pad, plan)
            chunks = q.shape[0]
            grad_row_q, gk, gv = flash_cpu_ops()[1](
                grad_rows.contiguous().expand(chunks, *grad_rows.shape), q, k, v, merged.expand(chunks, *merged.shape),
                total.expand(chunks, *total.shape), 0.0, False, attn_mask=plan["key_mask"], scale=plan["scale"],
            )
            grad_row_q = grad_row_q.sum(0)
            _bank_chunks(None, grad_k, None, plan)[1].add_(gk)
            _bank_chunks(None, grad_v, None, plan)[1].add_(gv)
        return grad_q, grad_k, grad_v, grad_row_q, None


def _bank_chunks(rows, k_pad, v_pad, plan):
    """rows (R, g, d) broadcast over the key chunks; the banks' real keys (from their second block on) as
    (chunks, R, chunk, d) views, the bank's padding beyond the last real key masked by ``plan["key_mask"]``."""
    chunks, chunk, block = plan["key_chunks"], plan["key_chunk"], plan["block_size"]

    def split(bank):
        if bank is None:
            return None
        head_dim = bank.shape[-1]
        return bank.as_strided((chunks, bank.shape[0], chunk, head_dim), (chunk * head_dim, bank.stride(0), head_dim, 1),
                               bank.storage_offset() + block * head_dim)

    return None if rows is None else rows.expand(chunks, *rows.shape), split(k_pad), split(v_pad)


def _part_inputs(part, q_tiles, k_pad, v_pad, plan):
    """(query, key, value) of one part, in the (tiles, batch x heads, rows, d) layout of the kernel."""
    tiles, rows = q_tiles.shape[:2]
    block, head_dim = plan["block_size"], k_pad.shape[-1]
    if part.kind == "band":
        span = plan["band_blocks"] * block
        strides = (block * head_dim, k_pad.stride(0), head_dim, 1)
        offset = k_pad.storage_offset() + plan["first_tile"] * block * head_dim
        return q_tiles, k_pad.as_strided((tiles, rows, span, head_dim), strides, offset), v_pad.as_strided(
            (tiles, rows, span, head_dim), strides, offset
        )
    if part.kind == "random":
        # every (tile, head) its own batch entry with one head: the kernel's key gradient then comes out
        # contiguous, ready for index_add_ without a copy
        heads_rows = rows * plan["rep"]
        q = q_tiles.view(tiles * heads_rows, 1, block, head_dim)
        index = plan["random_rows"]

        def gather(bank):
            return bank.view(-1, block, head_dim).index_select(0, index).view(tiles * heads_rows, 1, -1, head_dim)

        return q, gather(k_pad), gather(v_pad)
    ids = plan["global_blocks"]
    blocks = plan["bank_blocks"]

    def globals_of(bank):  # (rows, 1, globals, d): one key head shared by every tile (the kernel's grouped heads)
        return bank.view(rows, blocks, block, head_dim)[:, ids].reshape(rows, 1, -1, head_dim)

    # queries (rows, tiles, rep * c, d), a transposed view: the key gradient comes out summed over tiles
    return q_tiles.transpose(0, 1), globals_of(k_pad), globals_of(v_pad)


class _SplitKeys(torch.autograd.Function):
    """A few query rows against every key, the keys cut into chunks that become the kernel's batch
    (split-KV) and merged by log-sum-exp: the CPU kernel runs many short chunks much faster than one
    long key axis, and each chunk's key gradient lands in place."""

    @staticmethod
    def forward(ctx, rows, k_bank, v_bank, mask, chunk, scale):
        q, k, v = _key_chunks(rows, k_bank, v_bank, chunk)
        out, lse = flash_cpu_ops()[0](q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        total = torch.logsumexp(lse, dim=0)  # every chunk holds a real key: no empty rows
        merged = (out * torch.exp(lse - total)[..., None]).sum(0)
        ctx.save_for_backward(rows, k_bank, v_bank, mask, merged, total)
        ctx.chunk, ctx.scale = chunk, scale
        return merged

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, k_bank, v_bank, mask, merged, total = ctx.saved_tensors
        q, k, v = _key_chunks(rows, k_bank, v_bank, ctx.chunk)
        chunks = q.shape[0]
        gq, gk, gv = flash_cpu_ops()[1](
            grad.contiguous().expand(chunks, *grad.shape), q, k, v, merged.expand(chunks, *merged.shape),
            total.expand(chunks, *total.shape), 0.0, False, attn_mask=mask, scale=ctx.scale,
        )
        return gq.sum(0), gk.transpose(0, 1).reshape(k_bank.shape), gv.transpose(0, 1).reshape(v_bank.shape), None, None, None


def _key_chunks(rows, k_bank, v_bank, chunk):
    """rows (R, g, d) broadcast over chunks; banks (R, C * chunk, d) as (C, R, chunk, d) views."""
    chunks = k_bank.shape[1] // chunk

    def split(bank):
        return bank.view(bank.shape[0], chunks, chunk, bank.shape[-1]).transpose(0, 1)

    return rows.expand(chunks, *rows.shape), split(k_bank), split(v_bank)


def _split_key_rows(rows, key, value, scaling, rep, chunk=512):
    """Global rows (b, H, g, d) against all keys (b, H_kv, L, d), no masked key, through :class:`_SplitKeys`."""
    b, heads, g, head_dim = rows.shape
    kv_heads, length = key.shape[1], key.shape[2]
    chunk = min(chunk, length)
    chunks = -(-length // chunk)
    padded = chunks * chunk

    def bank(x):
        return F.pad(x, (0, 0, 0, padded - length)).reshape(b * kv_heads, padded, head_dim)

    mask = None
    if padded != length:
        position = torch.arange(padded, device=key.device).view(chunks, 1, 1, chunk)
        mask = additive_mask(position < length, key.dtype)
    out = _SplitKeys.apply(rows.reshape(b * kv_heads, rep * g, head_dim), bank(key), bank(value), mask, chunk, scaling)
    return out.view(b, heads, g, head_dim)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor | None:
    return None if bool(allowed.all()) else additive_mask(allowed, dtype)


def _split_tiles(query, key, value, tiles, index, valid, block_size, causal, scaling, rows=None, chunk=512):
    """Outputs (b, T * block_size, H, d) of the query blocks ``tiles`` through :class:`_SplitTiles`, and, given
    global query rows (b, H, g, d), their outputs (b, H, g, d) against every key (else None), from the same
    padded key/value banks.

    index/valid: :func:`block_layout` of the row length (band slots first, then the random ones)."""
    b, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    device, dtype = query.device, query.dtype
    num_blocks = -(-length // block_size)
    chunk = min(chunk, length)
    key_chunks = -(-length // chunk)
    # one empty block on each side: the band never leaves the bank; the key chunks of the global rows neither
    bank_blocks = num_blocks + 2 if rows is None else max(num_blocks + 2, 1 + -(-(key_chunks * chunk) // block_size))
    num_tiles, first = len(tiles), int(tiles[0])
    band_blocks = 2 if causal else 3
    global_ids = [0] if causal or num_blocks == 1 else [0, num_blocks - 1]
    offsets = torch.arange(block_size, device=device)
    query_pos = (tiles[:, None] * block_size + offsets)[:, None, :, None]  # (T, 1, c, 1)

    def stacked_rows(allowed):  # (T, 1, c, K) -> (T, 1, rep * c, K): the query rows of a key head's group
        return allowed if allowed.shape[2] == 1 or rep == 1 else allowed.repeat(1, 1, rep, 1)

    def part(kind, allowed, stacked):
        allowed = stacked_rows(allowed) if stacked else allowed
        has_key = allowed.any(-1)  # (T, 1, 1 | rep*c), broadcast against the merged (T, b*H_kv, rep*c)
        return _Part(kind, _additive(allowed, dtype), has_key, stacked)

    parts = []
    band = tiles[:, None] - 1 + torch.arange(band_blocks, device=device)  # (T, slots)
    band_ok = (band >= 0) & (band < num_blocks) & ~(band[..., None] == torch.tensor(global_ids, device=device)).any(-1)
    band_pos = (band[..., None] * block_size + offsets).flatten(-2)  # (T, slots * c)
    band_allowed = (band_ok.repeat_interleave(block_size, -1) & (band_pos < length))[:, None, None, :]
    if causal:
        band_allowed = band_allowed & (band_pos[:, None, None, :] <= query_pos)
    parts.append(part("band", band_allowed, True))

    random_rows = None
    if index.shape[-1] > band_blocks:
        random_ids, random_ok = index[:, tiles, band_blocks:], valid[0, tiles, band_blocks:]
        if bool(random_ok.any()):
            kv_of_head = torch.arange(heads, device=device) // rep
            base = (torch.arange(b, device=device)[:, None] * kv_heads + kv_of_head) * bank_blocks  # (b, H)
            random_rows = (base[None, :, :, None] + 1 + random_ids.transpose(0, 1)[:, None]).flatten()
            random_allowed = random_ok.repeat_interleave(block_size, -1)[:, None, None, :]
            parts.append(part("random", random_allowed, False))
            if parts[-1].mask is not None:  # (T, 1, 1, K) -> one row per (tile, head) batch entry
                parts[-1].mask = parts[-1].mask.repeat_interleave(b * heads, 0)

    global_pos = (torch.tensor(global_ids, device=device)[:, None] * block_size + offsets).flatten()
    global_allowed = (global_pos < length)[None, None, None, :]
    if causal:
        global_allowed = global_allowed & (global_pos <= query_pos)
    parts.append(part("global", global_allowed, True))
    if parts[-1].mask is not None:  # (T, 1, 1 | rep*c, K) -> (1, T, ...): the global part runs tiles as heads
        parts[-1].mask = parts[-1].mask.transpose(0, 1)

    def bank(x):
        x = F.pad(x, (0, 0, block_size, (bank_blocks - 1) * block_size - length))
        return x.reshape(b * kv_heads, bank_blocks * block_size, head_dim)

    key_mask = None
    if rows is not None and key_chunks * chunk != length:
        position = torch.arange(key_chunks * chunk, device=device).view(key_chunks, 1, 1, chunk)
        key_mask = additive_mask(position < length, dtype)

    end = (first + num_tiles) * block_size
    q_tiles = query if end <= length else F.pad(query, (0, 0, 0, end - length))  # the pad only where a tile needs it
    q_tiles = q_tiles[:, :, first * block_size : end]
    q_tiles = q_tiles.reshape(b, kv_heads, rep, num_tiles, block_size, head_dim).permute(3, 0, 1, 2, 4, 5)
    q_tiles = q_tiles.reshape(num_tiles, b * kv_heads, rep * block_size, head_dim).contiguous()
    plan = {
        "parts": parts, "scale": scaling, "block_size": block_size, "bank_blocks": bank_blocks, "rep": rep,
        "first_tile": first, "band_blocks": band_blocks, "random_rows": random_rows,
        "global_blocks": torch.tensor(global_ids, device=device) + 1,
        "key_chunk": chunk, "key_chunks": key_chunks, "key_mask": key_mask,
    }
    g = None if rows is None else rows.shape[2]
    if rows is not None:
        rows = rows.reshape(b * kv_heads, rep * g, head_dim)
    out, row_out = _SplitTiles.apply(q_tiles, bank(key), bank(value), rows, plan)
    out = out.view(num_tiles, b, heads, block_size, head_dim).permute(1, 0, 3, 2, 4)
    out = out.reshape(b, num_tiles * block_size, heads, head_dim)
    return out, (None if rows is None else row_out.view(b, heads, g, head_dim))


def validate(config) -> None:
    settings(config)
    route_setting(config, NAME)
    if config.block_size > config.max_position_embeddings:
        raise ValueError(
            f"{NAME}: block_size={config.block_size} exceeds max_position_embeddings={config.max_position_embeddings}; "
            f"valid block sizes are 1..{config.max_position_embeddings} (BigBird uses 64)."
        )


COMPONENT = Component(
    kind="attention",
    name=NAME,
    factory=block_sparse_attention,
    mask_factory=padding_mask,
    description="BigBird block sparse: sliding + global + seeded random blocks (block_size, num_random_blocks).",
    config_defaults=DEFAULTS,
    validate_config=validate,
    supports_kv_cache=False,  # every call needs the whole sequence (require_full_sequence)
)
