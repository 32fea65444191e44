"""HfxConfig: one transformer family whose blocks are chosen by name, not by code edits.

Field names follow BERT/Llama so existing habits carry over. The four component fields
(``norm_type``, ``position_embedding_type``, ``ffn_type``, ``attention_type``) name entries of
the plugin registry; every value is checked here, at construction, so a typo fails before any
weights are allocated.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .attention import valid_attention_types
from .registry import registry, unknown_name_message

NORM_POSITIONS = ("pre", "post")


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
    keys_to_ignore_at_inference = ["past_key_values"]

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

    def __post_init__(self, **kwargs):
        self._check_shapes()
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position={self.norm_position!r} is invalid; valid values: {list(NORM_POSITIONS)}.")
        for kind, field_name in (("norm", "norm_type"), ("position", "position_embedding_type"), ("ffn", "ffn_type")):
            self._apply_component(registry.get(kind, getattr(self, field_name)), kwargs)
        attention_types = valid_attention_types()
        if self.attention_type not in attention_types:
            raise ValueError(unknown_name_message("attention", self.attention_type, attention_types))
        if self.attention_type in registry.names("attention"):
            self._apply_component(registry.get("attention", self.attention_type), kwargs)
        # The backend travels with config.json; an explicit `attn_implementation=` still wins.
        kwargs.setdefault("attn_implementation", self.attention_type)
        super().__post_init__(**kwargs)

    def _check_shapes(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            divisors = [h for h in range(1, self.hidden_size + 1) if self.hidden_size % h == 0 and h <= 64]
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                f"valid head counts for this hidden_size include {divisors}."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

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
