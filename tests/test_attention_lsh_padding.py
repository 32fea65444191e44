"""hfx_lsh: a row's real-token outputs do not depend on its right-padding or on the other rows of the batch."""

import types

import pytest
import torch

import hfx
from hfx_attention.lsh import _ChunkAttention, automatic_buckets, chunk_attention, lsh_attention

H, D = 2, 8
# fp32 attention of unit-scale inputs: each output is a convex combination of O(100) values, so two orders of
# evaluation that differ only in rounding agree to a few ulps of 1 (~1e-7); 1e-6 leaves room without hiding a
# changed layout (a different chunk or bucket moves outputs by ~1e-1).
TOL = 1e-6


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
        torch.testing.assert_close(out[row, :length], want, atol=TOL, rtol=0)
    assert (out[0, 200:] == 0).all() and (out[2, 130:] == 0).all()  # past a row's real length: zeros

    # the padded row in a batch of its own, padded to 256 and to 213 (not a multiple of any chunk)
    for width in (256, 213):
        solo, _ = lsh_attention(module, q[:1, :, :width], k[:1, :, :width], v[:1, :, :width], keep[:1, :width])
        torch.testing.assert_close(solo[0, :200], out[0, :200], atol=TOL, rtol=0)

    # gradients of the real outputs reach the same real inputs with the same values, and nothing else
    weights = torch.randn(3, n, H, D) * keep[:, :, None, None]
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = alone(module, q, k, v, 0, 200, keep)
    want_grads = torch.autograd.grad((want * weights[0, :200]).sum(), (q, k, v))
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got[0, :, :200], ref[0, :, :200], atol=TOL, rtol=0)
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
    torch.testing.assert_close(out[1], alone(module, q, k, v, 1, 256), atol=TOL, rtol=0)


def test_row_without_real_tokens_outputs_zeros_and_leaves_the_others_alone():
    module = layer(num_hashes=2, num_buckets=None, lsh_attn_chunk_length=16, hash_seed=0)
    q, k, v = (torch.randn(2, H, 80, D) for _ in range(3))
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep[1] = False
    out, _ = lsh_attention(module, q, k, v, keep)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[0], alone(module, q, k, v, 0, 80), atol=TOL, rtol=0)


def chunk_reference(query, key, value, blocked, own, scaling, want_lse):
    scores = torch.einsum("ncd,nwd->ncw", query, key) * scaling
    scores = scores.masked_fill(blocked, -1e9).masked_fill(own, -1e5)
    return torch.softmax(scores, -1) @ value, torch.logsumexp(scores, -1)


def test_chunk_attention_backward_matches_autograd_with_masks_and_log_sum_exp():
    """The hand-written backward (log-sum-exp folded into the softmax row term, masked scores without
    gradient) against autograd through the plain formula, in float64, and against finite differences."""
    torch.manual_seed(2)
    n, c, w, d = 3, 3, 6, 4
    q, k, v = (torch.randn(n, rows, d, dtype=torch.float64, requires_grad=True) for rows in (c, w, w))
    blocked = torch.rand(n, c, w) < 0.3
    blocked[0, 1] = True  # a query with every key blocked: uniform weights, no gradient into q or k
    own = torch.zeros(n, c, w, dtype=torch.bool)
    own[:, torch.arange(c), torch.arange(c)] = True
    g_out, g_lse = torch.randn(n, c, d, dtype=torch.float64), torch.randn(n, c, dtype=torch.float64)
    out, lse = chunk_attention(q, k, v, blocked, own, 0.4, -1e9, -1e5, True, 0.0)
    ref_out, ref_lse = chunk_reference(q, k, v, blocked, own, 0.4, True)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-9, rtol=0)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda *x: _ChunkAttention.apply(*x, blocked, own, 0.4, -1e9, -1e5, True), (q, k, v))


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
