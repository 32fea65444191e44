"""HfxConfig: one transformer family whose blocks are chosen by name, not by code edits.

Field names follow BERT/Llama so existing habits carry over. The four component fields
(``norm_type``, ``position_embedding_type``, ``ffn_type``, ``attention_type``) name entries of
the plugin registry; every value is checked here, at construction, so a typo fails before any
weights are allocated.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .registry import check_component_name, registry, unknown_name_message

NORM_POSITIONS = ("pre", "post")
BUILTIN_ATTENTION = ("eager", "sdpa")  # always valid; other names are looked up in transformers' AttentionInterface


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(v) -> bool:
    return _is_int(v) and v > 0


def _probability(v) -> bool:
    return _is_number(v) and 0.0 <= v < 1.0


def _positive_number(v) -> bool:
    return _is_number(v) and v > 0


# field -> (accepts, what is valid). Checked at construction and on every later assignment
# (``from_pretrained(path, hidden_dropout_prob=...)`` assigns its overrides after construction).
FIELD_RULES = {
    **{name: (_positive_int, "an integer > 0") for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")},
    "num_key_value_heads": (lambda v: v is None or _positive_int(v), "None or an integer > 0"),
    "type_vocab_size": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no segment embeddings)"),
    "hidden_dropout_prob": (_probability, "a number in [0, 1)"),
    "attention_probs_dropout_prob": (_probability, "a number in [0, 1)"),
    "classifier_dropout": (lambda v: v is None or _probability(v), "None or a number in [0, 1)"),
    **{name: (_positive_number, "a finite number > 0") for name in ("initializer_range", "layer_norm_eps", "rope_theta")},
    "norm_position": (lambda v: v in NORM_POSITIONS, str(list(NORM_POSITIONS))),
    "hidden_act": (lambda v: isinstance(v, str), "a name of transformers' ACT2FN"),
    "decoder_layers": (lambda v: v is None or _positive_int(v), "None (as many as num_hidden_layers) or an integer > 0"),
    "memory_length": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no segment memory)"),
}
# Checked at construction only: transformers and PEFT assign these (e.g. ``use_cache``) on their own.
BOOL_FIELDS = (
    "attention_bias", "is_decoder", "use_cache", "tie_word_embeddings", "is_encoder_decoder",
    "tie_encoder_decoder_embeddings",
)
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def _check_field(name: str, value) -> None:
    accepts, valid = FIELD_RULES[name]
    if not accepts(value):
        raise ValueError(f"{name}={value!r} is invalid; valid values: {valid}.")


@strict
class HfxConfig(PreTrainedConfig):
    r"""Configuration of an hfx model.

    Every field is documented in ``docs/models.md``. Components selected by name may read
    further fields of their own (e.g. ``attention_window`` for ``hfx_sliding_window``); those are
    filled with the component's defaults when absent and saved in ``config.json``.

    ```python
    >>> import hfx
    >>> from transformers import AutoConfig, AutoModelForMaskedLM
    >>> config = AutoConfig.for_model("hfx", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                               intermediate_size=128, norm_type="batchnorm", norm_position="pre")
    >>> model = AutoModelForMaskedLM.from_config(config)
    ```
    """

    model_type = "hfx"
    keys_to_ignore_at_inference = ["past_key_values", "aux_loss", "aux_stats", "router_logits"]

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    classifier_dropout: float | int | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attention_bias: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    is_decoder: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    norm_type: str = "layernorm"
    norm_position: str = "post"
    position_embedding_type: str = "learned"
    rope_theta: float | int = 10000.0
    ffn_type: str = "dense"
    attention_type: str = "sdpa"
    # Transformer-XL segment memory: hidden states of up to this many previous positions, kept per layer.
    memory_length: int = 0
    # Encoder-decoder (HfxForConditionalGeneration); ignored by the other heads.
    is_encoder_decoder: bool = False
    decoder_layers: int | None = None
    decoder_start_token_id: int | None = None
    tie_encoder_decoder_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self._check_values()
        self._check_shapes()
        for kind, field_name in (("norm", "norm_type"), ("position", "position_embedding_type"), ("ffn", "ffn_type")):
            self._apply_component(self._component(kind, field_name), kwargs)
        if self.attention_type in registry.names("attention"):
            self._apply_component(self._component("attention", "attention_type"), kwargs)
        else:
            self._check_attention_type()
        if self.memory_length:  # imported only then: the check lives with the memory it protects
            from .segment_memory import validate_memory_config

            validate_memory_config(self)
        # The backend travels with config.json; an explicit `attn_implementation=` still wins.
        kwargs.setdefault("attn_implementation", self.attention_type)
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        if name in FIELD_RULES:
            _check_field(name, value)
        super().__setattr__(name, value)

    def _check_values(self) -> None:
        """Types and ranges of the plain fields, before anything is derived from them."""
        for name in FIELD_RULES:
            _check_field(name, getattr(self, name))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid values: True or False.")
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            for token_id in ids:
                if token_id is not None and not (_is_int(token_id) and 0 <= token_id < self.vocab_size):
                    allowed = "None, an integer or a list of integers" if name == "eos_token_id" else "None or an integer"
                    raise ValueError(
                        f"{name}={value!r} is invalid; valid values: {allowed} in [0, vocab_size={self.vocab_size})."
                    )
        if self.is_encoder_decoder and self.is_decoder:
            raise ValueError(
                "is_decoder=True is invalid with is_encoder_decoder=True; valid values: is_decoder=False (the encoder "
                "stack attends both ways, the decoder stack is always causal)."
            )

    def _check_shapes(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            divisors = [h for h in range(1, self.hidden_size + 1) if self.hidden_size % h == 0 and h <= 64]
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                f"valid head counts for this hidden_size include {divisors}."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.is_encoder_decoder and self.decoder_layers is None:
            # transformers reads a flat encoder-decoder config's decoder_layers as the decoder's num_hidden_layers
            self.decoder_layers = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads:
            divisors = [h for h in range(1, self.num_attention_heads + 1) if self.num_attention_heads % h == 0]
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}; valid values: {divisors}."
            )

    def _component(self, kind: str, field_name: str):
        """The registry's component named by ``field_name``; an unknown name fails naming the field."""
        value = getattr(self, field_name)
        check_component_name(kind, field_name, value)
        return registry.get(kind, value)  # imports that one plugin (PluginLoadError names a broken one)

    def _check_attention_type(self) -> None:
        if self.attention_type in BUILTIN_ATTENTION:
            return
        from .attention import valid_attention_types  # transformers' AttentionInterface: only for other names

        valid = valid_attention_types()
        if not isinstance(self.attention_type, str) or self.attention_type not in valid:
            message = unknown_name_message("attention", self.attention_type, valid)
            raise ValueError(f"attention_type={self.attention_type!r} is invalid: {message}")

    def _apply_component(self, component, kwargs: dict) -> None:
        """Fill the component's own config fields (unless given) and let it validate the result."""
        for key, default in component.config_defaults.items():
            if key in kwargs:
                setattr(self, key, kwargs.pop(key))
            elif not hasattr(self, key):
                setattr(self, key, default)
        if component.validate_config is not None:
            component.validate_config(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["HfxConfig", "NORM_POSITIONS"]
