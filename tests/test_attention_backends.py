"""hfx_sliding_window, hfx_block_sparse and hfx_lsh against dense references and transformers' own layers."""

import copy
import types

import pytest
import torch
from transformers import LongformerConfig, ReformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

from hfx.attention import eager_attention_forward
from hfx_attention.block_sparse import block_layout, block_sparse_attention
from hfx_attention.lsh import lsh_attention
from hfx_attention.sliding_window import sliding_window_attention

B, H, D = 2, 3, 16


def layer(causal=False, **config):
    return types.SimpleNamespace(config=types.SimpleNamespace(**config), is_causal=causal, training=False, layer_idx=0)


def qkv(n, kv_heads=H):
    return (
        torch.randn(B, H, n, D, requires_grad=True),
        torch.randn(B, kv_heads, n, D, requires_grad=True),
        torch.randn(B, kv_heads, n, D, requires_grad=True),
    )


def padding(n):
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[1, -3:] = False
    return keep


def some_globals(n):
    flags = torch.zeros(B, n, dtype=torch.bool)
    flags[:, 0] = True
    flags[0, n // 2] = True
    return flags


def dense_mask(allowed_qk, keep, flags, causal):
    """Token-level reference: (allowed | either end global) & causal & key not padded -> (B, 1|H, n, n)."""
    n = keep.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    mask = allowed_qk
    if flags is not None:
        mask = mask | (flags[:, None, :, None] | flags[:, None, None, :])
    if causal:
        mask = mask & (j <= i)
    return mask & keep[:, None, None, :]


def assert_matches_dense(fn, module, mask, keep, n, kv_heads=H, **kwargs):
    q, k, v = qkv(n, kv_heads)
    out, _ = fn(module, q, k, v, keep, scaling=0.3, **kwargs)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3)
    real = keep[:, :, None, None]  # outputs at padded query positions are meaningless
    torch.testing.assert_close(out * real, ref * real, atol=1e-5, rtol=0)
    weights = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,window,with_globals", [(37, 8, False), (130, 20, True), (5, 512, True), (96, 2, True)])
