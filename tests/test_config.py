"""HfxConfig: defaults, Auto registration, validation at construction, round trip through config.json."""

import json

import pytest
from transformers import AutoConfig

import hfx
from tests.conftest import tiny_config


def test_defaults_and_auto_registration():
    config = AutoConfig.for_model("hfx")
    assert type(config) is hfx.HfxConfig and config.model_type == "hfx"
    expected = dict(norm_type="layernorm", norm_position="post", position_embedding_type="learned", ffn_type="dense",
                    attention_type="sdpa", hidden_size=768, num_attention_heads=12, num_key_value_heads=12)
    assert {k: getattr(config, k) for k in expected} == expected
    assert config._attn_implementation == "sdpa" and config.head_dim == 64


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(hidden_size=30, num_attention_heads=4), r"not divisible by num_attention_heads=4.*\[1, 2, 3, 5, 6, 10, 15, 30\]"),
        (dict(norm_position="middle"), r"norm_position='middle'.*\['pre', 'post'\]"),
        (dict(norm_type="groupnorm"), r"Unknown norm 'groupnorm'.*'batchnorm', 'layernorm', 'rmsnorm'"),
        (dict(position_embedding_type="alibi"), r"Unknown position 'alibi'.*'learned', 'rotary', 'sinusoidal'"),
        (dict(ffn_type="moe"), r"Unknown ffn 'moe'.*'dense'"),
        (dict(attention_type="flashy"), r"Unknown attention 'flashy'.*'eager'.*'sdpa'"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3 must divide num_attention_heads=4"),
        (dict(hidden_dropout_prob=1.5), r"hidden_dropout_prob must be in \[0, 1\)"),
        (dict(vocab_size=0), r"vocab_size must be a positive integer"),
        (dict(hidden_act="swishy"), r"hidden_act='swishy' is unknown.*'gelu'"),
        (dict(hidden_size=36, num_attention_heads=4, position_embedding_type="rotary"), r"even head dimension, got 9"),
    ],
)
def test_invalid_values_raise_at_construction_naming_valid_choices(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_invalid_config_json_fails_at_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["norm_type"] = "layernorn"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Did you mean \\['layernorm'\\]"):
        AutoConfig.from_pretrained(tmp_path)


def test_component_fields_are_filled_saved_and_reloaded(tmp_path):
    plain = tiny_config()
    assert not hasattr(plain, "batchnorm_momentum")  # a component's fields appear only when it is selected
    config = tiny_config(norm_type="batchnorm", batchnorm_momentum=0.05, position_embedding_type="rotary", rope_theta=500.0)
    assert config.batchnorm_momentum == 0.05 and config.batchnorm_eps == 1e-5
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["batchnorm_momentum"] == 0.05 and saved["rope_theta"] == 500.0 and saved["attention_type"] == "sdpa"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is hfx.HfxConfig
    for key in ("norm_type", "batchnorm_momentum", "batchnorm_eps", "position_embedding_type", "rope_theta", "norm_position"):
        assert getattr(loaded, key) == getattr(config, key), key


def test_attention_type_becomes_attn_implementation():
    config = tiny_config(attention_type="eager")
    assert config._attn_implementation == "eager"
    assert tiny_config(attention_type="eager", attn_implementation="sdpa")._attn_implementation == "sdpa"
