"""generate() on backends that cannot decode from a KV cache, and attention_route checks of hfx_lsh.

hfx_lsh and hfx_block_sparse need the whole sequence at every call (``Component.supports_kv_cache=False``):
an hfx causal LM using one generates with ``use_cache=False`` by default (a full forward per new token),
keeps that default through save/load, and an explicit ``use_cache=True`` still gets the backend's error.
"""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hfx
from hfx.modeling_hfx import backend_supports_kv_cache
from hfx.registry import Component, registry

WHOLE_SEQUENCE = {
    "hfx_lsh": {"lsh_attn_chunk_length": 4, "num_hashes": 2},
    "hfx_block_sparse": {"block_size": 4, "num_random_blocks": 1},
}
NEW_TOKENS = 8


def causal_lm(make_config, backend, **overrides):
    torch.manual_seed(0)
    config = make_config(attention_type=backend, **WHOLE_SEQUENCE.get(backend, {}), **overrides)
    return hfx.HfxForCausalLM(config).eval()


def prompt():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 6), generator=generator)
    return ids, torch.ones_like(ids)


def greedy_by_full_forwards(model, ids):
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.mark.parametrize("backend", sorted(WHOLE_SEQUENCE))
def test_generate_defaults_to_full_forwards_and_equals_a_manual_greedy_loop(backend, make_config):
    model = causal_lm(make_config, backend)
    assert not backend_supports_kv_cache(backend)
    assert model.generation_config.use_cache is False
    ids, mask = prompt()
    out = greedy(model, ids, mask)
    assert out.shape == (2, 6 + NEW_TOKENS)
    torch.testing.assert_close(out, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)
    torch.testing.assert_close(out, greedy_by_full_forwards(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("backend", sorted(WHOLE_SEQUENCE))
def test_explicit_use_cache_true_gets_the_clear_error(backend, make_config):
    model = causal_lm(make_config, backend)
    ids, mask = prompt()
    with pytest.raises(ValueError, match=rf"{backend} needs as many keys as queries.*pass use_cache=False"):
        greedy(model, ids, mask, use_cache=True)


@pytest.mark.parametrize("backend", sorted(WHOLE_SEQUENCE))
def test_default_survives_save_and_reload(backend, make_config, tmp_path):
    model = causal_lm(make_config, backend)
    ids, mask = prompt()
    expected = greedy(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["use_cache"] is False
    reloaded = hfx.HfxForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_type == backend
    assert reloaded.generation_config.use_cache is False
    torch.testing.assert_close(greedy(reloaded, ids, mask), expected, rtol=0, atol=0)


def test_checkpoint_saved_with_a_cache_backend_reloaded_on_lsh_and_switched_back(make_config, tmp_path):
    model = causal_lm(make_config, "sdpa")
    assert model.generation_config.use_cache is True
    model.save_pretrained(tmp_path)  # generation_config.json says use_cache: true
    reloaded = hfx.HfxForCausalLM.from_pretrained(tmp_path, attn_implementation="hfx_lsh").eval()
    assert reloaded.generation_config.use_cache is False
    ids, mask = prompt()
    torch.testing.assert_close(greedy(reloaded, ids, mask), greedy_by_full_forwards(reloaded, ids), rtol=0, atol=0)
    reloaded.set_attn_implementation("sdpa")
    assert reloaded.generation_config.use_cache is True
    reloaded.set_attn_implementation("hfx_block_sparse")
    assert reloaded.generation_config.use_cache is False


@pytest.mark.parametrize("backend", ["sdpa", "eager", "hfx_sliding_window"])
def test_backends_that_decode_from_a_cache_keep_use_cache(backend, make_config):
    model = causal_lm(make_config, backend)
    assert backend_supports_kv_cache(backend)
    assert model.generation_config.use_cache is True


def test_third_party_attention_plugin_defaults_to_kv_cache_support():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    component = Component(kind="attention", name="x3_thirdparty_attn", factory=sdpa_attention_forward, mask_factory=sdpa_mask)
    assert component.supports_kv_cache is True
    registry.register(component)
    AttentionInterface.register("x3_thirdparty_attn", sdpa_attention_forward)
    AttentionMaskInterface.register("x3_thirdparty_attn", sdpa_mask)
    try:
        assert backend_supports_kv_cache("x3_thirdparty_attn")
    finally:
        registry.unregister("attention", "x3_thirdparty_attn")


def tiny_gpt2(**overrides):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, **overrides)
    return GPT2LMHeadModel(config).eval()


def test_stock_model_error_names_use_cache_false():
    model = tiny_gpt2(attn_implementation="hfx_lsh", lsh_attn_chunk_length=4)
    ids, mask = prompt()
    with pytest.raises(ValueError, match=r"hfx_lsh needs as many keys as queries.*For generate\(\), pass use_cache=False"):
        greedy(model, ids, mask)
    assert greedy(model, ids, mask, use_cache=False).shape == (2, 6 + NEW_TOKENS)


@pytest.mark.parametrize("route", ["auto", "tiled"])
def test_lsh_accepts_auto_and_tiled_routes(route, make_config):
    config = make_config(attention_type="hfx_lsh", attention_route=route)
    assert config.attention_route == route


@pytest.mark.parametrize(
    "route,message",
    [
        ("gpu", r"hfx_lsh: attention_route must be one of 'auto', 'tiled'; got 'gpu'\."),
        ("flex", r"hfx_lsh has no Flex route: attention_route must be one of 'auto', 'tiled'; got 'flex'"),
        (None, r"hfx_lsh: attention_route must be one of 'auto', 'tiled'; got None\."),
    ],
)
def test_lsh_refuses_other_routes(route, message, make_config):
    with pytest.raises(ValueError, match=message):
        make_config(attention_type="hfx_lsh", attention_route=route)
    model = tiny_gpt2(attn_implementation="hfx_lsh", attention_route=route)  # stock config: checked at the forward
    ids, mask = prompt()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(ids, attention_mask=mask)