def test_sliding_window_equals_dense(causal, n, window, with_globals):
    keep = padding(n)
    flags = some_globals(n) if with_globals else None
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    band = ((i - j).abs() <= window // 2)[None, None]
    kwargs = {"global_attention_mask": flags.long()} if with_globals else {}
    assert_matches_dense(
        sliding_window_attention, layer(causal, attention_window=window), dense_mask(band, keep, flags, causal), keep, n, **kwargs
    )


def test_sliding_window_grouped_query_heads_and_per_layer_window():
    n, keep = 40, padding(40)
    module = layer(True, attention_window=[100, 6])
    module.layer_idx = 1
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    mask = dense_mask(((i - j).abs() <= 3)[None, None], keep, None, True)
    assert_matches_dense(sliding_window_attention, module, mask, keep, n, kv_heads=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,block,num_random,with_globals", [(37, 4, 2, False), (100, 7, 1, True), (10, 16, 3, False)])
def test_block_sparse_equals_dense(causal, n, block, num_random, with_globals):
    # unpadded: a right-padded row is laid out by its own length (tests/test_attention_block_sparse_padding.py)
    keep = torch.ones(B, n, dtype=torch.bool)
    blocks = -(-n // block)
    index, valid = block_layout(blocks, H, num_random, 0, 0, causal)
    layout = torch.zeros(H, blocks, blocks, dtype=torch.bool)
    for h, t, s in valid.nonzero().tolist():
        layout[h, t, index[h, t, s]] = True
    of_token = torch.arange(n) // block
    local = layout[:, of_token][:, :, of_token][None]
    flags = (of_token == 0) | ((of_token == blocks - 1) & (not causal))
    flags = flags[None].expand(B, n).clone()
    kwargs = {}
    if with_globals:
        extra = some_globals(n)
        flags |= extra
        kwargs["global_attention_mask"] = extra.long()
    module = layer(causal, block_size=block, num_random_blocks=num_random)
    assert_matches_dense(block_sparse_attention, module, dense_mask(local, keep, flags, causal), keep, n, **kwargs)


def test_block_sparse_random_blocks_are_seeded_and_span_the_sequence():
    index, valid = block_layout(64, 4, 3, 7, 0, False)
    again, _ = block_layout.__wrapped__(64, 4, 3, 7, 0, False)
    other, _ = block_layout.__wrapped__(64, 4, 3, 8, 0, False)
    assert torch.equal(index, again) and not torch.equal(index, other)
    random_blocks = index[..., 3:][valid[..., 3:]]
    assert random_blocks.min() <= 5 and random_blocks.max() >= 58  # drawn from the whole sequence
    assert not torch.equal(index[0], index[1])  # one pattern per head


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rounds", [1, 2])
def test_lsh_equals_dense_when_one_chunk_covers_the_sequence(causal, rounds):
    n, keep = 24, padding(24)
    module = layer(causal, num_hashes=rounds, num_buckets=4, lsh_attn_chunk_length=32, hash_seed=1)
    full = torch.ones(1, 1, n, n, dtype=torch.bool)
    assert_matches_dense(lsh_attention, module, dense_mask(full, keep, None, causal), keep, n)


def test_lsh_is_deterministic_per_hash_seed_and_actually_sparse():
    q, k, v = qkv(128)
    keep = torch.ones(B, 128, dtype=torch.bool)
    settings = dict(num_hashes=2, num_buckets=8, lsh_attn_chunk_length=16)
    first, _ = lsh_attention(layer(hash_seed=5, **settings), q, k, v, keep)
    again, _ = lsh_attention(layer(hash_seed=5, **settings), q, k, v, keep)
    other, _ = lsh_attention(layer(hash_seed=6, **settings), q, k, v, keep)
    dense, _ = eager_attention_forward(layer(), q, k, v, None, scaling=D**-0.5)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    assert (first - dense).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_lsh_matches_reformer_given_the_same_rotations(causal, rounds):
    config = ReformerConfig(
        hidden_size=32, attention_head_size=8, num_attention_heads=4, lsh_attn_chunk_length=8, num_buckets=4,
        num_hashes=rounds, hash_seed=3, is_decoder=causal, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        lsh_attention_probs_dropout_prob=0.0, attn_layers=["lsh"],
    )
    reformer = LSHSelfAttention(config).eval()
    x = torch.randn(2, 48, 32)
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        reformer32 = reformer(x, attention_mask=mask)
        # Reformer's own result in float64 with the buckets its float32 hashing (hash_seed=3) chose.
        want = copy.deepcopy(reformer).double()(x.double(), attention_mask=mask, buckets=reformer32.buckets)
    want = want.hidden_states.float()
    # Reformer shares one query/key projection and length-normalises the keys.
    qk = reformer.query_key(x).view(2, 48, 4, 8).transpose(1, 2)
    key = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6)
    value = reformer.value(x).view(2, 48, 4, 8).transpose(1, 2)
    module = layer(causal, num_hashes=rounds, num_buckets=4, lsh_attn_chunk_length=8, hash_seed=3, lsh_exclude_self=True)
    got, _ = lsh_attention(module, qk, key, value, mask.bool(), scaling=8**-0.5)
    real = mask.bool()[:, :, None]
    torch.testing.assert_close(got.reshape(2, 48, 32) * real, want * real, atol=1e-5, rtol=0)

    # Against float32 Reformer the same holds except for one artefact of Reformer's: it normalises with
    # exp(x - logsumexp(x)), and for a query whose only admissible key in every round is itself (causal,
    # several hashes: the first positions) all scores sit at the -1e5 self value, where float32 spacing is
    # 2**-7, so its output is its own value times 1 +- ~0.5% (up to ~5e-3 off here). hfx gives the value itself.
    got, value = got.detach(), value.detach().transpose(1, 2)
    ours = reformer32.hidden_states.view(2, 48, 4, 8)
    off = ((got - ours).abs().amax(-1) > 1e-5) & mask.bool()[:, :, None]
    if not causal or rounds == 1:
        assert not off.any()
    torch.testing.assert_close(got[off], value[off], atol=1e-6, rtol=0)
    assert ((ours[off] - value[off]).abs() <= 1e-2 * value[off].abs() + 1e-6).all()


def test_lsh_query_with_only_itself_gets_its_own_value_in_low_precision():
    """Position 0, causal, own key excluded: weights must sum to 1 however the self score's log-sum-exp rounds."""
    q, k, v = (t.detach() for t in qkv(16))
    # 2 rounds x 2 chunks, 3 chunks before: every window holds both rounds, so two copies of each key.
    module = layer(
        True, num_hashes=2, num_buckets=4, lsh_attn_chunk_length=8, hash_seed=0, lsh_exclude_self=True,
        lsh_num_chunks_before=3,
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, _ = lsh_attention(module, q.to(dtype), k.to(dtype), v.to(dtype), None)
        assert torch.equal(out[:, 0], v[:, :, 0].to(dtype))


def longformer_pair(window):
    config = LongformerConfig(hidden_size=32, num_attention_heads=4, attention_window=[window], attention_probs_dropout_prob=0.0)
    reference = LongformerSelfAttention(config, layer_id=0).eval()
    with torch.no_grad():  # one set of projections for local and global attention
        for name in ("query", "key", "value"):
            getattr(reference, f"{name}_global").load_state_dict(getattr(reference, name).state_dict())
    return config, reference


def test_sliding_window_equals_longformer_self_attention():
    window, n = 8, 32  # Longformer needs n to be a multiple of the window; padding is our job, not theirs
    _, reference = longformer_pair(window)
    x = torch.randn(2, n, 32)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, -6:] = False
    flags = torch.zeros(2, n, dtype=torch.bool)
    flags[:, 0] = flags[0, 13] = True
    # LongformerModel's encoding: -10000 padding, 0 local, +10000 global
    mask = torch.where(~keep, -10000.0, torch.where(flags, 10000.0, 0.0))
    want = reference(
        x, attention_mask=mask, is_index_masked=~keep, is_index_global_attn=flags, is_global_attn=True
    )[0]

    def heads(t):
        return t.view(2, n, 4, 8).transpose(1, 2)

    q, k, v = heads(reference.query(x)), heads(reference.key(x)), heads(reference.value(x))
    got, _ = sliding_window_attention(layer(attention_window=window), q, k, v, keep, scaling=8**-0.5, global_attention_mask=flags)
    real = keep[:, :, None]
    torch.testing.assert_close(got.reshape(2, n, 32) * real, want * real, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "fn,config,message",
    [
        (sliding_window_attention, {"attention_window": 7}, "attention_window must be an even integer >= 2"),
        (sliding_window_attention, {"attention_window": 0}, "got 0"),
        (block_sparse_attention, {"block_size": 0}, "block_size must be an integer >= 1, got 0"),
        (lsh_attention, {"num_buckets": 6}, "num_buckets must be a power of two >= 2 (2, 4, 8, ...) or None"),
        (lsh_attention, {"num_hashes": 0}, "num_hashes must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_fail_before_compute(fn, config, message):
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        fn(layer(**config), q, k, v, None)


def test_wrong_global_mask_shape_is_named():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=r"global_attention_mask must have shape \(batch, seq_len\)=\(2, 8\).*\(2, 9\)"):
        sliding_window_attention(layer(attention_window=4), q, k, v, None, global_attention_mask=torch.ones(2, 9))


def test_dense_4d_mask_is_refused():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="2-D key padding mask"):
        sliding_window_attention(layer(attention_window=4), q, k, v, torch.ones(2, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("name", ["hfx_block_sparse", "hfx_lsh"])
def test_whole_sequence_backends_refuse_cached_decoding(name):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = torch.nn.Module()
    query, key = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"needs as many keys as queries.*got 1 queries and 5 keys"):
        ALL_ATTENTION_FUNCTIONS[name](module, query, key, key, None, scaling=8**-0.5)
