"""BigBird-style block-sparse attention (ITC): sliding blocks, global blocks and random blocks.

Semantics, on the sequence cut into blocks of ``block_size`` (the last block padded internally):

- every query block attends to its own block and the one on each side (causal: the one before);
- the first and the last block are global (causal: the first only): they attend to every key and
  every query attends to them; ``global_attention_mask`` / ``config.global_attention_token_ids`` add
  global tokens exactly as in ``hfx_sliding_window``;
- each query block also attends to ``num_random_blocks`` random key blocks per head, drawn from the
  whole sequence among the blocks it does not already see (causal: among earlier blocks), reproducibly
  from ``block_sparse_seed`` and the layer index;
- causal: within a block, the causal mask holds token by token; padded keys are never attended.

How: the layout is (heads, blocks, slots) block indices; the selected key blocks are gathered into
tiles and run through SDPA as one batch, so memory is O(n * block_size * (3 + num_random_blocks));
no (n, n) tensor exists (the layout itself is blocks x blocks, n^2 / block_size^2 numbers).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from hfx.registry import Component

from .common import (
    require_full_sequence,
    check_positive_int,
    expand_kv,
    global_flags,
    global_index,
    global_rows,
    is_causal,
    key_padding,
    padding_mask,
    scatter_rows,
    sdpa_tiles,
    with_global_keys,
)

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
    besides the global ones. Invalid slots (outside the sequence, or too few candidates) are masked."""
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


def global_blocks(batch: int, length: int, block_size: int, causal: bool, device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    last_block_start = (-(-length // block_size) - 1) * block_size
    flags = positions < block_size
    if not causal:
        flags |= positions >= last_block_start
    return flags[None].expand(batch, -1)


def block_sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, n, d), key/value (B, H_kv, n, d) -> (B, n, H, d), None."""
    config = getattr(module, "config", None)
    block_size, num_random, seed = settings(config)
    causal = is_causal(module, kwargs)
    batch, heads, length, head_dim = query.shape
    require_full_sequence(key, length, NAME)
    keep = key_padding(attention_mask, batch, length, query.device, NAME)
    flags = global_blocks(batch, length, block_size, causal, query.device)
    extra = global_flags(kwargs, config, batch, length, query.device, NAME)
    if extra is not None:
        flags = flags | extra
    key, value = expand_kv(query, key, value)
    scaling = head_dim**-0.5 if scaling is None else scaling

    num_blocks = -(-length // block_size)
    padded = num_blocks * block_size
    layer = getattr(module, "layer_idx", None) or 0
    index, valid = (t.to(query.device) for t in block_layout(num_blocks, heads, num_random, seed, layer, causal))
    slots = index.shape[-1]

    def pad(x):
        return F.pad(x, (0, 0, 0, padded - length))

    heads_idx = torch.arange(heads, device=query.device)[:, None, None]
    q_tiles = pad(query).view(batch, heads, num_blocks, block_size, head_dim)
    k_tiles = pad(key).view(batch, heads, num_blocks, block_size, head_dim)[:, heads_idx, index]
    v_tiles = pad(value).view(batch, heads, num_blocks, block_size, head_dim)[:, heads_idx, index]
    k_tiles = k_tiles.reshape(batch, heads, num_blocks, slots * block_size, head_dim)
    v_tiles = v_tiles.reshape(batch, heads, num_blocks, slots * block_size, head_dim)

    offsets = torch.arange(block_size, device=query.device)
    key_pos = (index[..., None] * block_size + offsets).flatten(-2)
    local_keys = F.pad(keep & ~flags, (0, padded - length), value=False)[:, key_pos]
    local_keys &= valid.repeat_interleave(block_size, dim=-1)
    allowed = local_keys[:, :, :, None, :].expand(-1, -1, -1, block_size, -1)
    if causal:
        query_pos = torch.arange(padded, device=query.device).view(num_blocks, block_size, 1)
        allowed = allowed & (key_pos[:, :, None, :] <= query_pos)

    index_g, valid_g = global_index(flags)
    k_tiles, v_tiles, allowed = with_global_keys(
        k_tiles, v_tiles, allowed, key, value, keep, index_g, valid_g, causal, block_size
    )
    out = sdpa_tiles(q_tiles, k_tiles, v_tiles, allowed, scaling, dropout)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded, heads, head_dim)[:, :length]
    rows = global_rows(query, key, value, index_g, valid_g, keep, causal, scaling, dropout)
    return scatter_rows(out, index_g, valid_g, rows), None


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
