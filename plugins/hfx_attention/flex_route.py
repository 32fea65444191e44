"""The FlexAttention route of the long-context backends, and the choice between it and the tiled path.

On CUDA, FlexAttention with a ``BlockMask`` runs only the key blocks a pattern touches, fused, with a
backward; that beats gathering tiles for SDPA. On CPU, Flex is forward-only (Inductor C++), so CPU
training always stays on the tiled path. The choice is ``config.attention_route``:

- ``"auto"`` (default): Flex on CUDA for a full forward (as many queries as keys) without attention
  dropout, when ``torch.nn.attention.flex_attention`` and its compiler (Triton) are usable; tiled
  otherwise (CPU, cached decoding, dropout, no Triton).
- ``"tiled"``: always the tiled SDPA path.
- ``"flex"``: always Flex; refused, before any work, where it cannot run (gradients on CPU, dropout,
  no compiler).

Both routes compute the same masked softmax; only the summation order differs. The ``BlockMask`` is
built from block-level arithmetic (never from an (n, n) mask, which ``create_block_mask`` would
materialise), and the exact token-level pattern is the ``mask_mod``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from functools import lru_cache

import torch

ROUTES = ("auto", "tiled", "flex")
FLEX_BLOCK = 128  # Flex's default sparse block; a multiple of every kernel tile it picks


def route_setting(config, name: str) -> str:
    route = getattr(config, "attention_route", "auto") if config is not None else "auto"
    if route not in ROUTES:
        raise ValueError(f"{name}: attention_route must be one of {', '.join(map(repr, ROUTES))}; got {route!r}.")
    return route


# the keyword arguments this route passes (block_mask_from_dense, run_flex): an older torch that has the module
# but not these would fail with a TypeError at the first forward
FLEX_API = (("BlockMask.from_kv_blocks", "seq_lengths"), ("flex_attention", "enable_gqa"))


@lru_cache(maxsize=1)
def flex_api_missing() -> str | None:
    """Which keyword argument this route needs that the installed Flex API lacks, or None when it has them all."""
    from torch.nn.attention import flex_attention as module

    for qualified, argument in FLEX_API:
        target = module
        for part in qualified.split("."):
            target = getattr(target, part, None)
        if target is None:
            return f"torch {torch.__version__}'s torch.nn.attention.flex_attention has no {qualified}"
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):  # no signature to read: assume it takes what the documented API takes
            continue
        if argument not in parameters:
            return f"torch {torch.__version__}'s {qualified} takes no {argument}= (needed by the Flex route)"
    return None


def flex_unusable(device: torch.device) -> str | None:
    """Why FlexAttention cannot run on ``device`` here, or None when it can."""
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention is routed only on CPU and CUDA, not on {device.type!r}"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    missing = flex_api_missing()
    if missing:
        return missing
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "FlexAttention on CUDA compiles with Triton, which is not installed"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        return "FlexAttention on CPU compiles C++ through Inductor, and no C++ compiler (CXX, c++, g++, clang++) is on PATH"
    return None


def choose_route(config, query, key, value, dropout: float, name: str) -> str:
    """``"flex"`` or ``"tiled"`` for this call; see the module docstring for the rules."""
    route = route_setting(config, name)
    if route == "tiled":
        return "tiled"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if route == "auto":
        usable = query.is_cuda and dropout == 0 and query.shape[2] == key.shape[2] and flex_unusable(query.device) is None
        return "flex" if usable else "tiled"
    if query.device.type == "cpu" and needs_grad:
        raise ValueError(
            f"{name}: attention_route='flex' on CPU runs forward only (FlexAttention has no CPU backward), but gradients "
            "are needed here; use attention_route='auto' or 'tiled' to train on CPU, or run under torch.no_grad()."
        )
    if dropout:
        raise ValueError(
            f"{name}: attention_route='flex' has no attention dropout, got dropout={dropout}; set the attention dropout "
            "to 0 or use attention_route='auto' / 'tiled'."
        )
    reason = flex_unusable(query.device)
    if reason:
        raise ValueError(f"{name}: attention_route='flex' cannot run: {reason}; use attention_route='auto' or 'tiled'.")
    return "flex"


@lru_cache(maxsize=2)
def compiled_flex(device_type: str):
    """One compiled ``flex_attention`` per device type for the process. CUDA: Dynamo's default dynamism (the
    first shape static, a second length recompiles once with a symbolic length). CPU: static shapes, one
    compile per shape, because Inductor's C++ Flex template fails to compile with symbolic shapes in torch 2.13."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def _ordered(blocks: torch.Tensor):
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, order


