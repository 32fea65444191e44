"""hfx_sliding_window's fused CPU path (FlashBand: zero-copy key windows, flash kernels forward and
backward) against a dense float64 reference with the explicit mask, in every tile layout it chooses."""

import types

import pytest
import torch

import hfx_attention.sliding_window as sw
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


def rounding_bound(dtype, values, factor=16):
    """What rounding alone may move an attention output computed in ``dtype``: ``factor`` ulps of the largest value.

    An output is a softmax-weighted average of values: the scores (a D-term dot product), their exp and
    normalisation, and the weighted sum each add a few ulps relative to the values they combine, and the
    kernels sum key blocks in their own order (online softmax rescaling once per block). Measured here:
    up to 1.6 ulps of max|v| for outputs, 5.5 ulps of max|gradient| for gradients (sums over the window of
    products of two such terms), so 16 (outputs) and 32 (gradients) leave room for other CPUs' kernels
    while any pattern change - a key more or less in a window of <= 512 moves outputs by ~max|v| / 512,
    hundreds of ulps - still fails."""
    return factor * torch.finfo(dtype).eps * values.abs().max().item()


def float64_reference(q, k, v, mask, scaling):
    """Masked softmax attention written out in float64 on the same inputs, as differentiable float64 leaves."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scaling).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).nan_to_num() @ v.repeat_interleave(rep, 1)).transpose(1, 2), (q, k, v)


def check(n, window, causal, keep=None, position_ids=None, batch=2, kv_heads=H, dtype=torch.float32):
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
    ref, leaves = float64_reference(q, k, v, reference_mask(keep, segments, window, causal), 0.25)
    real = keep[:, :, None, None]  # outputs at padded queries are meaningless
    torch.testing.assert_close(out.double() * real, ref * real, atol=rounding_bound(dtype, v), rtol=0)
    weights = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=rounding_bound(dtype, want, 32), rtol=0)


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
    check(260, 64, False, dtype=torch.float64)  # the same bound in float64's ulps: ~1e-14


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


@pytest.mark.parametrize("path", ["fast", "tiled", "tiled with global tokens"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_row_in_a_mixed_batch_equals_the_row_alone(monkeypatch, path, causal):
    """A row's real-token outputs and gradients do not depend on its right-padding or on the other rows."""
    if path == "fast":
        monkeypatch.setattr(sw, "tiled_band", lambda *a, **k: pytest.fail("the tiled path was taken"))
    else:
        monkeypatch.setattr(sw, "flash_band_applies", lambda *a, **k: False)
    torch.manual_seed(3)
    n, lengths = 256, [200, 256, 130]  # the 200-token row right-padded to 256, next to a longer and a shorter row
    q, k, v = (torch.randn(3, H, n, D, requires_grad=True) for _ in range(3))
    keep = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    keep[0, 50] = False  # a masked token inside the real length stays a masked key, as in the row alone
    kwargs = {}
    if path == "tiled with global tokens":
        flags = torch.zeros(3, n, dtype=torch.long)
        flags[0, [0, 120, 199]] = 1  # first, middle and last real token of the padded row
        flags[1, [5, 230]] = 1  # the longer row's global tokens lie past the padded row's length
        flags[2, 64] = 1
        kwargs = {"global_attention_mask": flags}
    module = layer(causal, 64)
    out, _ = sliding_window_attention(module, q, k, v, keep, scaling=0.25, **kwargs)

    def alone(row, length, width=None):
        width = width or length
        part = {name: flags[row : row + 1, :width] for name, flags in kwargs.items()}
        got, _ = sliding_window_attention(module, q[row : row + 1, :, :width], k[row : row + 1, :, :width],
                                          v[row : row + 1, :, :width], keep[row : row + 1, :width], scaling=0.25, **part)
        return got[0, :length]

    # both sides are fp32 on differently tiled kernels: each within a few ulps of the exact value (see rounding_bound)
    bound = rounding_bound(torch.float32, v)
    real = keep[:, :, None, None]
    for row, length in enumerate(lengths):
        torch.testing.assert_close((out * real)[row, :length], alone(row, length) * real[row, :length], atol=bound, rtol=0)
    for width in (256, 213):  # the padded row in a batch of its own, padded to 256 and to 213 (no tile multiple)
        torch.testing.assert_close(alone(0, 200, width) * real[0, :200], (out * real)[0, :200], atol=bound, rtol=0)

    # gradients of the real outputs reach the same real inputs with the same values, and nothing else
    weights = torch.randn(3, n, H, D) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((alone(0, 200) * weights[0, :200]).sum(), (q, k, v))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got[0, :, :200], want[0, :, :200], atol=rounding_bound(torch.float32, want, 32), rtol=0)
        assert (got[0, :, 200:] == 0).all()


def test_without_the_fused_cpu_kernel_the_tiled_path_serves(monkeypatch):
    """common.flash_cpu_ops() is None on a torch without the private kernels: the plugin still imports and
    runs, through the tiled SDPA path."""
    calls = []
    monkeypatch.setattr(sw.FlashBand, "apply", lambda *a: calls.append(a))
    monkeypatch.setattr(sw, "flash_cpu_ops", lambda: None)
    q = torch.randn(1, H, 50, D)
    assert not sw.flash_band_applies(q, q, q, None, 0.0)
    out, _ = sliding_window_attention(layer(False, 8), q, q, q, None)
    assert calls == [] and out.shape == (1, 50, H, D)


def test_backward_does_not_hold_the_forward_tile_masks():
    """The backward tiles by its own chunk: after the forward only that layout may be built (lazily), so what
    waits for the backward is the O(n * d) saved tensors, not the forward's per-tile float masks."""
    q, k, v = (torch.randn(2, H, 1024, D, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1024, dtype=torch.bool)
    out = sw.banded_attention(q, k, v, keep, None, 256, False, 0.25, 0.0)
    plan = out.grad_fn.plan
    assert plan.back_chunk != plan.chunk and plan._tilings == {}
    out.sum().backward()
    assert list(plan._tilings) == [plan.back_chunk]
