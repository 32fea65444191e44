"""hfx_block_sparse is padding-invariant: a row's real-token outputs do not depend on right-padding or on
the other rows of its batch, because its block layout follows its own real length."""

import types

import pytest
import torch

import hfx
from hfx.attention import eager_attention_forward
from hfx_attention.block_sparse import block_layout, block_sparse_attention

H, D = 4, 16
GLOBAL_ID = 7
EVAL = types.SimpleNamespace(training=False)


def layer(causal, block, num_random=2, layer_idx=1, **config):
    config = types.SimpleNamespace(block_size=block, num_random_blocks=num_random, block_sparse_seed=3, **config)
    return types.SimpleNamespace(config=config, is_causal=causal, training=False, layer_idx=layer_idx)


def dense_reference(q, k, v, keep, flags, causal, block, num_random, layer_idx):
    """Each row alone, through eager attention with the explicit token mask of its own real length."""
    outs = []
    for r in range(q.shape[0]):
        real = int(keep[r].nonzero().max()) + 1
        blocks = -(-real // block)
        index, valid = block_layout(blocks, H, num_random, 3, layer_idx, causal)
        layout = torch.zeros(H, blocks, blocks, dtype=torch.bool)
        for h, t, s in valid.nonzero().tolist():
            layout[h, t, index[h, t, s]] = True
        of_token = torch.arange(real) // block
        allowed = layout[:, of_token][:, :, of_token]
        is_global = (of_token == 0) | ((of_token == blocks - 1) & (not causal))
        if flags is not None:
            is_global = is_global | flags[r, :real]
        allowed = allowed | is_global[:, None] | is_global[None, :]
        if causal:
            allowed = allowed & torch.ones(real, real, dtype=torch.bool).tril()
        allowed = allowed & keep[r, :real][None, :]
        out, _ = eager_attention_forward(EVAL, q[r : r + 1, :, :real], k[r : r + 1, :, :real], v[r : r + 1, :, :real], allowed[None], scaling=0.25)
        outs.append(torch.nn.functional.pad(out[0], (0, 0, 0, 0, 0, q.shape[2] - real)))
    return torch.stack(outs)


def inputs(lengths, n, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), H, n, D, generator=g)
    k = torch.randn(len(lengths), kv_heads, n, D, generator=g)
    v = torch.randn(len(lengths), kv_heads, n, D, generator=g)
    keep = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    return q, k, v, keep


def call(module, q, k, v, keep, **kwargs):
    return block_sparse_attention(module, q, k, v, keep, scaling=0.25, **kwargs)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [40, 64])  # 200 real tokens: a multiple of 40, not of 64
