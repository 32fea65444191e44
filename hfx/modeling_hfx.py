"""The hfx transformer, read top to bottom: embeddings, attention, block, base model, heads.

Norm, position encoding and feed-forward network are built from the plugin registry by name;
attention is dispatched through transformers' ``ALL_ATTENTION_FUNCTIONS`` exactly as Llama does.
The block itself has one switch, pre- or post-norm; everything else lives in components.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GenericForQuestionAnswering, GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from . import auxiliary
from .attention import eager_attention_forward
from .configuration_hfx import HfxConfig
from .padding_masks import allowed_from_mask, real_token_mask
from .registry import registry
from .segment_memory import (
    SegmentMemory,
    causal_after,
    check_memory_attention,
    key_positions,
    memory_attention_mask,
    validate_memory_config,
)

logger = logging.get_logger(__name__)


def build_norm(config: HfxConfig) -> nn.Module:
    norm = registry.get("norm", config.norm_type).factory(config, config.hidden_size)
    norm._hfx_norm = True  # lets _init_weights reset any norm plugin's affine parameters
    return norm


def build_ffn(config: HfxConfig, layer_idx: int) -> nn.Module:
    """The feed-forward plugin of block ``layer_idx``; a factory that takes ``layer_idx`` may vary by layer
    (MoE's ``first_k_dense_replace``), one that does not is called with the config alone."""
    factory = registry.get("ffn", config.ffn_type).factory
    try:
        takes_layer = "layer_idx" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_layer = False
    return factory(config, layer_idx=layer_idx) if takes_layer else factory(config)


def backend_supports_kv_cache(attn_implementation) -> bool:
    """False for an hfx attention plugin that cannot decode from a KV cache (``Component.supports_kv_cache``);
    True for transformers' own backends and for plugins that do not say otherwise."""
    return getattr(attention_component(attn_implementation), "supports_kv_cache", True)


def attention_component(attn_implementation):
    """The hfx attention plugin behind ``attn_implementation``, or None for transformers' own backends."""
    if not isinstance(attn_implementation, str) or attn_implementation not in registry.names("attention"):
        return None
    return registry.get("attention", attn_implementation)


@dataclass
class HfxModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus what components add besides hidden states (see :mod:`hfx.auxiliary`).

    aux_loss: summed auxiliary losses of the last forward (MoE balance / z losses, span penalty), already weighted.
    aux_stats: per-module statistics stacked by name, e.g. ``expert_counts`` (MoE layers, experts).
    router_logits: one (tokens, experts) tensor per MoE layer, when ``config.output_router_logits``.
    """

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfxCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` whose ``loss`` includes ``aux_loss``; the auxiliary fields as in HfxModelOutputWithPast."""

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfxMaskedLMOutput(MaskedLMOutput):
    """``MaskedLMOutput`` whose ``loss`` includes ``aux_loss``; the auxiliary fields as in HfxModelOutputWithPast."""

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


def auxiliary_fields(outputs) -> dict:
    return {name: getattr(outputs, name, None) for name in ("aux_loss", "aux_stats", "router_logits")}


def ffn_takes_padding(ffn: nn.Module) -> bool:
    """Whether a feed-forward plugin is told which tokens are padding (one that counts tokens: MoE load statistics)."""
    return "padding_mask" in inspect.signature(ffn.forward).parameters


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x, cos, sin):
    """Rotate (B, H, T, D) by (cos, sin) broadcast over the heads: (1 or B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


def apply_rotary(query, key, rotary, key_rotary=None):
    """Rotate (B, H, T, D) queries and keys by the (cos, sin) of a rotary position component, each (1 or B, T, D);
    ``key_rotary``: the keys' own (cos, sin) when there are more keys than queries (a segment memory)."""
    cos, sin = (t.unsqueeze(1) for t in rotary)
    if key_rotary is None:
        return rotate(query, cos, sin), rotate(key, cos, sin)
    key_cos, key_sin = (t.unsqueeze(1) for t in key_rotary)
    return rotate(query, cos, sin), rotate(key, key_cos, key_sin)


