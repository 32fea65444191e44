"""transformers' own sliding-window models (Mistral, Qwen2, Gemma, ModernBERT) under hfx_sliding_window:
their semantics, equal to their sdpa output, through a 2-D key padding mask only."""

import copy

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    ModernBertConfig,
    Qwen2Config,
)
from transformers.masking_utils import sdpa_mask, sliding_window_bidirectional_mask_function, sliding_window_causal_mask_function

import hfx  # noqa: F401  (registers the backends with transformers)
import hfx_attention.model_windows as model_windows
from hfx.attention import eager_attention_forward

WINDOW = 8
# fp32 (eps 1.2e-7) through two or three layers of unit-scale activations: a few hundred roundings at most
ATOL = 64 * torch.finfo(torch.float32).eps
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

CAUSAL = {
    "mistral": lambda: MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SMALL),
    # use_sliding_window + max_window_layers=1: layer 0 full, layers 1-2 sliding
    "qwen2": lambda: Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **SMALL),
    "gemma3": lambda: Gemma3TextConfig(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8, **SMALL,
    ),
}


def pair(config, auto=AutoModelForCausalLM, reference_implementation="sdpa"):
    """The same weights under sdpa (the reference) and under hfx_sliding_window."""
    torch.manual_seed(0)
    reference = auto.from_config(copy.deepcopy(config), attn_implementation=reference_implementation).eval()
    model = auto.from_config(copy.deepcopy(config), attn_implementation="hfx_sliding_window").eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def padded_batch(length=80):
    """Three rows longer than the window (and than one band tile of 64 rows); rows 1 and 2 right-padded."""
    ids = torch.randint(1, 64, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 71:] = 0
    mask[2, 29:] = 0
    return ids, mask


def assert_close_on(mask, got, want):
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=ATOL)


@pytest.fixture
def seen_masks(monkeypatch):
    """Every attention_mask that reaches the model-window path (to prove no dense mask is built)."""
    seen = []
    inner = model_windows.model_window_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("sliding_window"), key.shape[2]))
        return inner(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(model_windows, "model_window_attention", spy)
    return seen


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_window_models_equal_sdpa(name, seen_masks):
    """Right-padded rows (left-padded prefill runs in the generation tests)."""
    reference, model = pair(CAUSAL[name]())
    ids, mask = padded_batch()
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, use_cache=False).logits
        got = model(ids, attention_mask=mask, use_cache=False).logits
        batched = list(seen_masks)
        alone = model(ids[2:, mask[2].bool()], use_cache=False).logits[0]
    assert_close_on(mask, got, want)
    # padding invariance: the padded row's real tokens give what the row alone gives
    torch.testing.assert_close(got[2, mask[2].bool()], alone, atol=ATOL, rtol=ATOL)
    windows = {w for _, w, _ in batched}
    assert WINDOW in windows and (name == "mistral" or None in windows)  # sliding and full layers both ran here
    assert all(m is not None and m.dim() == 2 and m.shape == (3, 80) for m, _, _ in batched)


def test_window_bound_is_transformers_mask_function():
    """The band equals transformers' own mask functions, fed to an eager reference: causal kv > q - s and
    kv <= q; bidirectional |q - k| <= s - 1 (ModernBERT passes s = local_attention // 2 + 1). Includes a
    cached step: 5 queries at the end of 40 keys."""
    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    for causal, s, n, kv in ((True, 6, 33, 33), (True, 6, 5, 40), (False, 5, 70, 70), (True, 1, 9, 9)):
        module.is_causal = causal
        q = torch.randn(2, 4, n, 16)
        k, v = torch.randn(2, 2, kv, 16), torch.randn(2, 2, kv, 16)
        keep = torch.ones(2, kv, dtype=torch.bool)
        keep[1, : kv // 4] = False  # left padding
        pattern = sliding_window_causal_mask_function(s) if causal else sliding_window_bidirectional_mask_function(s - 1)
        dense = sdpa_mask(batch_size=2, q_length=n, kv_length=kv, q_offset=kv - n, mask_function=pattern, attention_mask=keep, allow_is_causal_skip=False)
        want, _ = eager_attention_forward(module, q, k, v, dense, scaling=0.25)
        got, _ = model_windows.model_window_attention(module, q, k, v, keep, scaling=0.25, sliding_window=s)
        rows = keep[:, kv - n :]  # fully padded query rows have no defined output
        torch.testing.assert_close(got[rows], want[rows], atol=1e-6, rtol=1e-6)


def hidden_states_equal_sdpa(config):
    """The same weights under sdpa and hfx_sliding_window give the same last hidden states on a padded batch."""
    reference, model = pair(config, AutoModel)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask).last_hidden_state
    assert_close_on(mask, got, want)


def test_gemma3_bidirectional_equals_sdpa():
    """use_bidirectional_attention: sliding layers see |q - k| < sliding_window (exclusive), full layers all."""
    config = CAUSAL["gemma3"]()
    config.use_bidirectional_attention = True
    hidden_states_equal_sdpa(config)


