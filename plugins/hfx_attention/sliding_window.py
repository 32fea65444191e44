"""Longformer-style attention: a sliding window around each token plus global tokens.

Semantics (Longformer's, for any model):

- ``attention_window`` is the TOTAL window and must be even: token i attends to j when
  |i - j| <= attention_window / 2; causal: the current token and the attention_window / 2 before it.
  One value for all layers or one per layer.
- global tokens (``global_attention_mask`` forward argument, 1 = global, and/or the token ids in
  ``config.global_attention_token_ids``) attend to every key and are attended by every query
  (causal: only by queries at or after them); each key is counted once.
- padded keys are never attended; outputs at padded query positions are meaningless.

How: queries are cut into tiles of ``chunk`` rows; each tile sees one strided window of the keys,
``chunk + attention_window`` wide. On CPU without global tokens or dropout (:class:`FlashBand`) the windows
are zero-copy views, interior tiles share one broadcast band mask, and PyTorch's fused flash CPU kernels run
forward and backward. Otherwise every tile goes through SDPA as one batch (:func:`tiled_band`), global
keys appended to every tile and global queries one dense row each. Memory is O(n * attention_window); no
(n, n) tensor exists. Packed sequences (``position_ids`` restarts, ``cu_seq_lens_*``) never see each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hfx.registry import Component

from .common import (
    additive_mask,
    check_self_attention,
    expand_kv,
    flash_cpu_ops,
    fold_strided,
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
from .flex_route import choose_route, route_setting, sliding_window_flex

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
    key, value = expand_kv(query, key, value, NAME)
    scaling = head_dim**-0.5 if scaling is None else scaling
    if choose_route(config, query, key, value, dropout, NAME) == "flex":  # config.attention_route; see flex_route.py
        return sliding_window_flex(query, key, value, keep, flags, window // 2, causal, scaling, segments), None
    out = banded_attention(query, key, value, keep, flags, window // 2, causal, scaling, dropout, segments=segments)
    return out, None


def banded_attention(query, key, value, keep, flags, half: int, causal: bool, scaling: float, dropout: float, segments=None):
    """Band of half-width ``half`` plus global tokens. query (B, H, n, d); key/value (B, H, K, d), K >= n
    (causal decoding: the n queries are the last n of the K keys). Returns (B, n, H, d).

    ``segments`` (B, n) int, from :func:`common.sequence_ids`: packed sequences, none of which sees another
    (global tokens included); only with as many keys as queries.

    On CPU, without global tokens or dropout, a full forward goes through :class:`FlashBand` (zero-copy key
    windows, PyTorch's fused CPU flash kernel forward and backward); everything else through the tiled SDPA
    path below, which gives the same numbers."""
    batch, heads, length, head_dim = query.shape
    offset = key.shape[2] - length
    if segments is not None and offset:
        raise ValueError(f"{NAME}: packed sequences need as many keys as queries; got {length} queries, {key.shape[2]} keys.")
    if flash_band_applies(query, key, value, flags, dropout):
        return FlashBand.apply(query, key, value, keep, segments, half, causal, scaling)
    return tiled_band(query, key, value, keep, flags, half, causal, scaling, dropout, segments)


def tiled_band(query, key, value, keep, flags, half: int, causal: bool, scaling: float, dropout: float, segments=None):
    """The general path: every tile's keys gathered by ``unfold`` and one SDPA call over all tiles."""
    batch, heads, length, head_dim = query.shape
    offset = key.shape[2] - length
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


# ---------------------------------------------------------------------------------------------------------
# Fast CPU path.
#
# The profile of the tiled path (one layer, n=8192, attention_window=512) put half of the forward outside the
# attention kernel: `unfold` + `reshape` copying every key 3x, the bool mask expanded per tile and converted
# to float inside SDPA, and in backward `unfold_backward` and zero-fills. Here the rows of all batch entries
# form one stream of tiles of ``chunk`` queries; tile t's keys are the stream window [t*chunk - before,
# t*chunk + chunk + after), an `as_strided` view of the key stream itself (no copy), and the same (chunk,
# span) float band mask is broadcast over every tile. Only "special" tiles (a window that reaches padding, a
# row or packed-sequence boundary, or the ends of the stream) get a mask of their own. Forward and backward
# call PyTorch's fused flash-attention CPU kernels directly; the backward recomputes the scores from the
# saved logsumexp (memory O(n * d) saved, O(window) per tile while it runs) and folds the per-window key
# gradients back onto the buffer with a few shifted adds.

FLASH_CHUNK = 64  # forward tile rows: a window of 512 computes 576 columns for 513 useful ones
FLASH_BACKWARD_CHUNK = 128  # backward tiles: measured faster than 64 (fewer, larger window gradients to fold)
# largest key-window gradient the backward holds at once (elements): bounds peak memory, not the result
BACKWARD_WINDOW_ELEMENTS = 1 << 19
# above this share of special tiles one materialised mask for every tile is cheaper than gathering windows
SPECIAL_SHARE = 0.25
FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def flash_band_applies(query, key, value, flags, dropout: float) -> bool:
    """The fused CPU kernel has no dropout; global tokens, cached decoding and a torch without working
    private CPU flash kernels (:func:`common.flash_cpu_ops`) take the tiled path."""
    return (
        query.device.type == "cpu"
        and query.dtype in FLASH_DTYPES
        and key.dtype == query.dtype
        and flags is None
        and not dropout
        and key.shape[2] == query.shape[2]
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and flash_cpu_ops() is not None
    )


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class BandPlan:
    """Geometry and masks of one call: which tiles are plain (the shared band mask is exact for them) and the
    exact masks of the others. Built once per forward from the key padding and packed-sequence ids."""

    def __init__(self, keep, segments, batch: int, length: int, half: int, causal: bool, dtype, device):
        self.before, self.after = half, 0 if causal else half
        reach = self.before + self.after
        # short sequences: one tile (a power of two, so that it divides the other chunk)
        small = max(8, 1 << (length - 1).bit_length())
        self.chunk = min(FLASH_CHUNK, small)
        self.back_chunk = min(max(FLASH_BACKWARD_CHUNK, self.chunk), max(small, self.chunk))
        # both tilings cut the same stream: rows padded to a multiple of the larger chunk (a multiple of the
        # smaller), and the window width rounded up to a multiple of the forward chunk, so that every window
        # starts and ends on a forward-chunk boundary
        self.row = _round_up(length, self.back_chunk)
        self.stride_pad = _round_up(reach, self.chunk)  # window = chunk + stride_pad columns
        self.batch, self.length, self.dtype, self.device = batch, length, dtype, device
        self.stream = batch * self.row
        self.buffer = self.before + self.stream + self.stride_pad - self.before  # keys, with both pads
        # per buffer position: attendable key, and the sequence it belongs to (-1: none)
        valid = torch.zeros(self.buffer, dtype=torch.bool, device=device)
        inner = valid[self.before : self.before + self.stream].view(batch, self.row)
        inner[:, :length] = keep
        sid = torch.full((self.buffer,), -1, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)[:, None]
        ids = rows.expand(batch, length) if segments is None else rows * (int(segments.max()) + 1) + segments
        sid[self.before : self.before + self.stream].view(batch, self.row)[:, :length] = ids
        sid[~valid] = -1
        self.valid, self.sid = valid, sid
        self._tilings: dict[int, dict] = {}

    def tiling(self, chunk: int) -> dict:
        """The layout of one chunk size, built when first asked for (the backward's only if there is one)."""
        if chunk not in self._tilings:
            self._tilings[chunk] = self._tiling(chunk)
        return self._tilings[chunk]

    def drop_tiling(self, chunk: int) -> None:
        """Forget one chunk size's layout (its masks), e.g. the forward's once the forward is done."""
        self._tilings.pop(chunk, None)

    def _tiling(self, chunk: int) -> dict:
        """Which tiles of this chunk size are plain; runs of consecutive plain tiles; masks for the rest."""
        tiles = self.stream // chunk
        span = chunk + self.stride_pad
        reach = self.before + self.after
        starts = torch.arange(tiles, device=self.device) * chunk
        invalid = F.pad((~self.valid).long().cumsum(0), (1, 0))
        change = F.pad(F.pad((self.sid[1:] != self.sid[:-1]).long(), (1, 0)).cumsum(0), (1, 0))
        end = starts + chunk + reach  # the band never reaches further in the window
        plain = (invalid[end] == invalid[starts]) & (change[end] == change[starts + 1])
        # plain windows are views of the key stream itself: the whole window must lie inside it
        plain = plain & (starts >= self.before) & (starts + span <= self.before + self.stream)
        relative = torch.arange(span, device=self.device) - torch.arange(chunk, device=self.device)[:, None]
        band = (relative >= 0) & (relative <= reach)
        band_mask = additive_mask(band, self.dtype)[None, None]
        plain_list = plain.tolist()
        runs, start = [], None
        for t, p in enumerate(plain_list + [False]):
            if p and start is None:
                start = t
            elif not p and start is not None:
                runs.append((start, t))
                start = None
        special = torch.nonzero(~plain).flatten()
        full = special.numel() > SPECIAL_SHARE * tiles or len(runs) > 8
        masks = None
        if full or special.numel():
            picked = torch.arange(tiles, device=self.device) if full else special
            window = picked[:, None] * chunk + torch.arange(span, device=self.device)  # buffer positions
            queries = window[:, self.before : self.before + chunk]
            allowed = band & self.valid[window][:, None, :] & (self.sid[queries][:, :, None] == self.sid[window][:, None, :])
            masks = additive_mask(allowed, self.dtype)[:, None]
        return {"tiles": tiles, "span": span, "band": band_mask, "runs": [] if full else runs,
                "special": None if full else special, "full": full, "masks": masks}

    def calls(self, chunk: int, group: int | None = None):
        """(tile indices or a range, mask, whether the windows are a zero-copy range) per kernel call."""
        tiling = self.tiling(chunk)
        if tiling["full"]:
            pieces = [((0, tiling["tiles"]), tiling["masks"], (0, tiling["tiles"]))]
        else:
            pieces = [((a, b), tiling["band"], None) for a, b in tiling["runs"]]
            if tiling["special"].numel():
                pieces.append((tiling["special"], tiling["masks"], None))
        for tiles, mask, mask_range in pieces:
            if isinstance(tiles, tuple) and group:
                for a in range(tiles[0], tiles[1], group):
                    b = min(a + group, tiles[1])
                    yield (a, b), mask if mask_range is None else mask[a:b]
            elif isinstance(tiles, tuple):
                yield tiles, mask
            elif group:
                for a in range(0, tiles.numel(), group):
                    yield tiles[a : a + group], mask[a : a + group]
            else:
                yield tiles, mask

    # --- layouts: a stream tensor is (stream, H, d); tiles of it are (tiles, H, chunk, d) views ----------
    def to_stream(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) -> (stream, H, d), rows padded with zeros to the row length (a view when possible)."""
        x = x.transpose(1, 2)
        if self.row != self.length:
            x = F.pad(x, (0, 0, 0, 0, 0, self.row - self.length))
        return x.reshape(self.stream, *x.shape[2:]).contiguous()

    def from_stream(self, x: torch.Tensor) -> torch.Tensor:
        """(stream, H, d) -> (B, n, H, d) view."""
        return x.view(self.batch, self.row, *x.shape[1:])[:, : self.length]

    @staticmethod
    def tiles_of(stream: torch.Tensor, chunk: int, tiles) -> torch.Tensor:
        view = stream.view(-1, chunk, *stream.shape[1:]).transpose(1, 2)
        return view[tiles[0] : tiles[1]] if isinstance(tiles, tuple) else view.index_select(0, tiles)

    def windows_of(self, keys: torch.Tensor, chunk: int, tiles) -> torch.Tensor:
        """Each tile's keys (tiles, H, span, d) from the key stream or, with every tile masked, the padded
        buffer. A range: an `as_strided` view (no copy). Special tiles: gathered rows of the stream, positions
        outside it clamped (their mask drops them)."""
        span = self.tiling(chunk)["span"]
        heads, dim = keys.shape[1:]
        shift = 0 if keys.shape[0] == self.buffer else self.before  # buffer row r = stream row r - before
        if isinstance(tiles, tuple):
            a, b = tiles
            offset = keys.storage_offset() + (a * chunk - shift) * heads * dim
            return keys.as_strided((b - a, heads, span, dim), (chunk * heads * dim, dim, heads * dim, 1), offset)
        positions = tiles[:, None] * chunk - self.before + torch.arange(span, device=keys.device)
        rows = keys.index_select(0, positions.clamp_(0, self.stream - 1).flatten())
        return rows.view(tiles.numel(), span, heads, dim).transpose(1, 2)

    def to_buffer(self, stream: torch.Tensor) -> torch.Tensor:
        """(stream, H, d) -> (buffer, H, d) with zero padding on both sides: one copy."""
        out = stream.new_zeros(self.buffer, *stream.shape[1:])
        out[self.before : self.before + self.stream] = stream
        return out

    def key_source(self, stream: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.to_buffer(stream) if self.tiling(chunk)["full"] else stream

    def fold(self, grad_buffer: torch.Tensor, windows: torch.Tensor, chunk: int, tiles) -> None:
        """Add per-window key gradients (tiles, H, span, d) back onto the buffer (buffer, H, d)."""
        size = math.gcd(chunk, self.stride_pad)  # pieces of `size` rows; tile t starts at piece t * step
        pieces, step = self.tiling(chunk)["span"] // size, chunk // size
        heads, dim = grad_buffer.shape[1:]
        chunks = grad_buffer.view(-1, size, heads, dim)
        parts = windows.transpose(1, 2).reshape(windows.shape[0], pieces, size, heads, dim)
        if isinstance(tiles, tuple):
            fold_strided(chunks, parts, axis=0, step=step, first=tiles[0])
        else:
            fold_strided(chunks, parts, axis=0, step=step, index=tiles)


class FlashBand(torch.autograd.Function):
    """Sliding-window attention through the fused CPU flash kernels; see the section comment above."""

    @staticmethod
    def forward(ctx, query, key, value, keep, segments, half: int, causal: bool, scaling: float):
        batch, heads, length, dim = query.shape
        plan = BandPlan(keep, segments, batch, length, half, causal, query.dtype, query.device)
        q_stream, k_stream, v_stream = plan.to_stream(query), plan.to_stream(key), plan.to_stream(value)
        chunk = plan.chunk
        k_src, v_src = plan.key_source(k_stream, chunk), plan.key_source(v_stream, chunk)
        out = query.new_empty(plan.stream, heads, dim)
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # the kernel's choice
        lse = torch.empty(plan.stream, heads, dtype=lse_dtype, device=query.device)
        out_tiles, lse_tiles = plan.tiles_of(out, chunk, (0, plan.stream // chunk)), lse.view(-1, chunk, heads).transpose(1, 2)
        flash_forward = flash_cpu_ops()[0]
        for tiles, mask in plan.calls(chunk):
            o, m = flash_forward(
                plan.tiles_of(q_stream, chunk, tiles), plan.windows_of(k_src, chunk, tiles), plan.windows_of(v_src, chunk, tiles),
                attn_mask=mask, scale=scaling,
            )
            if isinstance(tiles, tuple):
                out_tiles[tiles[0] : tiles[1]] = o
                lse_tiles[tiles[0] : tiles[1]] = m
            else:
                out_tiles[tiles] = o
                lse_tiles[tiles] = m
        ctx.save_for_backward(q_stream, k_stream, v_stream, out, lse)
        if plan.back_chunk != chunk:
            # the backward tiles by its own chunk: the forward's per-tile masks would only be held until then
            plan.drop_tiling(chunk)
        ctx.plan, ctx.scaling, ctx.query_shape = plan, scaling, query.shape
        return plan.from_stream(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_stream, k_stream, v_stream, out, lse = ctx.saved_tensors
        plan, chunk = ctx.plan, ctx.plan.back_chunk
        heads, dim = q_stream.shape[1:]
        g_stream = plan.to_stream(grad_out.transpose(1, 2))
        dq = torch.empty_like(out)
        # key gradients are folded in window coordinates: a buffer with the windows' padding on both sides
        dk, dv = (k_stream.new_zeros(plan.buffer, heads, dim) for _ in range(2))
        k_src, v_src = plan.key_source(k_stream, chunk), plan.key_source(v_stream, chunk)
        span = plan.tiling(chunk)["span"]
        group = max(1, BACKWARD_WINDOW_ELEMENTS // (heads * span * dim))
        dq_tiles = plan.tiles_of(dq, chunk, (0, plan.stream // chunk))
        lse_all = lse.view(-1, chunk, heads).transpose(1, 2)
        flash_backward = flash_cpu_ops()[1]
        for tiles, mask in plan.calls(chunk, group):
            pick = (lambda x: x[tiles[0] : tiles[1]]) if isinstance(tiles, tuple) else (lambda x: x.index_select(0, tiles))
            gq, gk, gv = flash_backward(
                plan.tiles_of(g_stream, chunk, tiles), plan.tiles_of(q_stream, chunk, tiles),
                plan.windows_of(k_src, chunk, tiles), plan.windows_of(v_src, chunk, tiles),
                plan.tiles_of(out, chunk, tiles), pick(lse_all), 0.0, False, attn_mask=mask, scale=ctx.scaling,
            )
            if isinstance(tiles, tuple):
                dq_tiles[tiles[0] : tiles[1]] = gq
            else:
                dq_tiles[tiles] = gq
            plan.fold(dk, gk, chunk, tiles)
            plan.fold(dv, gv, chunk, tiles)

        def unbuffer(x):
            return x[plan.before : plan.before + plan.stream].view(plan.batch, plan.row, heads, dim)[:, : plan.length].transpose(1, 2)

        return plan.from_stream(dq).transpose(1, 2), unbuffer(dk), unbuffer(dv), None, None, None, None, None


def validate(config) -> None:
    route_setting(config, NAME)
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
    config_defaults={"attention_window": DEFAULT_WINDOW, "global_attention_token_ids": None, "attention_route": "auto"},
    validate_config=validate,
)
