"""Packed (padding-free) sequences through hfx_sliding_window: boundaries from position_ids restarts or from
the flash-attention varlen kwargs give exactly what each sequence gives alone."""

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig

import hfx
from hfx_attention.common import sequence_ids
from hfx_attention.sliding_window import sliding_window_attention

H, D, WINDOW = 4, 16, 8  # half-window 4: every sequence below is longer, so the band really cuts
EPS = torch.finfo(torch.float32).eps


def rounding_bound(values, factor=16):
    """What fp32 rounding alone may move an attention output (or, factor 32, a gradient): ``factor`` ulps of
    the largest value. An output is a softmax-weighted average of values; the scores, their exp and
    normalisation and the weighted sum each add a few ulps relative to the values, in an order that depends
    on the kernel's tiling (measured: under 2 ulps of max|v| for outputs, under 4 of max|gradient| for
    gradients). A window one key wider on each side moves them by ~10^6 ulps: any pattern change fails."""
    return factor * EPS * values.abs().max().item()


def layer(causal, **config):
    return types.SimpleNamespace(config=types.SimpleNamespace(**config), is_causal=causal, training=False, layer_idx=0)


def packed_rows(rows):
    """rows: per batch row, the sequence lengths it packs -> (position_ids (B, n), cu_seq_lens over B*n)."""
    positions, cu = [], [0]
    for lengths in rows:
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
        for n in lengths:
            cu.append(cu[-1] + n)
    return torch.stack(positions), torch.tensor(cu, dtype=torch.int32)


ROWS = [[13, 9, 20], [30, 5, 7]]


def spans(rows):
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            yield b, start, start + n
            start += n


def float64_reference(q, k, v, rows, flags, causal, scaling):
    """Dense attention written out in float64 on the same inputs (as float64 leaves), with the explicit token
    mask: same sequence & (band | either end global) & causal."""
    n = q.shape[2]
    segment = torch.stack([torch.cat([torch.full((m,), s) for s, m in enumerate(lengths)]) for lengths in rows])
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = ((i - j).abs() <= WINDOW // 2)[None] | flags[:, :, None] | flags[:, None, :]
    allowed = allowed & (segment[:, :, None] == segment[:, None, :])
    if causal:
        allowed = allowed & (j <= i)
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scaling).masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.repeat_interleave(rep, 1)).transpose(1, 2), (q, k, v)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_packed_rows_equal_each_sequence_alone(source, causal, kv_heads):
    torch.manual_seed(0)
    n = sum(ROWS[0])
    q = torch.randn(2, H, n, D, requires_grad=True)
    k = torch.randn(2, kv_heads, n, D, requires_grad=True)
    v = torch.randn(2, kv_heads, n, D, requires_grad=True)
    flags = torch.zeros(2, n, dtype=torch.bool)
    flags[0, [0, 17, 30]] = True  # first token of sequence 0, inside sequence 1, inside sequence 2
    flags[1, 32] = True  # inside the short middle sequence of row 1
    position_ids, cu = packed_rows(ROWS)
    kwargs = {"position_ids": position_ids} if source == "position_ids" else {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    module = layer(causal, attention_window=WINDOW)
    out, _ = sliding_window_attention(module, q, k, v, None, scaling=0.25, global_attention_mask=flags.long(), **kwargs)

    for b, start, end in spans(ROWS):
        part = slice(start, end)
        alone, _ = sliding_window_attention(
            module, q[b : b + 1, :, part], k[b : b + 1, :, part], v[b : b + 1, :, part], None, scaling=0.25,
            global_attention_mask=flags[b : b + 1, part].long(),
        )
        # both fp32, tiled differently: each within a few ulps of the exact value
        torch.testing.assert_close(out[b : b + 1, part], alone, atol=rounding_bound(v), rtol=0)

    reference, leaves = float64_reference(q, k, v, ROWS, flags, causal, 0.25)
    torch.testing.assert_close(out.double(), reference, atol=rounding_bound(v), rtol=0)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((reference * weights.double()).sum(), leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=rounding_bound(want, 32), rtol=0)


def test_packed_row_with_trailing_padding_never_attends_the_padding():
    """Packing and a key padding mask together: the pad tokens are keys of no sequence."""
    torch.manual_seed(1)
    lengths = [11, 14]
    n = sum(lengths) + 5
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
    keep = torch.ones(1, n, dtype=torch.bool)
    keep[0, -5:] = False
    position_ids = torch.cat([torch.arange(11), torch.arange(14), torch.arange(5)])[None]
    module = layer(False, attention_window=WINDOW)
    out, _ = sliding_window_attention(module, q, k, v, keep, scaling=0.25, position_ids=position_ids)
    for start, end in [(0, 11), (11, 25)]:
        alone, _ = sliding_window_attention(module, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], None, scaling=0.25)
        torch.testing.assert_close(out[:, start:end], alone, atol=rounding_bound(v), rtol=0)