def relative_attention_factory(config):
    """The per-block scoring module a position component asks for (``factory.relative_attention``, e.g.
    ``xl_relative``'s W_r, u and v), or None: such a position type is scored by that module, not by a backend."""
    factory = registry.get("position", config.position_embedding_type).factory
    return getattr(factory, "relative_attention", None)


def padding_mask_for(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Bool (B, T) with True on real tokens of the current step, from a 2-D or 4-D attention mask."""
    return real_token_mask(attention_mask, seq_len)


class HfxEmbeddings(nn.Module):
    """Token + segment (+ absolute position) embeddings; post-norm models normalise them here."""

    def __init__(self, config: HfxConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.position = registry.get("position", config.position_embedding_type).factory(config)
        self.norm = build_norm(config) if config.norm_position == "post" else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, token_type_ids, position_ids, padding_mask):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            inputs_embeds = inputs_embeds + self.token_type_embeddings(token_type_ids)
        hidden_states, rotary = self.position(inputs_embeds, position_ids)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states, padding_mask)
        return self.dropout(hidden_states), rotary


class HfxAttention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention; the score computation is a registered backend."""

    def __init__(self, config: HfxConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.is_decoder
        self.attention_dropout = config.attention_probs_dropout_prob
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        component = attention_component(config.attention_type)
        if component is not None and component.attach is not None:
            component.attach(self, config)
        relative = relative_attention_factory(config)  # encoder-decoder configs refuse it (its validate_config)
        self.relative = relative(config) if relative is not None else None

    def forward(
        self, hidden_states, attention_mask=None, rotary=None, past_key_values: Cache | None = None,
        segment_memory=None, **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        kv_input, memory_rotary = hidden_states, None
        if segment_memory is not None:
            # XL: the previous segment's block inputs, projected by this block's current k/v weights
            segment_memory.record[self.layer_idx] = hidden_states.detach()
            held = segment_memory.states[self.layer_idx]
            if held is not None and held.shape[1]:
                kv_input = torch.cat([held.to(hidden_states.dtype), hidden_states], dim=1)
                memory_rotary = segment_memory.rotary
        kv_shape = (input_shape[0], kv_input.shape[1], -1, self.head_dim)
        key = self.k_proj(kv_input).view(kv_shape).transpose(1, 2)
        value = self.v_proj(kv_input).view(kv_shape).transpose(1, 2)
        if self.relative is None and rotary is not None:
            key_rotary = None  # the memory's positions precede the segment's
            if memory_rotary is not None:
                key_rotary = tuple(torch.cat([m, c], dim=1) for m, c in zip(memory_rotary, rotary))
            query, key = apply_rotary(query, key, rotary, key_rotary)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if self.relative is not None:
            return self._relative_forward(query, key, value, attention_mask, rotary.positions, input_shape)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def _relative_forward(self, query, key, value, attention_mask, query_positions, input_shape):
        """Scores with relative position terms (xl_relative): eager, keys at positions directly before the
        segment's (memory or KV cache) and at the segment's own."""
        length, keys = query.shape[-2], key.shape[-2]
        if attention_mask is None and self.is_causal and length > 1:
            attention_mask = causal_after(length, keys, query.device)
        out, weights = self.relative(
            self, query, key, value, attention_mask, query_positions, key_positions(query_positions, keys - length),
            scaling=self.scaling, dropout=self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class HfxLayer(GradientCheckpointingLayer):
    """Attention and feed-forward sub-layers, each with a residual and a norm placed before or after it."""

    def __init__(self, config: HfxConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention_norm = build_norm(config)
        self.attention = HfxAttention(config, layer_idx)
        self.ffn_norm = build_norm(config)
        self.ffn = build_ffn(config, layer_idx)
        self._ffn_takes_padding = ffn_takes_padding(self.ffn)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, padding_mask=None, rotary=None, past_key_values=None, **kwargs):
        if self.pre_norm:
            normed = self.attention_norm(hidden_states, padding_mask)
            attended, _ = self.attention(normed, attention_mask, rotary, past_key_values, **kwargs)
            hidden_states = hidden_states + self.dropout(attended)
            return hidden_states + self.dropout(self._ffn(self.ffn_norm(hidden_states, padding_mask), padding_mask))
        attended, _ = self.attention(hidden_states, attention_mask, rotary, past_key_values, **kwargs)
        hidden_states = self.attention_norm(hidden_states + self.dropout(attended), padding_mask)
        return self.ffn_norm(hidden_states + self.dropout(self._ffn(hidden_states, padding_mask)), padding_mask)

    def _ffn(self, hidden_states, padding_mask):
        return self.ffn(hidden_states, padding_mask=padding_mask) if self._ffn_takes_padding else self.ffn(hidden_states)


class HfxPreTrainedModel(PreTrainedModel):
    config_class = HfxConfig
    config: HfxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfxLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": HfxLayer, "attentions": HfxAttention}
    # The MoE plugin's experts dispatch through transformers' ExpertsInterface; transformers looks for that
    # decorator in this file's source, and the experts live in the plugin, so hfx says it explicitly.
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: HfxConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # Keep attention_type (saved in config.json) in step with the backend actually in use.
        config.attention_type = config._attn_implementation

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # A component with parameters transformers does not know (stacked experts, learned spans) initialises them
        # itself, with transformers.initialization functions so that loaded weights are left alone.
        if hasattr(module, "hfx_init_weights"):
            module.hfx_init_weights(self.config)
        if getattr(module, "_hfx_norm", False):
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                init.ones_(module.weight)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, HfxLMPredictionHead):
            init.zeros_(module.bias)


class StackInputs(NamedTuple):
    """What a stack's blocks read besides the hidden states (see ``HfxModel._inputs``)."""

    hidden_states: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    padding_mask: torch.Tensor | None
    position_ids: torch.Tensor


class HfxModel(HfxPreTrainedModel):
    """The bare hfx transformer: hidden states out, no head."""

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.embeddings = HfxEmbeddings(config)
        self.layers = nn.ModuleList([HfxLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = build_norm(config) if config.norm_position == "pre" else None
        self.gradient_checkpointing = False
        if config.memory_length:
            validate_memory_config(config)
            if not config.is_decoder:
                raise ValueError(
                    f"memory_length={config.memory_length!r} is invalid with is_decoder=False; valid values: 0, or "
                    "is_decoder=True (segment memory is causal: HfxModel with is_decoder=True, HfxForCausalLM)."
                )
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if not self.config.is_decoder:
            use_cache = False
        if self.config.memory_length:
            return self._forward_with_memory(
                input_ids, attention_mask, token_type_ids, position_ids, past_key_values, inputs_embeds, use_cache,
                **kwargs,
            )
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        inputs = self._inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, past_key_values,
            causal=self.config.is_decoder,
        )
        hidden_states, aux_fields = self._run_layers(
            inputs,
            past_key_values=past_key_values,
            # Backends that act on token identity (always-global token ids) read them here.
            input_ids=input_ids,
            **kwargs,
        )
        return HfxModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values, **aux_fields)

    def _forward_with_memory(
        self, input_ids, attention_mask, token_type_ids, position_ids, past_key_values, inputs_embeds, use_cache,
        **kwargs,
    ):
        """One segment: queries attend to [memory ; segment]; the memory is then advanced by the segment.

        ``past_key_values`` is the :class:`~hfx.segment_memory.SegmentMemory` of the previous segment (None or an
        empty transformers cache: a new one); it is updated in place and always returned, whatever ``use_cache``
        says: it is the model's recurrent state, and transformers turns ``use_cache`` off under gradient
        checkpointing, where XL training still needs it."""
        check_memory_attention(self.config._attn_implementation, self.config.memory_length, "attn_implementation")
        memory = past_key_values
        if memory is not None and not isinstance(memory, SegmentMemory):
            if memory.get_seq_length():
                raise ValueError(
                    f"past_key_values={type(memory).__name__} is invalid with memory_length="
                    f"{self.config.memory_length}; valid values: None or an hfx.segment_memory.SegmentMemory."
                )
            memory = None
        if memory is None:
            memory = SegmentMemory(self.config)
        inputs = self._inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, None, causal=True, memory=memory
        )
        held = memory.memory_size()
        memory_rotary = None
        if isinstance(inputs.rotary, tuple) and held:
            memory_positions = key_positions(inputs.position_ids, held)[..., :held]
            _, memory_rotary = self.embeddings.position(inputs.hidden_states, memory_positions)
        view = memory.view(memory_rotary)
        hidden_states, aux_fields = self._run_layers(inputs, segment_memory=view, input_ids=input_ids, **kwargs)
        real = inputs.padding_mask
        if real is None:
            real = torch.ones(inputs.hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        memory.append(view.record, real)
        return HfxModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=memory, **aux_fields
        )

    def _inputs(
        self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cache, causal,
        names="input_ids or inputs_embeds", memory: SegmentMemory | None = None,
    ) -> StackInputs:
        """Check and embed a stack's inputs; positions continue after what ``cache`` has seen. With ``memory`` the
        mask is the (batch, 1, T, m + T) [memory ; segment] mask; positions then start at 0 for every segment and
        the memory's are the m positions before (only their distances matter: rotary or xl_relative)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"Pass exactly one of {names}.")
        reference = input_ids if input_ids is not None else inputs_embeds
        seq_len = reference.shape[1]
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq_len, device=reference.device) + past_seen).unsqueeze(0)
        padding_mask = padding_mask_for(attention_mask, seq_len)
        hidden_states, rotary = self.embeddings(input_ids, inputs_embeds, token_type_ids, position_ids, padding_mask)
        if memory is not None:
            memory.check_batch(hidden_states.shape[0])
            held = memory.real_tokens(hidden_states.shape[0], hidden_states.device)
            if attention_mask is not None and attention_mask.dim() != 2:
                mask = self._segment_pattern(attention_mask, held.shape[1], seq_len)
            else:
                mask = memory_attention_mask(held, padding_mask, seq_len)
        elif causal:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
        else:
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        return StackInputs(hidden_states, rotary, mask, padding_mask, position_ids)

    def _segment_pattern(self, attention_mask, held: int, seq_len: int):
        """A 3-/4-D mask (packed rows, custom patterns) is the segment's own pattern: taken as is when the memory
        is empty, refused otherwise (which memory position each packed block may see is not defined)."""
        keys = attention_mask.shape[-1]
        if held or keys != seq_len:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} is invalid with a segment memory holding "
                f"{held} positions; valid values: a 2-D (batch, seq) padding mask, or a 3-/4-D mask over the "
                f"segment's {seq_len} keys with an empty memory."
            )
        allowed = allowed_from_mask(attention_mask)
        return allowed if allowed.dim() == 4 else allowed[:, None]

    def _run_layers(self, inputs: StackInputs, *layer_args, **layer_kwargs) -> tuple[torch.Tensor, dict]:
        """The blocks (each also given ``layer_args`` and ``layer_kwargs``) and the final norm; returns the hidden
        states and the auxiliary fields of the modules that reported in this forward."""
        hidden_states = inputs.hidden_states
        with auxiliary.collecting() as reported:
            for layer in self.layers:
                hidden_states = layer(
                    hidden_states,
                    *layer_args,  # positional, for gradient checkpointing
                    attention_mask=inputs.mask,
                    padding_mask=inputs.padding_mask,
                    rotary=inputs.rotary,
                    position_ids=inputs.position_ids,
                    **layer_kwargs,
                )
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states, inputs.padding_mask)
        collected = auxiliary.collect(reported)
        return hidden_states, {
            "aux_loss": collected.loss,
            "aux_stats": collected.stats or None,
            "router_logits": collected.router_logits,
        }


class HfxPooler(nn.Module):
    """Dense + tanh over the first ([CLS]) token, as in BERT, for sentence-level heads of encoders."""

    def __init__(self, config: HfxConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class HfxLMPredictionHead(nn.Module):
    """Transform (dense, activation, norm) then project onto the vocabulary; the projection is tied to the embeddings."""

    def __init__(self, config: HfxConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = build_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, padding_mask=None):
        hidden_states = self.norm(self.act(self.dense(hidden_states)), padding_mask)
        return self.decoder(hidden_states) + self.bias


class HfxForMaskedLM(HfxPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.model = HfxModel(config)
        self.lm_head = HfxLMPredictionHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings
        if new_embeddings.out_features != self.lm_head.bias.shape[0]:
            old = self.lm_head.bias.data
            bias = torch.zeros(new_embeddings.out_features, dtype=old.dtype, device=old.device)
            bias[: min(old.shape[0], bias.shape[0])] = old[: bias.shape[0]]
            self.lm_head.bias = nn.Parameter(bias)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state, padding_mask_for(attention_mask, outputs.last_hidden_state.shape[1]))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HfxMaskedLMOutput(
            loss=auxiliary.add_to_loss(loss, outputs.aux_loss),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **auxiliary_fields(outputs),
        )


@dataclass
class HfxForPreTrainingOutput(ModelOutput):
    """MLM and NSP outputs; ``loss`` is their sum (each part is reported too)."""

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class HfxForPreTraining(HfxPreTrainedModel):
    """BERT-style pre-training: masked LM over tokens plus next-sentence prediction over [CLS].

    ``next_sentence_label``: 0 when sentence B really follows A, 1 when it is random (BERT's convention).
    """

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}
    # Two mean losses are summed: Trainer must not rescale them by a global token count.
    accepts_loss_kwargs = False

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.model = HfxModel(config)
        self.lm_head = HfxLMPredictionHead(config)
        self.pooler = HfxPooler(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    get_output_embeddings = HfxForMaskedLM.get_output_embeddings
    set_output_embeddings = HfxForMaskedLM.set_output_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        next_sentence_label: torch.LongTensor | None = None,
        **kwargs,
    ) -> HfxForPreTrainingOutput:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        prediction_logits = self.lm_head(hidden, padding_mask_for(attention_mask, hidden.shape[1]))
        nsp_logits = self.nsp_head(self.pooler(hidden))
        loss_fct = CrossEntropyLoss()
        mlm_loss = nsp_loss = None
        if labels is not None:
            mlm_loss = loss_fct(prediction_logits.view(-1, self.config.vocab_size).float(), labels.view(-1))
        if next_sentence_label is not None:
            nsp_loss = loss_fct(nsp_logits.view(-1, 2).float(), next_sentence_label.view(-1))
        parts = [part for part in (mlm_loss, nsp_loss) if part is not None]
        return HfxForPreTrainingOutput(
            loss=auxiliary.add_to_loss(sum(parts), outputs.aux_loss) if parts else None,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class HfxGenerationDefaults:
    """Generation defaults that follow the attention backend, for the heads that generate. Mixed in before
    HfxPreTrainedModel, so that its overrides of transformers' methods run."""

    def _apply_generation_defaults(self) -> None:
        """A backend that cannot decode from a KV cache (``hfx_lsh``, ``hfx_block_sparse``) generates with
        ``use_cache=False`` by default: each new token runs a full forward over the sequence so far.

        The default lives in ``self.generation_config`` (saved in ``generation_config.json``); an explicit
        ``generate(..., use_cache=True)`` still wins and reaches the backend's error. Switching back to a
        backend that decodes from a cache restores the model config's ``use_cache``."""
        if backend_supports_kv_cache(self.config._attn_implementation):
            if getattr(self, "_hfx_cache_default_off", False):
                self.generation_config.use_cache = self.config.use_cache
                self._hfx_cache_default_off = False
        elif self.generation_config.use_cache is not False:
            self.generation_config.use_cache = False
            self._hfx_cache_default_off = True

    def adjust_generation_fn(self, *args, **kwargs):
        # from_pretrained replaces generation_config with the saved one (which may predate the backend)
        super().adjust_generation_fn(*args, **kwargs)
        self._apply_generation_defaults()

    def set_attn_implementation(self, *args, **kwargs):
        super().set_attn_implementation(*args, **kwargs)
        self._apply_generation_defaults()


class HfxForCausalLM(HfxGenerationDefaults, HfxPreTrainedModel, GenerationMixin):
    """Left-to-right language model (GPT-style). Forces ``is_decoder=True``: a causal LM never sees the future."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfxConfig):
        if not config.is_decoder:
            logger.info("HfxForCausalLM sets is_decoder=True (causal attention mask).")
            config.is_decoder = True
        super().__init__(config)
        self.model = HfxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._apply_generation_defaults()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """With ``memory_length`` generate carries a SegmentMemory (a DynamicCache would be refused)."""
        if (
            self.config.memory_length
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
        ):
            model_kwargs["past_key_values"] = SegmentMemory(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and ``num_return_sequences`` repeat each prompt row: a memory given to ``generate`` follows."""
        memory = model_kwargs.get("past_key_values")
        if (
            expand_size > 1
            and isinstance(memory, SegmentMemory)
            and memory.real is not None
            and input_ids is not None
            and memory.real.shape[0] == input_ids.shape[0]
        ):
            memory.batch_repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HfxCausalLMOutputWithPast(
            loss=auxiliary.add_to_loss(loss, outputs.aux_loss),
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **auxiliary_fields(outputs),
        )


class HfxForSequenceClassification(HfxPreTrainedModel):
    """Encoders classify the pooled [CLS] token (BERT); decoders the last non-pad token (GPT/Llama)."""

    accepts_loss_kwargs = False

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfxModel(config)
        self.pooler = None if config.is_decoder else HfxPooler(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _pool(self, hidden, input_ids, attention_mask):
        if self.pooler is not None:
            return self.pooler(hidden)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (positions * attention_mask.to(hidden.device).long()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (positions * (input_ids != self.config.pad_token_id).long()).argmax(-1)
        else:
            last = torch.full_like(batch, hidden.shape[1] - 1)
        return hidden[batch, last]

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        pooled = self._pool(outputs.last_hidden_state, input_ids, attention_mask)
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=auxiliary.add_to_loss(loss, outputs.aux_loss),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class HfxForTokenClassification(HfxPreTrainedModel):
    """A label per token. The loss honours ``num_items_in_batch``, so Trainer's gradient accumulation and
    multi-process runs average over real labels, not over batches or processes."""

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfxModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(
            loss=auxiliary.add_to_loss(loss, outputs.aux_loss),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class HfxForQuestionAnswering(GenericForQuestionAnswering, HfxPreTrainedModel):
    accepts_loss_kwargs = False

    def get_input_embeddings(self):
        return self.model.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings.word_embeddings = value


class HfxForMultipleChoice(HfxPreTrainedModel):
    """Scores each (context, choice) sequence from its pooled [CLS] token; softmax over the choices."""

    accepts_loss_kwargs = False

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.model = HfxModel(config)
        self.pooler = HfxPooler(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MultipleChoiceModelOutput:
        """Inputs are (batch, num_choices, seq_len); they are flattened to (batch * num_choices, seq_len)."""
        reference = input_ids if input_ids is not None else inputs_embeds
        num_choices = reference.shape[1]

        def flat(t):
            return None if t is None else t.reshape(-1, *t.shape[2:])

        outputs = self.model(
            flat(input_ids),
            attention_mask=flat(attention_mask),
            token_type_ids=flat(token_type_ids),
            position_ids=flat(position_ids),
            inputs_embeds=flat(inputs_embeds),
            **kwargs,
        )
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state))).view(-1, num_choices)
        loss = CrossEntropyLoss()(logits.float(), labels) if labels is not None else None
        loss = auxiliary.add_to_loss(loss, outputs.aux_loss)
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "HfxPreTrainedModel",
    "HfxModel",
    "HfxModelOutputWithPast",
    "HfxCausalLMOutputWithPast",
    "HfxMaskedLMOutput",
    "HfxForMaskedLM",
    "HfxForPreTraining",
    "HfxForPreTrainingOutput",
    "HfxForCausalLM",
    "HfxForSequenceClassification",
    "HfxForTokenClassification",
    "HfxForQuestionAnswering",
    "HfxForMultipleChoice",
]
