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
        (dict(norm_position="middle"), r"norm_position='middle' is invalid; valid values: \['pre', 'post'\]"),
        (dict(norm_type="groupnorm"), r"^norm_type='groupnorm' is invalid: Unknown norm 'groupnorm'.*'batchnorm', 'batchnorm_causal', 'dyt', 'layernorm', 'powernorm', 'rmsnorm'"),
        (dict(norm_type=None), r"^norm_type=None is invalid: .*'batchnorm', 'batchnorm_causal', 'dyt', 'layernorm', 'powernorm', 'rmsnorm'"),
        (dict(position_embedding_type="alibi"), r"^position_embedding_type='alibi' is invalid: .*'learned', 'rotary', 'sinusoidal'"),
        (dict(ffn_type="mixture"), r"^ffn_type='mixture' is invalid: Unknown ffn 'mixture'.*'dense', 'moe'"),
        (dict(attention_type="flashy"), r"^attention_type='flashy' is invalid: Unknown attention 'flashy'.*'eager'.*'hfx_sliding_window'.*'sdpa'"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3 must divide num_attention_heads=4; valid values: \[1, 2, 4\]"),
        (dict(num_key_value_heads=0), r"num_key_value_heads=0 is invalid; valid values: None or an integer > 0"),
        (dict(hidden_dropout_prob=1.5), r"hidden_dropout_prob=1.5 is invalid; valid values: a number in \[0, 1\)"),
        (dict(attention_probs_dropout_prob=-0.1), r"attention_probs_dropout_prob=-0.1 is invalid; valid values: a number in \[0, 1\)"),
        (dict(hidden_dropout_prob=float("nan")), r"hidden_dropout_prob=nan is invalid"),
        (dict(classifier_dropout=1.0), r"classifier_dropout=1.0 is invalid; valid values: None or a number in \[0, 1\)"),
        (dict(vocab_size=0), r"vocab_size=0 is invalid; valid values: an integer > 0"),
        (dict(hidden_size="64"), r"hidden_size='64' is invalid; valid values: an integer > 0"),
        (dict(hidden_size=32.0), r"hidden_size=32.0 is invalid; valid values: an integer > 0"),
        (dict(num_hidden_layers=True), r"num_hidden_layers=True is invalid; valid values: an integer > 0"),
        (dict(intermediate_size=-1), r"intermediate_size=-1 is invalid"),
        (dict(max_position_embeddings=0), r"max_position_embeddings=0 is invalid; valid values: an integer > 0"),
        (dict(type_vocab_size=-1), r"type_vocab_size=-1 is invalid; valid values: an integer >= 0"),
        (dict(layer_norm_eps=0.0), r"layer_norm_eps=0.0 is invalid; valid values: a finite number > 0"),
        (dict(initializer_range=-0.02), r"initializer_range=-0.02 is invalid; valid values: a finite number > 0"),
        (dict(rope_theta=float("inf")), r"rope_theta=inf is invalid; valid values: a finite number > 0"),
        (dict(use_cache="yes"), r"use_cache='yes' is invalid; valid values: True or False"),
        (dict(pad_token_id=97), r"pad_token_id=97 is invalid; valid values: None or an integer in \[0, vocab_size=97\)"),
        (dict(bos_token_id=-1), r"bos_token_id=-1 is invalid"),
        (dict(eos_token_id=[1, 200]), r"eos_token_id=\[1, 200\] is invalid; valid values: None, an integer or a list of integers"),
        (dict(hidden_act="swishy"), r"hidden_act='swishy' is unknown.*'gelu'"),
        (dict(hidden_act=None), r"hidden_act=None is invalid"),
        (dict(hidden_size=36, num_attention_heads=4, position_embedding_type="rotary"), r"even head dimension, got 9"),
        (dict(norm_type="batchnorm", batchnorm_momentum=0.0), r"batchnorm_momentum must be in \(0, 1\], got 0.0"),
    ],
)
def test_invalid_values_raise_at_construction_naming_valid_choices(overrides, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        tiny_config(**overrides)
    assert "\n" not in str(info.value)  # one line, fit for a CLI error


def test_valid_edge_values_are_accepted():
    config = tiny_config(hidden_dropout_prob=0, attention_probs_dropout_prob=0.0, classifier_dropout=0.5, type_vocab_size=0,
                         pad_token_id=None, bos_token_id=0, eos_token_id=[95, 96], num_key_value_heads=2,
                         attention_type="eager", rope_theta=500000)
    assert config.eos_token_id == [95, 96] and config.num_key_value_heads == 2 and config.type_vocab_size == 0


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


def test_config_json_written_by_an_earlier_version_still_loads(tmp_path):
    """What `save_pretrained` wrote before validation grew: extra transformers keys, `torch_dtype`, no `attention_type`."""
    saved = {
        "architectures": ["HfxForCausalLM"], "model_type": "hfx", "transformers_version": "5.0.0", "torch_dtype": "float32",
        "vocab_size": 150, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None, "max_position_embeddings": 128, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "attention_bias": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "is_decoder": True, "use_cache": True, "tie_word_embeddings": True, "norm_type": "batchnorm", "norm_position": "pre",
        "position_embedding_type": "rotary", "rope_theta": 10000.0, "ffn_type": "dense",
        "batchnorm_momentum": 0.1, "batchnorm_eps": 1e-05,
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is hfx.HfxConfig
    assert (config.norm_type, config.position_embedding_type, config.attention_type) == ("batchnorm", "rotary", "sdpa")
    assert (config.vocab_size, config.eos_token_id, config.batchnorm_momentum) == (150, 2, 0.1)
    with pytest.raises(ValueError, match=r"^hidden_dropout_prob=2.0 is invalid"):
        AutoConfig.from_pretrained(tmp_path, hidden_dropout_prob=2.0)  # overrides are checked like the file
    config.save_pretrained(tmp_path / "again")
    again = AutoConfig.from_pretrained(tmp_path / "again").to_dict()
    assert {k: v for k, v in again.items() if k != "_name_or_path"} == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_later_assignments_are_checked_too():
    config = tiny_config()
    with pytest.raises(ValueError, match=r"^attention_probs_dropout_prob=1 is invalid; valid values: a number in \[0, 1\)"):
        config.attention_probs_dropout_prob = 1
    config.hidden_dropout_prob = 0.25
    config.use_cache = False  # transformers / PEFT assign these themselves
    assert (config.hidden_dropout_prob, config.use_cache) == (0.25, False)


def test_builtin_attention_types_do_not_consult_transformers(monkeypatch):
    """eager / sdpa / installed hfx plugins validate from the registry's metadata alone."""
    import hfx.attention

    def refuse():
        raise AssertionError("valid_attention_types() consulted")

    monkeypatch.setattr(hfx.attention, "valid_attention_types", refuse)
    for name in ("eager", "sdpa", "hfx_sliding_window"):
        assert tiny_config(attention_type=name).attention_type == name
    with pytest.raises(AssertionError, match="consulted"):
        tiny_config(attention_type="flex_attention")