def block_mask_from_dense(blocks: torch.Tensor, full: torch.Tensor, mask_mod, q_length: int, kv_length: int):
    """A ``BlockMask`` from bool (B, H | 1, q_tiles, kv_tiles) of FLEX_BLOCK-square tiles that may hold an allowed
    pair, and the subset ``full`` in which every pair is allowed (Flex skips ``mask_mod`` there)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts, order = _ordered(blocks & ~full)
    full_counts, full_order = _ordered(full)
    return BlockMask.from_kv_blocks(counts, order, full_counts, full_order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(q_length, kv_length))


def tiles(x: torch.Tensor, length: int, fill) -> torch.Tensor:
    """(B, n) -> (B, ceil(n / FLEX_BLOCK), FLEX_BLOCK), the tail filled with ``fill``."""
    return torch.nn.functional.pad(x, (0, -length % FLEX_BLOCK), value=fill).view(x.shape[0], -1, FLEX_BLOCK)


def run_flex(query, key, value, block_mask, scaling: float) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]  # grouped heads: Flex shares each key head, nothing is repeated
    out = compiled_flex(query.device.type)(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, q, H, d), as the AttentionInterface returns


def scalar(value: int, device) -> torch.Tensor:
    # Settings enter mask_mod as tensors, not Python ints: Dynamo specialises on ints and would compile
    # one kernel per window / causality / offset; tensors share one compiled graph per shape.
    return torch.tensor(value, device=device)


def sliding_window_tiles(keep, flags, segments, length: int, half: int, causal: bool):
    """Which FLEX_BLOCK tiles of the sliding-window pattern may hold an allowed pair, and which hold only allowed
    pairs: two bool (B, q_tiles, kv_tiles), from block arithmetic (O(n^2 / FLEX_BLOCK^2), no (n, n) mask).
    keep/flags/segments (B, K) as in :func:`sliding_window_flex` (flags, segments may be None); the ``length``
    queries are the last of the K keys."""
    batch, kv_length = keep.shape
    device = keep.device
    offset = kv_length - length
    after = 0 if causal else half
    flags = torch.zeros_like(keep) if flags is None else flags
    segments = torch.zeros(batch, kv_length, dtype=torch.long, device=device) if segments is None else segments
    q_start = torch.arange(0, length, FLEX_BLOCK, device=device) + offset
    q_end = (q_start + FLEX_BLOCK - 1).clamp(max=kv_length - 1)
    k_start = torch.arange(0, kv_length, FLEX_BLOCK, device=device)
    k_end = (k_start + FLEX_BLOCK - 1).clamp(max=kv_length - 1)
    blocks = (k_start[None] <= q_end[:, None] + after) & (k_end[None] >= q_start[:, None] - half)
    # every pair of the tile inside the band: its farthest corners are
    band_full = (q_end[:, None] - k_start[None] <= half) & (k_end[None] - q_start[:, None] <= after)
    if causal:
        blocks &= k_start[None] <= q_end[:, None]
    blocks = blocks[None].expand(batch, -1, -1)
    global_q = tiles(flags[:, offset:], length, False).any(-1)[:, :, None]
    global_k = tiles(flags & keep, kv_length, False).any(-1)[:, None, :]
    blocks = (blocks | global_q | global_k) & tiles(keep, kv_length, False).any(-1)[:, None, :]
    # a full tile: all its keys kept, one packed sequence on both sides, no ragged tail
    k_tiles = tiles(segments, kv_length, -1)
    q_tiles = tiles(segments[:, offset:], length, -2)
    one_q = (q_tiles == q_tiles[..., :1]).all(-1)
    one_k = (k_tiles == k_tiles[..., :1]).all(-1) & tiles(keep, kv_length, False).all(-1)
    same = one_q[:, :, None] & one_k[:, None, :] & (q_tiles[:, :, None, 0] == k_tiles[:, None, :, 0])
    full = band_full[None] & same
    if causal:
        full &= (k_end[None] <= q_start[:, None])[None]
    return blocks, full


def sliding_window_flex(query, key, value, keep, flags, half: int, causal: bool, scaling: float, segments=None):
    """``hfx_sliding_window``'s pattern through Flex: query (B, H, q, d), key/value (B, H, K, d) with the q queries
    the last q of the K keys; keep (B, K) bool; flags (B, K) bool global tokens or None; segments (B, K) int
    packed-sequence ids or None. Returns (B, q, H, d). Same semantics as ``sliding_window.banded_attention``."""
    batch, _, length, _ = query.shape
    kv_length, device = key.shape[2], query.device
    offset = kv_length - length
    after = 0 if causal else half
    flags = torch.zeros_like(keep) if flags is None else flags
    segments = torch.zeros(batch, kv_length, dtype=torch.long, device=device) if segments is None else segments
    half_t, after_t, offset_t = scalar(half, device), scalar(after, device), scalar(offset, device)
    reach = scalar(0 if causal else kv_length, device)  # how far after its query a key may be

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset_t
        distance = q_pos - kv_idx
        allowed = ((distance <= half_t) & (distance >= -after_t)) | flags[b, q_pos] | flags[b, kv_idx]
        allowed = allowed & (kv_idx <= q_pos + reach) & (segments[b, q_pos] == segments[b, kv_idx])
        return allowed & keep[b, kv_idx]

    blocks, full = sliding_window_tiles(keep, flags, segments, length, half, causal)
    block_mask = block_mask_from_dense(blocks[:, None], full[:, None], mask_mod, length, kv_length)
    return run_flex(query, key, value, block_mask, scaling)


def layout_blocks(index: torch.Tensor, valid: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``block_sparse.block_layout``'s (…, H, blocks, slots) index/valid -> bool (…, H, blocks, blocks)."""
    counts = torch.zeros(*index.shape[:-1], num_blocks, dtype=torch.int32, device=index.device)
    return counts.scatter_add_(-1, index, valid.int()) > 0  # a sum: an invalid duplicate slot never clears a valid one


