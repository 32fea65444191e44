"""hfx_sliding_window's fused CPU path (FlashBand: zero-copy key windows, flash kernels forward and
backward) against a dense eager reference with the explicit mask, in every tile layout it chooses."""

import types

import pytest
import torch

import hfx_attention.sliding_window as sw
from hfx.attention import eager_attention_forward
from hfx_attention.sliding_window import BandPlan, sliding_window_attention

H, D = 3, 16


def layer(causal, window):
    return types.SimpleNamespace(config=types.SimpleNamespace(attention_window=window), is_causal=causal, training=False, layer_idx=0)


@pytest.fixture
def fast_only(monkeypatch):
    """Fail if the general tiled path is taken: these cases must run through FlashBand."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tiled path was taken")

    monkeypatch.setattr(sw, "tiled_band", refuse)


def reference_mask(keep, segments, window, causal):
    n = keep.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = ((i - j).abs() <= window // 2)[None] & keep[:, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    if causal:
        allowed = allowed & (j <= i)
    return allowed[:, None]


def check(n, window, causal, keep=None, position_ids=None, batch=2, kv_heads=H, dtype=torch.float32, atol=1e-6):
    torch.manual_seed(n + window)
    q = torch.randn(batch, H, n, D, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, D, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, D, dtype=dtype, requires_grad=True)
    keep = torch.ones(batch, n, dtype=torch.bool) if keep is None else keep
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out, _ = sliding_window_attention(layer(causal, window), q, k, v, keep, scaling=0.25, **kwargs)
    segments = None
    if position_ids is not None:
        restarts = torch.nn.functional.pad((position_ids.diff(dim=-1) != 1).long(), (1, 0))
        segments = restarts.cumsum(-1).expand(batch, n)
    mask = reference_mask(keep, segments, window, causal)
    if dtype == torch.float32:
        ref, _ = eager_attention_forward(layer(causal, window), q, k, v, mask, scaling=0.25)
    else:  # eager's softmax runs in float32: the float64 reference is written out in float64
        rep = H // kv_heads
        scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
        ref = (scores.softmax(-1).nan_to_num() @ v.repeat_interleave(rep, 1)).transpose(1, 2)
    real = keep[:, :, None, None]  # outputs at padded queries are meaningless
    torch.testing.assert_close(out * real, ref * real, atol=atol, rtol=0)
    weights = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5 * atol, rtol=0)


# fp32 attention of unit-scale inputs over up to a few hundred keys: rounding ~1e-7 per sum
@pytest.mark.usefixtures("fast_only")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,window", [(700, 128), (300, 40), (64, 512), (37, 8), (5, 2)])
def test_flash_band_equals_dense(causal, n, window):
    check(n, window, causal)


@pytest.mark.usefixtures("fast_only")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_band_padding_rows_and_grouped_heads(causal):
    keep = torch.ones(3, 333, dtype=torch.bool)
    keep[1, 250:] = False
    keep[2, 10:] = False
    check(333, 64, causal, keep=keep, batch=3, kv_heads=1)


@pytest.mark.usefixtures("fast_only")
@pytest.mark.parametrize("lengths", [[200, 150, 50], [12] * 20 + [160]])  # few boundaries / one mask per tile
def test_flash_band_packed_sequences(lengths):
    position_ids = torch.cat([torch.arange(m) for m in lengths])[None]
    check(sum(lengths), 64, True, position_ids=position_ids, batch=1)
    check(sum(lengths), 64, False, position_ids=position_ids, batch=1)


def test_plan_uses_the_shared_band_mask_for_interior_tiles():
    """n=1024, window 128: only the tiles whose window reaches past either end carry a mask of their own."""
    keep = torch.ones(1, 1024, dtype=torch.bool)
    plan = BandPlan(keep, None, 1, 1024, 64, False, torch.float32, "cpu")
    tiling = plan.tiling(plan.chunk)
    assert not tiling["full"] and tiling["runs"] == [(1, 15)] and tiling["special"].tolist() == [0, 15]
    assert tiling["band"].shape[:2] == (1, 1)  # broadcast over tiles, never expanded


@pytest.mark.usefixtures("fast_only")
def test_flash_band_float64_is_exact():
    check(260, 64, False, dtype=torch.float64, atol=1e-12)


@pytest.mark.usefixtures("fast_only")
def test_flash_band_in_bfloat16_is_close_to_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, 300, D) for _ in range(3))
    module = layer(False, 64)
    full, _ = sliding_window_attention(module, q, k, v, None, scaling=0.25)
    half, _ = sliding_window_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.25)
    # bfloat16 keeps 8 bits: inputs rounded by 2^-9 relative, outputs are averages of unit values
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=0)


def test_dropout_and_global_tokens_take_the_tiled_path(monkeypatch):
    calls = []
    monkeypatch.setattr(sw.FlashBand, "apply", lambda *a: calls.append(a))
    q = torch.randn(1, H, 50, D)
    flags = torch.zeros(1, 50, dtype=torch.long)
    flags[0, 3] = 1
    sliding_window_attention(layer(False, 8), q, q, q, None, global_attention_mask=flags)
    sliding_window_attention(layer(False, 8), q, q, q, None, dropout=0.1)
    assert calls == []
