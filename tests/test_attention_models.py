"""The long-context backends inside stock transformers models and hfx models."""

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    LongformerConfig,
    LongformerModel,
    RobertaConfig,
    RobertaModel,
)

import hfx
from hfx_attention import attach_global_token_ids

WINDOW = 6
N = 23


def band_mask(keep, causal, flags=None):
    """Additive dense (B, 1, n, n) mask of the sliding-window pattern, for the eager reference."""
    n = keep.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = ((i - j).abs() <= WINDOW // 2)[None]
    if flags is not None:
        allowed = allowed | flags[:, :, None] | flags[:, None, :]
    if causal:
        allowed = allowed & (j <= i)
    allowed = (allowed & keep[:, None, :])[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


STOCK = {
    "bert": (BertModel, BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), False),
    "roberta": (RobertaModel, RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1), False),
    "gpt2": (GPT2Model, GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4), True),
    "llama": (LlamaModel, LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64), True),
}


@pytest.mark.parametrize("name", list(STOCK))
def test_stock_model_from_pretrained_matches_dense_band_reference(name, tmp_path):
    model_class, config, causal = STOCK[name]
    config.attention_window = WINDOW
    model_class(config).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="hfx_sliding_window").eval()
    reference = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    input_ids = torch.randint(3, 50, (2, N))
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, -4:] = False
    flags = torch.zeros(2, N, dtype=torch.long)
    flags[:, 0] = 1
    with torch.no_grad():
        got = model(input_ids, attention_mask=keep.long(), global_attention_mask=flags).last_hidden_state
        plain = model(input_ids, attention_mask=keep.long()).last_hidden_state
        want = reference(input_ids, attention_mask=band_mask(keep, causal, flags.bool())).last_hidden_state
    real = keep[:, :, None]
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)
    assert (got - plain)[real.expand_as(got)].abs().max() > 1e-4  # the global token changed something


def test_sliding_window_equals_longformer_model():
    config = LongformerConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        attention_window=[8, 4], max_position_embeddings=80, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    longformer = LongformerModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for layer in longformer.encoder.layer:
            attention = layer.attention.self
            for proj in ("query", "key", "value"):
                getattr(attention, f"{proj}_global").load_state_dict(getattr(attention, proj).state_dict())
    roberta_config = RobertaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")})
    roberta = RobertaModel._from_config(roberta_config, attn_implementation="hfx_sliding_window", add_pooling_layer=False).eval()
    missing, unexpected = roberta.load_state_dict(longformer.state_dict(), strict=False)
    assert not missing and all("_global" in key for key in unexpected)

    input_ids = torch.randint(3, 60, (2, 29))
    keep = torch.ones(2, 29, dtype=torch.long)
    keep[1, -5:] = 0
    input_ids[1, -5:] = config.pad_token_id
    flags = torch.zeros(2, 29, dtype=torch.long)
    flags[:, 0] = 1
    flags[0, 17] = 1
    with torch.no_grad():
        want = longformer(input_ids, attention_mask=keep, global_attention_mask=flags).last_hidden_state
        got = roberta(input_ids, attention_mask=keep, global_attention_mask=flags).last_hidden_state
    real = keep.bool()[:, :, None]
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)


def test_global_token_ids_from_config_on_a_stock_model(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config.attention_window, config.global_attention_token_ids = WINDOW, [2]
    BertModel(config).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="hfx_sliding_window").eval()
    input_ids = torch.randint(3, 50, (1, N))
    input_ids[0, 0] = 2
    with pytest.raises(ValueError, match="attach_global_token_ids"):
        model(input_ids)
    attach_global_token_ids(model)
    flags = torch.zeros(1, N, dtype=torch.long)
    flags[0, 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).last_hidden_state, model(input_ids, global_attention_mask=flags).last_hidden_state)


def test_global_token_ids_from_config_on_an_hfx_model(make_config):
    config = make_config(attention_type="hfx_sliding_window", attention_window=WINDOW, global_attention_token_ids=[2])
    model = hfx.HfxModel(config).eval()
    input_ids = torch.randint(3, 97, (1, N))
    input_ids[0, 0] = 2
    flags = torch.zeros(1, N, dtype=torch.long)
    flags[0, 0] = 1
    plain = hfx.HfxModel(make_config(attention_type="hfx_sliding_window", attention_window=WINDOW)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        by_config = model(input_ids).last_hidden_state
        torch.testing.assert_close(by_config, plain(input_ids, global_attention_mask=flags).last_hidden_state)
        assert not torch.allclose(by_config, plain(input_ids).last_hidden_state, atol=1e-4)


@pytest.mark.parametrize("backend", ["hfx_sliding_window", "hfx_block_sparse", "hfx_lsh"])
def test_hfx_config_selects_backend_and_validates(backend, make_config):
    model = hfx.HfxModel(make_config(attention_type=backend)).eval()
    with torch.no_grad():
        out = model(torch.randint(1, 97, (2, 40)), attention_mask=torch.ones(2, 40, dtype=torch.long)).last_hidden_state
    assert out.shape == (2, 40, 32) and torch.isfinite(out).all()
    assert model.config.to_dict()["attention_type"] == backend


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attention_type": "hfx_sliding_window", "attention_window": 5}, "attention_window must be an even integer >= 2.*got 5"),
        ({"attention_type": "hfx_sliding_window", "attention_window": [4]}, "1 per-layer values; num_hidden_layers=2 needs 2"),
        ({"attention_type": "hfx_block_sparse", "block_size": 0}, "block_size must be an integer >= 1, got 0"),
        ({"attention_type": "hfx_block_sparse", "block_size": 65}, "block_size=65 exceeds max_position_embeddings=64"),
        ({"attention_type": "hfx_lsh", "num_buckets": 12}, "num_buckets must be a power of two"),
        ({"attention_type": "hfx_longformer"}, r"Unknown attention 'hfx_longformer'.*hfx_sliding_window"),
    ],
)
def test_bad_config_fails_at_construction(overrides, message, make_config):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_causal_decoding_with_bounded_cache_equals_full_forward(make_config):
    config = make_config(attention_type="hfx_sliding_window", attention_window=8, position_embedding_type="rotary", norm_position="pre")
    model = hfx.HfxForCausalLM(config).eval()
    input_ids = torch.randint(1, 97, (2, 30))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :11], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(11, 30):
            out = model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
            assert all(layer.keys.shape[-2] <= 8 // 2 for layer in cache.layers)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
