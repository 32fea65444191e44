"""hfx_adaptive_span: the soft span mask against a float64 formula, the L1 penalty, key skipping, generate, save/load."""

import math

import pytest
import torch

import hfx
from hfx_attention.adaptive_span import AdaptiveSpan, head_spans, span_attention

NAME = "hfx_adaptive_span"


def span_config(make_config, **overrides):
    base = dict(attention_type=NAME, adaptive_span_max=16, adaptive_span_ramp=4, adaptive_span_init=0.25,
                position_embedding_type="rotary", norm_position="pre")
    return make_config(**{**base, **overrides})


def reference(q, k, v, keep, spans, ramp, causal, scaling):
    """a_ij = m(x_ij) exp(s_ij) / sum_k m(x_ik) exp(s_ik), m(x) = clamp((R + z - x) / R, 0, 1), written out."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * scaling
    i = torch.arange(n_q, dtype=q.dtype)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, dtype=q.dtype)[None, :]
    x = i - j if causal else (i - j).abs()
    m = ((ramp + spans.to(q.dtype)[:, None, None] - x) / ramp).clamp(0, 1) * (x >= 0)
    m = m[None] * keep[:, None, None, :]
    e = m * torch.exp(s - s.amax(-1, keepdim=True))
    return ((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2)


def random_qkv(batch=2, heads=3, n_q=40, n_k=40, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=dtype) for n in (n_q, n_k, n_k)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("band", [True, False])
def test_equals_float64_soft_mask_reference(causal, band):
    q, k, v = random_qkv()
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1, 30:] = False  # right padding: no real query looks at it
    spans = torch.tensor([0.0, 3.5, 9.25], dtype=torch.float64)
    out = span_attention(q, k, v, keep, spans, 4, causal, 8**-0.5, band=band)
    ref = reference(q, k, v, keep, spans, 4, causal, 8**-0.5)
    torch.testing.assert_close(out[:, :30], ref[:, :30], rtol=1e-12, atol=1e-12)


def test_cached_queries_read_only_the_keys_within_the_span():
    """Three new queries against 60 cached keys: keys beyond ceil(z + R) of the last query are NaN, never read."""
    q, k, v = random_qkv(n_q=3, n_k=60)
    spans = torch.tensor([2.0, 5.5, 7.0], dtype=torch.float64)  # largest: 7 + R=4 -> distances 0..10 count
    keep = torch.ones(2, 60, dtype=torch.bool)
    ref = reference(q, k, v, keep, spans, 4, True, 8**-0.5)
    first_needed = 60 - 3 - 10
    k[:, :, :first_needed], v[:, :, :first_needed] = float("nan"), float("nan")
    out = span_attention(q, k, v, keep, spans, 4, True, 8**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    k[:, :, first_needed] = float("nan")  # the farthest key in use does change the result
    assert span_attention(q, k, v, keep, spans, 4, True, 8**-0.5).isnan().any()


def test_skipping_keys_equals_the_dense_computation_with_gradients_and_packing():
    q, k, v = (t.requires_grad_() for t in random_qkv(n_q=120, n_k=120, dtype=torch.float32))
    spans = torch.tensor([1.0, 6.0, 20.0], requires_grad=True)
    keep = torch.ones(2, 120, dtype=torch.bool)
    keep[0, 100:] = False
    segments = torch.zeros(2, 120, dtype=torch.long)
    segments[1, 50:] = 1  # row 1 packs two sequences
    grads = []
    for band in (True, False):
        out = span_attention(q, k, v, keep, spans, 4, True, 8**-0.5, segments=segments, band=band)
        (out[0, :100].square().sum() + out[1].square().sum()).backward()
        real = out.detach().clone()
        real[0, 100:] = 0  # padded queries carry no defined value
        grads.append([real] + [t.grad.clone() for t in (q, k, v, spans)])
        for t in (q, k, v, spans):
            t.grad = None
    for banded, dense in zip(*grads):  # fp32, a softmax over <= 120 keys: a few ulp of the row's scale
        torch.testing.assert_close(banded, dense, rtol=1e-5, atol=1e-5)
    assert grads[0][4].abs().min() > 0  # every head's span gets a gradient from its ramp


def test_span_gradient_matches_finite_differences():
    q, k, v = random_qkv(batch=1, n_q=30, n_k=30)
    spans = torch.tensor([2.3, 5.6, 11.4], dtype=torch.float64, requires_grad=True)
    keep = torch.ones(1, 30, dtype=torch.bool)
    weight = torch.randn(1, 30, 3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(z):
        return (span_attention(q, k, v, keep, z, 4, True, 8**-0.5) * weight).sum()

    loss(spans).backward()
    eps = 1e-6
    for h in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[h] = eps
        numeric = (loss(spans.detach() + step) - loss(spans.detach() - step)) / (2 * eps)
        torch.testing.assert_close(spans.grad[h], numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("decoder", [True, False])
def test_span_covering_the_sequence_equals_plain_attention(make_config, decoder):
    config = span_config(make_config, adaptive_span_max=32, adaptive_span_init=1.0)  # z = 32 >= any distance
    cls = hfx.HfxForCausalLM if decoder else hfx.HfxForMaskedLM
    torch.manual_seed(0)
    model = cls(config).eval()
    plain = cls(span_config(make_config, attention_type="sdpa")).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("adaptive_span" in name for name in unexpected)
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1, :18], b[1, :18], rtol=1e-5, atol=1e-5)


def test_l1_penalty_in_the_loss_and_gradient_to_the_spans(make_config):
    config = span_config(make_config, adaptive_span_loss_coef=0.01)
    torch.manual_seed(0)
    model = hfx.HfxForCausalLM(config)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    # init 0.25 of S=16: every head spans 4 tokens; penalty = coef * mean span per layer, summed over 2 layers
    torch.testing.assert_close(head_spans(model), torch.full((2, 4), 4.0))
    torch.testing.assert_close(out.aux_stats["attention_span"], torch.full((2, 4), 4.0))
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.01 * 4 * 2))
    lm_loss = model.loss_function(logits=out.logits, labels=ids, vocab_size=97)
    torch.testing.assert_close(out.loss, lm_loss + out.aux_loss)
    out.aux_loss.backward(retain_graph=True)
    for layer in model.model.layers:  # d(coef * mean_h S p_h)/dp_h = coef * S / heads
        torch.testing.assert_close(layer.attention.adaptive_span.span_ratio.grad, torch.full((4,), 0.01 * 16 / 4))
    model.zero_grad()
    lm_loss.backward()
    assert all(layer.attention.adaptive_span.span_ratio.grad.abs().min() > 0 for layer in model.model.layers)
    model.set_attn_implementation("sdpa")  # spans no longer in use: no penalty
    assert model(ids, labels=ids).aux_loss is None


def test_training_forward_projects_spans_onto_their_range(make_config):
    model = hfx.HfxForCausalLM(span_config(make_config))
    ratio = model.model.layers[0].attention.adaptive_span.span_ratio
    with torch.no_grad():
        ratio.copy_(torch.tensor([-0.5, 0.5, 1.5, 1.0]))
    torch.testing.assert_close(head_spans(model)[0], torch.tensor([0.0, 8.0, 16.0, 16.0]))
    model.train()(torch.randint(1, 97, (1, 8)))
    torch.testing.assert_close(ratio.detach(), torch.tensor([0.0, 0.5, 1.0, 1.0]))


def test_generate_with_cache_equals_without(make_config):
    torch.manual_seed(0)
    model = hfx.HfxForCausalLM(span_config(make_config, adaptive_span_init=0.0)).eval()  # reach: R=4 keys
    with torch.no_grad():
        model.model.layers[1].attention.adaptive_span.span_ratio.copy_(torch.tensor([0.0, 0.1, 0.3, 0.5]))
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as generate() batches prompts
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    torch.testing.assert_close(with_cache, model.generate(ids, use_cache=False, **kwargs), rtol=0, atol=0)
    assert with_cache.shape == (2, 28)


def test_save_load_round_trip_keeps_spans(make_config, tmp_path):
    model = hfx.HfxForCausalLM(span_config(make_config, adaptive_span_ramp=3))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.attention.adaptive_span.span_ratio.copy_(torch.tensor([0.1, 0.2, 0.7, 0.9]) / (i + 1))
    model.save_pretrained(tmp_path)
    loaded = hfx.HfxForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(head_spans(loaded), head_spans(model), rtol=0, atol=0)
    assert (loaded.config.adaptive_span_max, loaded.config.adaptive_span_ramp) == (16, 3)
    assert loaded.config._attn_implementation == NAME
    ids = torch.randint(1, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_loading_a_plain_checkpoint_with_this_backend_starts_spans_at_init(make_config, tmp_path):
    hfx.HfxForCausalLM(make_config(position_embedding_type="rotary")).save_pretrained(tmp_path)
    model = hfx.HfxForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert isinstance(model.model.layers[0].attention.adaptive_span, AdaptiveSpan)
    torch.testing.assert_close(head_spans(model), torch.zeros(2, 4))  # adaptive_span_init = 0 by default
    assert model.config.adaptive_span_max == 512


@pytest.mark.parametrize(
    "field, value",
    [("adaptive_span_max", 0), ("adaptive_span_max", 8.0), ("adaptive_span_ramp", 0), ("adaptive_span_ramp", True),
     ("adaptive_span_init", 1.5), ("adaptive_span_init", -0.1), ("adaptive_span_loss_coef", -1.0),
     ("adaptive_span_loss_coef", math.inf)],
)
def test_bad_config_values_are_refused_at_construction(make_config, field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid; valid values: "):
        span_config(make_config, **{field: value})


def test_a_stock_model_has_no_spans_and_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(NAME)
    with pytest.raises(ValueError, match=r"hfx_adaptive_span learns a span per head.*LlamaAttention has none"):
        model(torch.randint(0, 50, (1, 6)))
    with pytest.raises(ValueError, match="has no adaptive spans"):
        head_spans(model)
