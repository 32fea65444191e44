"""Adaptive attention span (Sukhbaatar et al., 2019): every head learns how far back it looks.

Head h has a learned span z_h = S * p_h, with p_h in [0, 1] (``adaptive_span_max`` = S) and a soft mask
over the query-key distance x,

    m_z(x) = clamp((R + z - x) / R, 0, 1)            (R = ``adaptive_span_ramp``)

that multiplies the exponentiated scores *before* normalisation, as in the paper:

    a_ij = m_z(x_ij) exp(s_ij) / sum_k m_z(x_ik) exp(s_ik)

computed as softmax(s + log m) (the same quotient, without underflow). Distance: x = i - j for decoders
(future keys are never attended), x = |i - j| for encoders, so an encoder head sees z tokens on each side.
m_z(0) = 1, so every query keeps at least itself. The L1 penalty ``adaptive_span_loss_coef * mean_h z_h``
of each layer reaches every hfx head's loss through :mod:`hfx.auxiliary`; p is projected back onto [0, 1]
before each training forward (the paper clamps it after each optimiser step; same iterates).

Keys where every head's mask is 0 (distance >= max_h z_h + R) contribute nothing, so they are never read:
queries are cut into tiles and each tile sees only the keys within the layer's largest span; with a KV cache
a new token reads only the last ceil(max_h z_h + R) keys. Training and inference both skip; the numbers
(and the gradients) equal the dense computation, which :func:`span_attention` also runs with ``band=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hfx.registry import Component

from .common import check_self_attention, expand_kv, is_causal, key_padding, padding_mask, sequence_ids

NAME = "hfx_adaptive_span"
DEFAULTS = {
    "adaptive_span_max": 512,  # S: the longest span a head may learn, in tokens
    "adaptive_span_ramp": 32,  # R: width of the soft mask's linear ramp, in tokens
    "adaptive_span_init": 0.0,  # p at initialisation: z = init * S (the paper starts at 0 and lets spans grow)
    "adaptive_span_loss_coef": 2e-6,  # weight of the L1 penalty on the spans (tokens)
}
MIN_CHUNK = 32  # query rows per tile, at least: fewer would turn long sequences into many tiny matmuls
_NEG = torch.finfo(torch.float32).min  # "never attended": finite, so a query with no real key stays finite
_TINY = 1e-30  # keeps log() off 0 where the mask is 0 (that branch is replaced by _NEG anyway)


def _setting(config, name: str):
    return getattr(config, name, DEFAULTS[name])


def validate(config) -> None:
    span, ramp = _setting(config, "adaptive_span_max"), _setting(config, "adaptive_span_ramp")
    init, coef = _setting(config, "adaptive_span_init"), _setting(config, "adaptive_span_loss_coef")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise ValueError(f"adaptive_span_max={span!r} is invalid; valid values: an integer >= 1 (longest span, tokens).")
    if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 1:
        raise ValueError(f"adaptive_span_ramp={ramp!r} is invalid; valid values: an integer >= 1 (ramp width, tokens).")
    if not number(init) or not 0.0 <= init <= 1.0:
        raise ValueError(
            f"adaptive_span_init={init!r} is invalid; valid values: a number in [0, 1] (initial span / adaptive_span_max)."
        )
    if not number(coef) or coef < 0:
        raise ValueError(f"adaptive_span_loss_coef={coef!r} is invalid; valid values: a finite number >= 0.")


class AdaptiveSpan(nn.Module):
    """The learned spans of one attention layer: ``span_ratio`` (heads,) = z / S, and their L1 penalty."""

    def __init__(self, config, num_heads: int):
        super().__init__()
        self.config = config  # read at every call: the penalty applies only while this backend runs
        self._used: torch.Tensor | None = None  # the spans of the last forward (see used())
        self.max_span = _setting(config, "adaptive_span_max")
        self.ramp = _setting(config, "adaptive_span_ramp")
        self.span_ratio = nn.Parameter(torch.full((num_heads,), float(_setting(config, "adaptive_span_init"))))

    def hfx_init_weights(self, config) -> None:
        from transformers import initialization as init

        init.constant_(self.span_ratio, float(_setting(config, "adaptive_span_init")))

    def spans(self) -> torch.Tensor:
        """z per head, in tokens, differentiable. In training, p is first projected onto [0, 1] in place."""
        if self.training:
            self.span_ratio.data.clamp_(0.0, 1.0)  # projection step, invisible to autograd (like an optimiser's)
        # clamp's gradient passes at 0 and 1, so after the projection the spans always get their gradient
        return self.max_span * self.span_ratio.clamp(0.0, 1.0)

    def used(self) -> torch.Tensor:
        """The spans of this forward: the penalty counts for the enclosing model forward (hfx.auxiliary.report)."""
        from hfx.auxiliary import report

        report(self)
        self._used = self.spans()
        return self._used

    def hfx_auxiliary(self):
        from hfx.auxiliary import Auxiliary

        spans = self._used  # set by used(): hfx_auxiliary is only asked after this backend ran in the forward
        if spans is None:
            return None
        coef = float(_setting(self.config, "adaptive_span_loss_coef"))
        return Auxiliary(loss=coef * spans.mean(), stats={"attention_span": spans.detach()})

    def extra_repr(self) -> str:
        return f"heads={self.span_ratio.numel()}, max_span={self.max_span}, ramp={self.ramp}"


def attach(module: nn.Module, config) -> None:
    """Component.attach: give an hfx attention layer its spans (saved as ``...attention.adaptive_span.span_ratio``)."""
    for name, default in DEFAULTS.items():  # loaded from a config saved with another backend: make them explicit
        if not hasattr(config, name):
            setattr(config, name, default)
    validate(config)
    module.adaptive_span = AdaptiveSpan(config, config.num_attention_heads)


def log_mask_table(spans: torch.Tensor, ramp: int, length: int, dtype=torch.float32) -> torch.Tensor:
    """(heads, length) log m_z(x) for x = 0..length-1, _NEG where the mask is 0; differentiable in z."""
    x = torch.arange(length, device=spans.device, dtype=dtype)
    m = ((ramp + spans.to(dtype)[:, None] - x) / ramp).clamp(0.0, 1.0)
    return torch.where(m > 0, m.clamp_min(_TINY).log(), torch.full_like(m, _NEG))


def span_attention(query, key, value, keep, spans, ramp: int, causal: bool, scaling: float, dropout: float = 0.0,
                   segments=None, band: bool = True):
    """query (B, H, q, d), key/value (B, H, K, d) with the q queries the last q keys; keep bool (B, K) real keys;
    spans (H,) in tokens; segments (B, K) packed-sequence ids or None. Returns (B, q, H, d).

    ``band=False`` scores every key (the dense reference); ``band=True`` reads only keys within the layer's
    largest span, in tiles of queries."""
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    # m_z(x) > 0 exactly for x < ramp + z: the farthest key any head reads is max_distance - 1
    max_distance = int(math.ceil(float(spans.detach().max()))) + ramp
    # softmax in fp32 (fp64 inputs stay fp64), as eager attention does
    table = log_mask_table(spans, ramp, max_distance + 1, torch.promote_types(query.dtype, torch.float32))
    far = max_distance - 1
    left, right = far, (0 if causal else far)
    if not band or left + right + 1 >= k_len:
        chunk, left, right = q_len, k_len - q_len, 0  # one tile: every query against every key
    else:
        chunk = min(q_len, max(MIN_CHUNK, far // 2 + 1))
    return _tiles(query, key, value, keep, segments, table, causal, scaling, dropout, chunk, left, right)


def _tiles(query, key, value, keep, segments, table, causal, scaling, dropout, chunk, left, right):
    """Tile t holds queries [t*c, t*c + c) and keys from ``left`` before its first query to ``right`` after its last;
    the key-query distances are the same in every tile, so one (c, width) bias serves them all."""
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len  # position of the first query among the keys
    tiles = -(-q_len // chunk)
    width = chunk + left + right
    first = offset - left  # first key of tile 0 (negative: before the sequence)
    end = first + (tiles - 1) * chunk + width  # one past the last key of the last tile
    before, after = max(0, -first), max(0, end - k_len)

    def windows(x, fill):  # (..., K, *) -> (..., tiles, *, width); only the keys in use are read
        dim = x.dim() - (2 if x.dim() == 4 else 1)
        x = x.narrow(dim, first + before, end - after - first - before)
        if before or after:
            x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [before, after], value=fill)
        return x.unfold(dim, width, chunk)

    q = F.pad(query, (0, 0, 0, tiles * chunk - q_len)).view(batch, heads, tiles, chunk, head_dim)
    k = windows(key, 0.0)  # (B, H, tiles, d, width)
    v = windows(value, 0.0).transpose(-1, -2)  # (B, H, tiles, width, d)
    scores = torch.matmul(q, k).to(table.dtype) * scaling  # (B, H, tiles, c, width)

    rows = torch.arange(chunk, device=query.device)[:, None]
    cols = torch.arange(width, device=query.device)[None, :]
    distance = rows + left - cols  # query position minus key position
    if not causal:
        distance = distance.abs()
    # a future key (causal) or one beyond the table gets the table's last entry, where every mask is 0
    last = table.shape[1] - 1
    index = torch.where(distance < 0, last, distance.clamp(max=last))
    scores = scores + table[:, index][None, :, None]  # (1, H, 1, c, width)

    if before or after or segments is not None or not bool(keep.all()):  # else every key in every window is real
        allowed = windows(keep, False)  # (B, tiles, width): real keys inside the sequence
        allowed = allowed[:, :, None, :].expand(batch, tiles, chunk, width)
        if segments is not None:
            q_seg = F.pad(segments[:, offset:], (0, tiles * chunk - q_len), value=-1).view(batch, tiles, chunk)
            allowed = allowed & (q_seg[..., None] == windows(segments, -2)[:, :, None, :])
        scores = scores.masked_fill(~allowed[:, None], _NEG)
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, v).reshape(batch, heads, tiles * chunk, head_dim)[:, :, :q_len]
    return out.transpose(1, 2).contiguous()


def layer_spans(module) -> AdaptiveSpan:
    span = getattr(module, "adaptive_span", None)
    if not isinstance(span, AdaptiveSpan):
        raise ValueError(
            f"{NAME} learns a span per head, stored on each hfx attention layer; {type(module).__name__} has none "
            "(a stock transformers model, or an hfx model built with another attention_type and switched later). "
            "Build the model with attention_type='hfx_adaptive_span', or load it with "
            "from_pretrained(path, attn_implementation='hfx_adaptive_span') (spans start at adaptive_span_init)."
        )
    return span


def adaptive_span_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, q, d), key/value (B, H_kv, K, d) -> (B, q, H, d), None."""
    span = layer_spans(module)
    causal = is_causal(module, kwargs)
    check_self_attention(query, key, causal, NAME)
    batch, heads, q_len, head_dim = query.shape
    if span.span_ratio.numel() != heads:
        raise ValueError(f"{NAME}: the layer has {span.span_ratio.numel()} learned spans but {heads} query heads.")
    keep = key_padding(attention_mask, batch, key.shape[2], query.device, NAME)
    segments = sequence_ids(kwargs, batch, q_len, key.shape[2], query.device, NAME)
    key, value = expand_kv(query, key, value, NAME)
    scaling = head_dim**-0.5 if scaling is None else scaling
    out = span_attention(query, key, value, keep, span.used(), span.ramp, causal, scaling, dropout, segments)
    return out, None


def head_spans(model: nn.Module) -> torch.Tensor:
    """Learned spans in tokens, (layers, heads), in layer order (detached)."""
    rows = [m.max_span * m.span_ratio.detach().clamp(0.0, 1.0) for m in model.modules() if isinstance(m, AdaptiveSpan)]
    if not rows:
        raise ValueError(f"{type(model).__name__} has no adaptive spans: it was not built with attention_type={NAME!r}.")
    return torch.stack(rows)


COMPONENT = Component(
    kind="attention",
    name=NAME,
    factory=adaptive_span_attention,
    mask_factory=padding_mask,
    description="Adaptive attention span: a learned soft span per head with an L1 penalty; keys beyond it are skipped.",
    config_defaults=DEFAULTS,
    validate_config=validate,
    attach=attach,
)

__all__ = ["AdaptiveSpan", "COMPONENT", "head_spans", "span_attention", "log_mask_table"]
