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
    check_positive_int,
    gather_positions,
    global_flags,
    global_index,
    is_causal,
    key_padding,
    padding_mask,
    require_full_sequence,
    scatter_rows,
)
from .flex_route import block_sparse_flex_rows, choose_route

NAME = "hfx_block_sparse"
DEFAULTS = {"block_size": 64, "num_random_blocks": 3, "block_sparse_seed": 0, "global_attention_token_ids": None}


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


def real_lengths(keep: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last real token + 1 (0 for a row with none)."""
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    return (keep * positions).amax(-1)


def block_sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, n, d), key/value (B, H_kv, n, d) -> (B, n, H, d), None."""
    config = getattr(module, "config", None)
    block_size, num_random, seed = settings(config)
    causal = is_causal(module, kwargs)
    batch, heads, length, head_dim = query.shape
    require_full_sequence(key, length, NAME)
    if heads % key.shape[1]:
        raise ValueError(f"{NAME}: {heads} query heads cannot share {key.shape[1]} key/value heads (need a divisor).")
    keep = key_padding(attention_mask, batch, length, query.device, NAME)
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

    out = query.new_zeros(b, length, heads, head_dim)
    if num_tiles:
        out = _tiles(query, key, value, keep, extra_only, tiles, slots, valid, block_size, causal, scaling, dropout)
        if not causal:  # the first and last block come from the global rows below
            out = F.pad(out, (0, 0, 0, 0, block_size, length - (num_blocks - 1) * block_size))
        else:
            out = out[:, :length]
    elif causal:
        raise AssertionError("a causal layout always has tiles")

    # Global query rows attend to every key (causal: every earlier key). Causal block 0 is exact as a tile.
    flags = block_global[None].expand(b, -1) if not causal else torch.zeros(b, length, dtype=torch.bool, device=device)
    if extra_only is not None:
        flags = flags | extra_only
    if not bool(flags.any()):
        return out
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
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    mask = mask.permute(2, 0, 1, 3, 4)  # (T, 1|b, 1|H, 1|c, K)
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
    """Global query rows (b, g) against all keys: (b, H, g, d). Grouped heads share their key head by
    stacking the group's query rows, so keys are never repeated."""
    b, heads, length, head_dim = query.shape
    rows = gather_positions(query, index)  # (b, H, g, d)
    g = rows.shape[2]
    allowed = valid[:, None, :, None]
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(length, device=query.device) <= index[:, None, :, None])
    mask = None
    if not bool(allowed.all()):
        allowed = allowed.expand(b, 1, g, length)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
        mask = mask.repeat(1, 1, rep, 1)
    out = F.scaled_dot_product_attention(
        rows.reshape(b, key.shape[1], rep * g, head_dim), key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.view(b, heads, g, head_dim)


def validate(config) -> None:
    settings(config)
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
)