def coarse_counts(blocks: torch.Tensor, block_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool (…, nb, nb) over block_size tiles: per FLEX_BLOCK tile pair, how many fine pairs overlapping it are
    set, and how many overlap it at all. overlap @ blocks @ overlap^T: O(nb^2 nf), never O(n^2)."""
    fine = torch.arange(blocks.shape[-1], device=blocks.device)
    coarse = torch.arange(-(-length // FLEX_BLOCK), device=blocks.device)
    first, last = fine * block_size, ((fine + 1) * block_size).clamp(max=length) - 1
    overlap = ((first[None] // FLEX_BLOCK <= coarse[:, None]) & (last[None] // FLEX_BLOCK >= coarse[:, None])).float()
    per_tile = overlap.sum(-1)
    return overlap @ blocks.float() @ overlap.T, per_tile[:, None] * per_tile[None]


def block_sparse_tiles(keep, flags, blocks, block_size: int, causal: bool):
    """FLEX_BLOCK tiles of the block-sparse pattern that may hold an allowed pair / hold only allowed pairs: two
    bool (B, H, q_tiles, kv_tiles). keep/flags (B, n); blocks (B, H, nb, nb) as in :func:`block_sparse_flex`."""
    length, device = keep.shape[1], keep.device
    set_pairs, all_pairs = coarse_counts(blocks, block_size, length)
    kept = tiles(keep, length, False)
    coarse = (set_pairs > 0) | tiles(flags, length, False).any(-1)[:, None, :, None]
    coarse |= tiles(flags & keep, length, False).any(-1)[:, None, None, :]
    coarse &= kept.any(-1)[:, None, None, :]
    full = (set_pairs == all_pairs) & kept.all(-1)[:, None, None, :]
    start = torch.arange(0, length, FLEX_BLOCK, device=device)
    if causal:
        coarse &= start[None] <= start[:, None]
        full &= start[None] < start[:, None]
    return coarse, full


def block_sparse_flex(query, key, value, keep, flags, blocks, block_size: int, causal: bool, scaling: float):
    """``hfx_block_sparse``'s pattern through Flex. query/key/value (B, H, n, d); keep (B, n) bool; flags (B, n)
    bool global tokens (the global blocks included); blocks bool (B | 1, H, nb, nb): the key blocks each query
    block reads besides the global ones (:func:`layout_blocks`). Returns (B, n, H, d).

    A key is attended when it is kept, causal-allowed, and global, or its query is global, or its block pair
    is in ``blocks``: the union the tiled path computes without counting a key twice."""
    batch, heads, length, _ = query.shape
    device = query.device
    blocks = blocks.expand(batch, heads, -1, -1)
    size_t, reach = scalar(block_size, device), scalar(0 if causal else length, device)

    def mask_mod(b, h, q_idx, kv_idx):
        pair = blocks[b, h, q_idx // size_t, kv_idx // size_t]
        allowed = (pair | flags[b, q_idx] | flags[b, kv_idx]) & keep[b, kv_idx]
        return allowed & (kv_idx <= q_idx + reach)

    coarse, full = block_sparse_tiles(keep, flags, blocks, block_size, causal)
    block_mask = block_mask_from_dense(coarse, full, mask_mod, length, length)
    return run_flex(query, key, value, block_mask, scaling)


def block_sparse_flex_rows(query, key, value, keep, extra, block_size: int, num_random: int, seed: int, layer: int,
                           causal: bool, scaling: float):
    """``hfx_block_sparse`` through Flex for a whole batch in one call. Each row keeps its own layout, global
    blocks and random blocks, derived from its real length (last real token + 1) as the tiled path derives
    them, so the result does not depend on right-padding; outputs past a row's real length are zeros, as there.
    keep (B, n) bool; extra (B, n) bool extra global tokens or None. Returns (B, n, H, d)."""
    from .block_sparse import block_layout
    from .common import real_lengths

    batch, heads, length, _ = query.shape
    device = query.device
    lengths = real_lengths(keep)
    num_blocks = -(-length // block_size)
    positions = torch.arange(length, device=device)
    blocks = torch.zeros(batch, heads, num_blocks, num_blocks, dtype=torch.bool, device=device)
    for real in lengths.unique().tolist():
        if real == 0:
            continue
        own = -(-real // block_size)
        index, valid = (t.to(device) for t in block_layout(own, heads, num_random, seed, layer, causal))
        rows = (lengths == real).nonzero().flatten()
        blocks[rows, :, :own, :own] = layout_blocks(index, valid, own)
    inside = positions[None] < lengths[:, None]
    last_start = (lengths - 1).div(block_size, rounding_mode="floor") * block_size
    flags = positions[None] < block_size
    if not causal:
        flags = flags | (positions[None] >= last_start[:, None])
    if extra is not None:
        flags = flags | extra
    flags = flags & inside
    out = block_sparse_flex(query, key, value, keep & inside, flags, blocks, block_size, causal, scaling)
    return out * inside[:, :, None, None]