@pytest.mark.parametrize("globals_from", [None, "mask", "token_ids"])
def test_row_alone_padded_and_in_a_mixed_batch_agree(causal, block, globals_from, kv_heads=2):
    n, lengths = 256, [256, 200, 130]  # the 200-token row next to a longer and a shorter one
    q, k, v, keep = inputs(lengths, n, kv_heads)
    ids = torch.randint(10, 50, (3, n), generator=torch.Generator().manual_seed(1))
    ids[:, [5, 90, 150]] = GLOBAL_ID
    flags = ids == GLOBAL_ID if globals_from else None
    config = {"global_attention_token_ids": [GLOBAL_ID]} if globals_from == "token_ids" else {}
    module = layer(causal, block, **config)

    def kwargs(rows, length):
        if globals_from == "mask":
            return {"global_attention_mask": flags[rows, :length].long()}
        return {"input_ids": ids[rows, :length]} if globals_from == "token_ids" else {}

    batch = call(module, q, k, v, keep, **kwargs(slice(None), n))
    alone = call(module, q[1:2, :, :200], k[1:2, :, :200], v[1:2, :, :200], None, **kwargs(slice(1, 2), 200))
    padded = call(module, q[1:2], k[1:2], v[1:2], keep[1:2], **kwargs(slice(1, 2), n))
    torch.testing.assert_close(batch[1, :200], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[0, :200], alone[0], atol=1e-6, rtol=0)
    # and every row equals the dense reference of its own length
    want = dense_reference(q, *(torch.repeat_interleave(t, H // kv_heads, 1) for t in (k, v)), keep, flags, causal, block, 2, 1)
    real = keep[:, :, None, None]
    torch.testing.assert_close(batch * real, want * real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_are_never_attended_and_get_no_gradient(causal):
    n = 256
    q, k, v, keep = inputs([256, 200, 130], n, 2, seed=2)
    flags = torch.zeros(3, n, dtype=torch.long)
    flags[:, 70] = 1
    module = layer(causal, 64)
    k.requires_grad_(), v.requires_grad_()
    out = call(module, q, k, v, keep, global_attention_mask=flags)
    noisy_k = torch.where(keep[:, None, :, None], k.detach(), 1e3 * torch.randn_like(k))
    noisy_v = torch.where(keep[:, None, :, None], v.detach(), 1e3 * torch.randn_like(v))
    noisy = call(module, q, noisy_k, noisy_v, keep, global_attention_mask=flags)
    real = keep[:, :, None, None]
    assert torch.equal(out.detach() * real, noisy * real)
    grad_k, grad_v = torch.autograd.grad((out * real * torch.randn_like(out)).sum(), (k, v))
    pad = ~keep[:, None, :, None]
    assert torch.equal(grad_k * pad, torch.zeros_like(grad_k)) and torch.equal(grad_v * pad, torch.zeros_like(grad_v))
    assert grad_k[:, :, :130].abs().min() >= 0 and grad_k[keep[:, None].expand(-1, 2, -1)].abs().max() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_the_dense_reference_with_grouped_heads(causal):
    n, lengths = 200, [200, 161]
    q, k, v, keep = inputs(lengths, n, 2, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    weights = torch.randn(2, n, H, D) * keep[:, :, None, None]
    got = torch.autograd.grad((call(layer(causal, 32, num_random=3), *leaves, keep) * weights).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kv = (torch.repeat_interleave(t, 2, 1) for t in ref_leaves[1:])
    want = dense_reference(ref_leaves[0], *kv, keep, None, causal, 32, 3, 1)
    want = torch.autograd.grad((want * weights).sum(), ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gradients_of_a_padded_batch_equal_per_row_gradients():
    n, lengths = 200, [200, 137]
    q, k, v, keep = inputs(lengths, n, H, seed=3)
    module = layer(False, 32, num_random=3)
    weights = torch.randn(2, n, H, D) * keep[:, :, None, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    batch_grads = torch.autograd.grad((call(module, *leaves, keep) * weights).sum(), leaves)
    for r, real in enumerate(lengths):
        row = [t[r : r + 1, :, :real].clone().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad((call(module, *row, None) * weights[r : r + 1, :real]).sum(), row)
        for got, want in zip(batch_grads, grads):
            torch.testing.assert_close(got[r : r + 1, :, :real], want, atol=1e-6, rtol=0)


def test_left_padded_row_masks_its_leading_keys():
    """Keys masked inside the real length (left padding) are excluded token by token, as in the dense reference."""
    n = 150
    q, k, v, _ = inputs([n, n], n, H, seed=4)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :23] = False
    got = call(layer(True, 32), q, k, v, keep)
    want = dense_reference(q, k, v, keep, None, True, 32, 2, 1)
    real = keep[:, :, None, None]
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_hfx_model_padded_batch_equals_per_row_runs(causal, make_config):
    config = make_config(
        attention_type="hfx_block_sparse", block_size=8, num_random_blocks=2, max_position_embeddings=64,
        global_attention_token_ids=[GLOBAL_ID],
    )
    model = (hfx.HfxForCausalLM(config).model if causal else hfx.HfxModel(config)).eval()
    lengths = [64, 45, 20]
    ids = torch.randint(10, 97, (3, 64), generator=torch.Generator().manual_seed(5))
    ids[:, 12] = GLOBAL_ID
    mask = (torch.arange(64)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).last_hidden_state
        for r, real in enumerate(lengths):
            alone = model(ids[r : r + 1, :real]).last_hidden_state
            torch.testing.assert_close(batch[r, :real], alone[0], atol=1e-5, rtol=0)
        # the padded tokens' ids do not reach any real token
        other = torch.where(mask.bool(), ids, torch.full_like(ids, GLOBAL_ID))
        again = model(other, attention_mask=mask).last_hidden_state
    real = mask.bool()[:, :, None]
    torch.testing.assert_close(again * real, batch * real, atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_general_path_equals_the_fast_path_and_the_reference(causal, monkeypatch):
    """GPUs, other dtypes and dropout take the gathered-tile path: same numbers as the CPU split path."""
    from hfx_attention import block_sparse

    q, k, v, keep = inputs([230, 201], 230, 2, seed=7)
    module = layer(causal, 32, num_random=3)
    fast = call(module, q, k, v, keep)
    monkeypatch.setattr(block_sparse, "_split_ready", lambda *args: False)
    general = call(module, q, k, v, keep)
    want = dense_reference(q, *(torch.repeat_interleave(t, 2, 1) for t in (k, v)), keep, None, causal, 32, 3, 1)
    real = keep[:, :, None, None]
    torch.testing.assert_close(general * real, want * real, atol=1e-5, rtol=0)
    torch.testing.assert_close(general * real, fast * real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_are_refused(source):
    """A packed row's blocks, global blocks and random blocks would span its sequences: one clear error."""
    q, k, v, _ = inputs([96], 96, 2)
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    kwargs = {"position_ids": torch.cat([torch.arange(40), torch.arange(56)])[None]} if source == "position_ids" else {
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    with pytest.raises(ValueError, match=r"hfx_block_sparse does not support packed sequences.*hfx_sliding_window"):
        call(layer(False, 16), q, k, v, None, **kwargs)
    # padded rows with generate's position ids (1 on the pads): one sequence per row, not refused
    q, k, v, keep = inputs([70, 96], 96, 2)
    position_ids = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    got = call(layer(False, 16), q, k, v, keep, position_ids=position_ids)
    torch.testing.assert_close(got, call(layer(False, 16), q, k, v, keep), atol=0, rtol=0)


def test_without_the_fused_cpu_kernel_the_general_path_serves(monkeypatch):
    """common.flash_cpu_ops() is None on a torch without the private kernels: the gathered-tile path instead."""
    from hfx_attention import block_sparse

    q, k, v, keep = inputs([160, 160], 160, 2, seed=3)
    module = layer(False, 32, num_random=2)
    fast = call(module, q, k, v, keep)
    monkeypatch.setattr(block_sparse, "flash_cpu_ops", lambda: None)
    assert not block_sparse._split_ready(q, None, None, 0.0)
    torch.testing.assert_close(call(module, q, k, v, keep), fast, atol=1e-5, rtol=0)