def test_modernbert_local_and_global_layers_equal_sdpa(seen_masks):
    config = ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        local_attention=WINDOW, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, max_position_embeddings=512,
    )
    hidden_states_equal_sdpa(config)
    # ModernBERT hands over local_attention // 2 + 1 on local layers, None on global ones
    assert {w for _, w, _ in seen_masks} == {WINDOW // 2 + 1, None}
    assert all(m.dim() == 2 for m, _, _ in seen_masks)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_generate_with_window_bounded_cache_equals_sdpa(name, seen_masks):
    """Prompts longer than the window: sliding layers decode from a cache holding window - 1 keys."""
    reference, model = pair(CAUSAL[name]())
    prompt = torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding, as batched generation does
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = reference.generate(prompt, **options)
    got = model.generate(prompt, **options)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=ATOL, rtol=ATOL)
    decoding = [(m, kv) for m, w, kv in seen_masks if w == WINDOW and kv != 20]
    assert decoding and all(kv == WINDOW for _, kv in decoding)  # window - 1 cached keys + the new one
    assert all(m is None or m.shape[1] == kv for m, _, kv in seen_masks)  # kv_offset lines the mask up with the keys


def test_packed_rows_equal_sdpa_and_each_sequence_alone():
    """Padding-free batches (DataCollatorWithFlattening): position_ids restarts, or the flash varlen kwargs."""
    reference, model = pair(CAUSAL["qwen2"]())
    lengths = (37, 12, 51)
    sequences = [torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    features = [{"input_ids": s} for s in sequences]
    packed = DataCollatorWithFlattening(return_tensors="pt")(features)
    varlen = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True, return_position_ids=False)(features)
    with torch.no_grad():
        want = reference(packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        got = model(packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        flash = model(varlen["input_ids"], cu_seq_lens_q=varlen["cu_seq_lens_q"], cu_seq_lens_k=varlen["cu_seq_lens_k"], max_length_q=max(lengths), max_length_k=max(lengths), use_cache=False).logits[0]
        alone = torch.cat([model(torch.tensor([s]), use_cache=False).logits[0] for s in sequences])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got, alone, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(flash, alone, atol=ATOL, rtol=ATOL)


def test_packed_training_gradients_equal_sdpa():
    reference, model = pair(CAUSAL["mistral"]())
    reference.train(), model.train()
    position_ids = torch.cat([torch.arange(45), torch.arange(30)])[None]
    ids = torch.randint(1, 64, (1, 75), generator=torch.Generator().manual_seed(3))
    for m in (reference, model):
        m(ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_tiled_full_attention_matches_dense_reference(monkeypatch):
    """Full layers that SDPA cannot express without an (n, kv) mask (left padding, packing, a cached
    chunk) go through query tiles; many small tiles here, against an eager reference with the dense mask."""
    monkeypatch.setattr(model_windows, "TILE_ROWS", 7)
    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    q_all, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1, :9] = False
    segments = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 40])
    for causal, n, use_keep, use_segments in ((True, 40, True, False), (True, 11, True, False), (True, 40, False, True), (False, 40, False, True), (False, 40, True, False)):
        module.is_causal = causal
        q = q_all[:, :, 40 - n :]
        allowed = torch.ones(2, 1, n, 40, dtype=torch.bool)
        if causal:
            allowed &= torch.arange(40) <= torch.arange(40 - n, 40)[:, None]
        if use_keep:
            allowed &= keep[:, None, None]
        if use_segments:
            allowed &= segments[:, None, :, None] == segments[:, None, None, :]
        want, _ = eager_attention_forward(module, q, k, v, allowed, scaling=0.25)
        got = model_windows.tiled_attention(q, k, v, keep if use_keep else None, segments if use_segments else None, causal, 0.25, 0.0)
        rows = allowed.any(-1)[:, 0]
        torch.testing.assert_close(got[rows], want[rows], atol=1e-6, rtol=1e-6)


def test_softcapping_is_refused_with_what_to_use():
    config = Gemma2Config(num_hidden_layers=2, sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=50.0, **SMALL)
    _, model = pair(config, reference_implementation="eager")  # transformers has no sdpa for Gemma2
    with pytest.raises(ValueError, match=r"softcap=50\.0.*attn_implementation='eager'"):
        model(torch.randint(1, 64, (1, 20)))
    config.attn_logit_softcapping = None  # with soft-capping off, Gemma2 runs and matches eager
    reference, model = pair(config, reference_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close_on(mask, model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_unsupported_calls_are_refused():
    module = torch.nn.Module().eval()
    module.is_causal = True
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"attention sinks.*s_aux=a tensor of shape \(2,\)"):
        model_windows.model_window_attention(module, q, k, k, None, sliding_window=4, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match=r"sliding_window must be a positive integer or None.*got 0"):
        model_windows.model_window_attention(module, q, k, k, None, sliding_window=0)
    module.is_causal = False
    with pytest.raises(ValueError, match=r"10 queries against 16 keys.*cross-attention.*'sdpa'"):
        model_windows.model_window_attention(module, q, torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), None, sliding_window=4)


def test_static_cache_is_refused():
    """A pre-allocated cache hands over empty slots (ring order on sliding layers): an error, not wrong tokens."""
    _, model = pair(CAUSAL["qwen2"]())
    with pytest.raises(ValueError, match=r"static cache.*attn_implementation='sdpa'"):
        model.generate(torch.randint(1, 64, (1, 5)), max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
