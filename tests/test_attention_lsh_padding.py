"""hfx_lsh: a row's real-token outputs do not depend on its right-padding or on the other rows of the batch."""

import types

import pytest
import torch

import hfx
from hfx_attention.lsh import attend_rounds, automatic_buckets, lsh_attention

H, D = 2, 8
EPS = torch.finfo(torch.float32).eps


def rounding_bound(values, factor=16):
    """How far two fp32 evaluations that differ only in rounding (the fused flash kernel for a row alone, the
    materialised scores in a mixed batch) may drift apart: ``factor`` ulps of the largest value (32 for
    gradients). Each output is a softmax-weighted average of O(100) values: scores, exp, normalisation and the
    weighted sum each add a few ulps relative to the values, per key block in each kernel's own order
    (measured: under 1.1 ulps of max|v| for outputs, of max|gradient| for gradients). A changed layout (another
    chunk or bucket) moves outputs by ~1e-1, about 10^5 ulps."""
    return factor * EPS * values.abs().max().item()


def layer(causal=False, **config):
    return types.SimpleNamespace(config=types.SimpleNamespace(**config), is_causal=causal, training=False, layer_idx=0)


def alone(module, q, k, v, row, length, keep=None):
    """The row by itself: its first ``length`` tokens, with its own (internal) mask if any."""
    mask = None if keep is None else keep[row : row + 1, :length]
    out, _ = lsh_attention(module, q[row : row + 1, :, :length], k[row : row + 1, :, :length], v[row : row + 1, :, :length], mask)
    return out[0]


CASES = [
    # rounds, num_buckets, causal, chunks after, exclude self, chunk (200 is a multiple of 8, not of 24 or 64)
    (1, None, False, 0, False, 8),
    (2, None, False, 0, False, 8),
    (2, None, True, 0, True, 24),
    (1, 8, True, 0, False, 24),
    (2, 8, False, 1, False, 8),
    (2, None, False, 1, True, 24),
    (3, None, True, 1, True, 8),
    (2, 4, True, 2, False, 64),
    (1, None, False, 0, True, 64),
]


@pytest.mark.parametrize("rounds,buckets,causal,after,exclude_self,chunk", CASES)
def test_padded_row_in_a_mixed_batch_equals_the_row_alone(rounds, buckets, causal, after, exclude_self, chunk):
    module = layer(
        causal, num_hashes=rounds, num_buckets=buckets, lsh_attn_chunk_length=chunk, hash_seed=7,
        lsh_num_chunks_before=1, lsh_num_chunks_after=after, lsh_exclude_self=exclude_self,
    )
    torch.manual_seed(0)
    n, lengths = 256, [200, 256, 130]  # the 200-token row right-padded to 256, next to a longer and a shorter row
    q, k, v = (torch.randn(3, H, n, D, requires_grad=True) for _ in range(3))
    keep = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    keep[0, 50] = False  # a masked token inside the real length stays a masked key, as in the row alone
    out, _ = lsh_attention(module, q, k, v, keep)
    assert out.shape == (3, n, H, D)
    for row, length in enumerate(lengths):
        want = alone(module, q, k, v, row, length, keep)
        torch.testing.assert_close(out[row, :length], want, atol=rounding_bound(v), rtol=0)
    assert (out[0, 200:] == 0).all() and (out[2, 130:] == 0).all()  # past a row's real length: zeros

    # the padded row in a batch of its own, padded to 256 and to 213 (not a multiple of any chunk)
    for width in (256, 213):
        solo, _ = lsh_attention(module, q[:1, :, :width], k[:1, :, :width], v[:1, :, :width], keep[:1, :width])
        torch.testing.assert_close(solo[0, :200], out[0, :200], atol=rounding_bound(v), rtol=0)

    # gradients of the real outputs reach the same real inputs with the same values, and nothing else
    weights = torch.randn(3, n, H, D) * keep[:, :, None, None]
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = alone(module, q, k, v, 0, 200, keep)
    want_grads = torch.autograd.grad((want * weights[0, :200]).sum(), (q, k, v))
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got[0, :, :200], ref[0, :, :200], atol=rounding_bound(ref, 32), rtol=0)
        assert (got[0, :, 200:] == 0).all()