def test_boundaries_are_read_as_transformers_reads_them():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    ids = sequence_ids({"position_ids": position_ids}, 2, 8, 8, "cpu", "x")
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]] * 2  # (1, n) positions broadcast over the batch
    assert sequence_ids({"position_ids": torch.arange(8)[None] + 5}, 1, 8, 8, "cpu", "x") is None  # one sequence
    # cached decoding: fewer queries than keys, positions continue the cache, nothing is packed
    assert sequence_ids({"position_ids": torch.tensor([[0, 0]])}, 1, 2, 9, "cpu", "x") is None
    cu = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)
    assert sequence_ids({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, 2, 8, 8, "cpu", "x").tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1],
        [2, 2, 3, 3, 3, 3, 3, 3],
    ]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cu_seq_lens_q": torch.tensor([0, 4, 9]), "cu_seq_lens_k": torch.tensor([0, 5, 9])}, "must be equal"),
        ({"cu_seq_lens_q": torch.tensor([0, 4, 7])}, r"from 0 to batch \* length = 9"),
        ({"cu_seq_lens_q": torch.tensor([0, 6, 4, 9])}, "non-decreasing"),
        ({"position_ids": torch.arange(5)[None]}, r"do not match the queries \(batch, length\)=\(1, 9\)"),
    ],
)
def test_bad_boundaries_are_named(kwargs, message):
    q = torch.randn(1, H, 9, D)
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(layer(True, attention_window=WINDOW), q, q, q, None, **kwargs)


def test_sequence_crossing_a_batch_row_is_refused():
    q = torch.randn(2, H, 6, D)
    cu = torch.tensor([0, 4, 12])  # the second sequence spans rows 0 and 1
    with pytest.raises(ValueError, match="crosses a batch row"):
        sliding_window_attention(layer(True, attention_window=WINDOW), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


SEQUENCES = [[5, 17, 23, 8, 41, 9, 12, 30, 3, 4, 61, 7, 2], [44, 8, 19, 5, 33, 71, 6, 10, 15], [9, 9, 21, 40, 3, 18, 7, 52, 11, 6, 28, 13, 2, 70, 5]]


def flattened(**collator):
    return DataCollatorWithFlattening(return_tensors="pt", **collator)([{"input_ids": ids} for ids in SEQUENCES])


def assert_packed_causal_lm_matches_alone(model, batch):
    model.zero_grad()
    packed = model(**batch)
    packed.loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, count, start = 0.0, 0, 0
    for ids in SEQUENCES:
        alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
        torch.testing.assert_close(packed.logits[:, start : start + len(ids)], alone.logits, atol=1e-5, rtol=0)
        total = total + alone.loss * (len(ids) - 1)
        count += len(ids) - 1
        start += len(ids)
    (total / count).backward()
    torch.testing.assert_close(packed.loss, (total / count).detach(), atol=1e-6, rtol=0)
    for got, (name, p) in zip(packed_grads, model.named_parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_hfx_causal_lm_trains_on_a_flattened_batch_as_on_each_sequence(flash_kwargs, make_config):
    config = make_config(
        attention_type="hfx_sliding_window", attention_window=4, position_embedding_type="rotary", norm_position="pre",
        global_attention_token_ids=[2],
    )
    model = hfx.HfxForCausalLM(config).train()  # dropout is 0: train mode, deterministic
    batch = flattened(return_flash_attn_kwargs=flash_kwargs)
    if flash_kwargs:
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # only cu_seq_lens mark the boundaries
    assert_packed_causal_lm_matches_alone(model, batch)


def test_hfx_encoder_on_a_flattened_batch_equals_each_sequence(make_config):
    config = make_config(attention_type="hfx_sliding_window", attention_window=6, global_attention_token_ids=[2])
    model = hfx.HfxModel(config).eval()
    batch = flattened()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        start = 0
        for ids in SEQUENCES:
            alone = model(input_ids=torch.tensor([ids])).last_hidden_state
            torch.testing.assert_close(packed[:, start : start + len(ids)], alone, atol=1e-5, rtol=0)
            start += len(ids)


def test_stock_llama_trains_on_a_flattened_batch_as_on_each_sequence():
    config = LlamaConfig(
        vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, attention_window=6,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hfx_sliding_window").train()
    assert model.config._attn_implementation == "hfx_sliding_window"
    assert_packed_causal_lm_matches_alone(model, flattened(return_flash_attn_kwargs=True))