def test_rows_get_the_bucket_count_of_their_own_length():
    """num_buckets=None: 200 and 256 tokens in chunks of 8 get 32 and 64 buckets, one rotation draw per count."""
    assert automatic_buckets(200, 8) == 32 and automatic_buckets(256, 8) == 64
    module = layer(num_hashes=2, num_buckets=None, lsh_attn_chunk_length=8, hash_seed=3)
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, H, 256, D) for _ in range(3))
    keep = torch.ones(2, 256, dtype=torch.bool)
    keep[0, 200:] = False
    out, _ = lsh_attention(module, q, k, v, keep)
    # the 200-token row with the 256-token row's bucket count would be a different attention pattern
    forced, _ = lsh_attention(layer(num_hashes=2, num_buckets=64, lsh_attn_chunk_length=8, hash_seed=3), q[:1, :, :200], k[:1, :, :200], v[:1, :, :200], None)
    assert (forced[0] - out[0, :200]).abs().max() > 1e-2
    torch.testing.assert_close(out[1], alone(module, q, k, v, 1, 256), atol=rounding_bound(v), rtol=0)


def test_row_without_real_tokens_outputs_zeros_and_leaves_the_others_alone():
    module = layer(num_hashes=2, num_buckets=None, lsh_attn_chunk_length=16, hash_seed=0)
    q, k, v = (torch.randn(2, H, 80, D) for _ in range(3))
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep[1] = False
    out, _ = lsh_attention(module, q, k, v, keep)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[0], alone(module, q, k, v, 0, 80), atol=rounding_bound(v), rtol=0)


def rounds_reference(query, key, value, blocked, own, order, shape, scaling):
    """Plain autograd formula: masked softmax per chunk, back to token order, rounds mixed by their lse."""
    bh, rounds, padded, d = shape
    scores = torch.einsum("ncd,nwd->ncw", query, key) * scaling
    if blocked is not None:
        scores = scores.masked_fill(blocked, -1e9)
    if own is not None:
        scores = scores.masked_fill(own, -1e5)
    out = (torch.softmax(scores, -1) @ value).reshape(bh, rounds * padded, d)
    lse = torch.logsumexp(scores, -1).reshape(bh, rounds * padded)
    undo = torch.argsort(order, dim=-1)
    out = torch.gather(out, 1, undo[..., None].expand(-1, -1, d)).view(bh, rounds, padded, d)
    lse = torch.gather(lse, 1, undo).view(bh, rounds, padded, 1)
    return (out * torch.softmax(lse, dim=1)).sum(1)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_rounds_backward_matches_autograd(masked, strided):
    """The hand-written backward (the rounds' mix folded into the attention backward; masked scores without
    gradient; windows as strided views of the sorted rows, their gradients folded back) against autograd
    through the plain formula in float64. Without masks float32 takes the fused flash kernel: checked against
    the float64 formula to float32 attention accuracy (its exp is approximate to ~1e-7 relative; sums of
    O(10) unit-scale terms: 1e-5)."""
    torch.manual_seed(2)
    bh, rounds, padded, c, shifts, d = 2, 2, 6, 3, 2, 4
    tiles, w = rounds * padded // c, shifts * c
    spans = (tiles, shifts, c) if strided else None
    q = torch.randn(bh, tiles, c, d, dtype=torch.float64, requires_grad=True)
    kv_shape = (bh, (tiles + shifts - 1) * c, d) if strided else (bh, tiles, w, d)
    k, v = (torch.randn(kv_shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    order = torch.stack([torch.randperm(rounds * padded) for _ in range(bh)])
    blocked = own = None
    if masked:
        blocked = torch.rand(bh * tiles, c, w) < 0.3
        blocked[0, 1] = True  # a query with every key blocked: uniform weights, no gradient into q or k
        own = torch.zeros(bh * tiles, c, w, dtype=torch.bool)
        own[:, torch.arange(c), torch.arange(c)] = True
    shape = (bh, rounds, padded, d)

    def ours(q, k, v):
        return attend_rounds(q, k, v, blocked, own, order, padded, shape, 0.4, -1e9, -1e5, 0.0, spans)

    def windows(x):  # materialised, the plain way
        if not strided:
            return x.reshape(-1, w, d)
        return torch.stack([x[:, j * c : j * c + w] for j in range(tiles)], 1).reshape(-1, w, d)

    want = rounds_reference(q.reshape(-1, c, d), windows(k), windows(v), blocked, own, order, shape, 0.4)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), (q, k, v))
    if masked:
        inputs, atol = (q, k, v), 1e-12
    else:
        inputs, atol = [x.detach().float().requires_grad_() for x in (q, k, v)], 1e-5
    got = ours(*inputs)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    for a, b in zip(torch.autograd.grad((got * g.to(got.dtype)).sum(), inputs), want_grads):
        torch.testing.assert_close(a.double(), b, atol=atol * 100, rtol=0)
    if masked:
        assert torch.autograd.gradcheck(ours, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_hfx_model_padded_batch_equals_each_row_alone(causal, make_config):
    config = make_config(
        attention_type="hfx_lsh", max_position_embeddings=256, num_hashes=2, num_buckets=None, lsh_attn_chunk_length=16,
        lsh_num_chunks_after=0 if causal else 1,
    )
    torch.manual_seed(0)
    model = (hfx.HfxForCausalLM(config) if causal else hfx.HfxModel(config)).eval()
    lengths = [200, 256, 77]
    input_ids = torch.randint(1, 97, (3, 256))
    mask = (torch.arange(256)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = model(input_ids, attention_mask=mask)
        for row, length in enumerate(lengths):
            solo = model(input_ids[row : row + 1, :length])
            if causal:
                torch.testing.assert_close(batch.logits[row, :length], solo.logits[0], atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(batch.last_hidden_state[row, :length], solo.last_hidden_state[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_are_refused(source):
    """Two sequences in one row would be hashed and chunked together: one clear error instead."""
    module = layer(lsh_attn_chunk_length=8)
    q, k, v = (torch.randn(1, H, 32, D) for _ in range(3))
    cu = torch.tensor([0, 20, 32], dtype=torch.int32)
    kwargs = {"position_ids": torch.cat([torch.arange(20), torch.arange(12)])[None]} if source == "position_ids" else {
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    with pytest.raises(ValueError, match=r"hfx_lsh does not support packed sequences.*hfx_sliding_window"):
        lsh_attention(module, q, k, v, None, **kwargs)
    # left padding with generate's position ids (1 on the pads, then 0, 1, ...): one sequence, not refused
    keep = torch.arange(32)[None] >= 5
    position_ids = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    out, _ = lsh_attention(module, q, k, v, keep, position_ids=position_ids)
    torch.testing.assert_close(out, lsh_attention(module, q, k, v, keep)[0], atol=0, rtol=0)


def test_grouped_heads_must_divide_the_query_heads():
    q, k, v = torch.randn(1, 3, 16, D), torch.randn(1, 2, 16, D), torch.randn(1, 2, 16, D)
    with pytest.raises(ValueError, match=r"hfx_lsh: 3 query heads cannot share 2 key/value heads"):
        lsh_attention(layer(lsh_attn_chunk_length=8), q, k, v, None)


def test_without_the_fused_cpu_kernel_the_exact_path_gives_the_same_result(monkeypatch):
    """common.flash_cpu_ops() is None on a torch without the private kernels: materialised scores instead."""
    from hfx_attention import lsh

    module = layer(num_hashes=2, lsh_attn_chunk_length=8, hash_seed=1)
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, H, 64, D, requires_grad=True) for _ in range(3))
    out, _ = lsh_attention(module, q, k, v, None)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setattr(lsh, "flash_cpu_ops", lambda: None)
    exact, _ = lsh_attention(module, q, k, v, None)
    torch.testing.assert_close(exact, out, atol=rounding_bound(v), rtol=0)
    for got, want in zip(torch.autograd.grad(exact.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(got, want, atol=rounding_bound(want, 32), rtol=0)
