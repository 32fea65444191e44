"""The hfx encoder-decoder: an hfx encoder, a causal hfx decoder that cross-attends to it, an LM head.

Built from the same blocks as the encoder-only and decoder-only models (embeddings, self-attention, norm,
position and feed-forward plugins), so every ``norm_type`` / ``position_embedding_type`` / ``ffn_type`` /
``norm_position`` switch applies to both stacks. The interface is BART's and T5's (``decoder_input_ids``,
``encoder_outputs``, ``labels`` shifted right with ``decoder_start_token_id``, ``Seq2SeqLMOutput``,
``EncoderDecoderCache``), so ``generate()``, ``Seq2SeqTrainer`` and seq2seq evaluation code work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions, Seq2SeqLMOutput
from transformers.modeling_outputs import Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from . import auxiliary
from .attention import eager_attention_forward
from .configuration_hfx import HfxConfig
from .modeling_hfx import (
    HfxAttention,
    HfxEmbeddings,
    HfxGenerationDefaults,
    HfxLayer,
    HfxModel,
    HfxPreTrainedModel,
    attention_component,
    auxiliary_fields,
    build_ffn,
    build_norm,
    ffn_takes_padding,
)
from .registry import registry
from .segment_memory import validate_memory_config

logger = logging.get_logger(__name__)


def decoder_start_token_id(config: HfxConfig) -> int | None:
    """The first decoder input: ``decoder_start_token_id``, else the pad token (T5's convention)."""
    value = getattr(config, "decoder_start_token_id", None)
    return config.pad_token_id if value is None else value


def shares_embeddings(config: HfxConfig) -> bool:
    return bool(getattr(config, "tie_encoder_decoder_embeddings", True))


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, start_token_id: int | None) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then the labels without their last token;
    ignored positions (-100) become the pad token."""
    if start_token_id is None:
        raise ValueError("decoder_start_token_id=None is invalid with pad_token_id=None; set decoder_start_token_id.")
    if pad_token_id is None:
        raise ValueError("pad_token_id=None is invalid for seq2seq labels; valid values: an integer token id.")
    shifted = labels.new_full(labels.shape, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


def cross_attention_implementation(config: HfxConfig) -> str:
    """Backend for cross-attention: transformers' own one when self-attention uses it; ``sdpa`` under an hfx
    attention plugin, whose patterns (windows, spans, hashing) are about a sequence attending to itself."""
    implementation = config._attn_implementation
    return "sdpa" if attention_component(implementation) is not None else implementation


def cross_attention_mask(implementation, config, decoder_embeds, encoder_attention_mask, encoder_hidden_states):
    """The mask of decoder queries over encoder keys (only encoder padding is blocked), in the form the
    cross-attention backend ``implementation`` expects; None when nothing is blocked."""
    if implementation == config._attn_implementation:
        return create_bidirectional_mask(
            config=config,
            inputs_embeds=decoder_embeds,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
    if encoder_attention_mask is None:
        return None
    if encoder_attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(encoder_attention_mask.shape)} is invalid for cross-attention; "
            "valid values: a 2-D (batch, source_length) mask of 1 (real) and 0 (padding)."
        )
    keep = encoder_attention_mask.to(device=decoder_embeds.device).bool()
    if bool(keep.all()):
        return None
    return keep[:, None, None, :].expand(-1, 1, decoder_embeds.shape[1], -1)  # sdpa's boolean form: True attends


class HfxCrossAttention(nn.Module):
    """Decoder queries over encoder keys and values. No position encoding: source and target positions are
    unrelated (as in T5 and rotary encoder-decoders). Keys and values are computed once per source and kept
    in the cross-attention half of an ``EncoderDecoderCache``. The decoder passes the backend
    (``cross_attention_implementation``), chosen once per forward."""

    def __init__(self, config: HfxConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(
        self, hidden_states, encoder_hidden_states, attention_mask=None, past_key_values=None, implementation=None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cache = past_key_values.cross_attention_cache if isinstance(past_key_values, EncoderDecoderCache) else None
        if cache is not None and past_key_values.is_updated.get(self.layer_idx):
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            kv_shape = (*encoder_hidden_states.shape[:-1], -1, self.head_dim)
            key = self.k_proj(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            value = self.v_proj(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
                past_key_values.is_updated[self.layer_idx] = True
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation or cross_attention_implementation(self.config), eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class HfxDecoderLayer(GradientCheckpointingLayer):
    """Causal self-attention, cross-attention over the encoder, feed-forward; each with a residual and a
    norm before (``norm_position="pre"``) or after (``"post"``) it."""

    def __init__(self, config: HfxConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attention_norm = build_norm(config)
        self.self_attention = HfxAttention(config, layer_idx)
        self.self_attention.is_causal = True  # whatever config.is_decoder says: a decoder never sees the future
        self.cross_attention_norm = build_norm(config)
        self.cross_attention = HfxCrossAttention(config, layer_idx)
        self.ffn_norm = build_norm(config)
        self.ffn = build_ffn(config, layer_idx)
        self._ffn_takes_padding = ffn_takes_padding(self.ffn)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    _ffn = HfxLayer._ffn  # padding is not counted by the FFN (MoE load statistics)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        cross_attention_mask=None,
        cross_attention_implementation=None,
        padding_mask=None,
        rotary=None,
        past_key_values=None,
        **kwargs,
    ):
        self_cache = past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache) else past_key_values
        cross = (encoder_hidden_states, cross_attention_mask, past_key_values, cross_attention_implementation)
        if self.pre_norm:
            normed = self.self_attention_norm(hidden_states, padding_mask)
            attended, _ = self.self_attention(normed, attention_mask, rotary, self_cache, **kwargs)
            hidden_states = hidden_states + self.dropout(attended)
            attended, _ = self.cross_attention(self.cross_attention_norm(hidden_states, padding_mask), *cross)
            hidden_states = hidden_states + self.dropout(attended)
            return hidden_states + self.dropout(self._ffn(self.ffn_norm(hidden_states, padding_mask), padding_mask))
        attended, _ = self.self_attention(hidden_states, attention_mask, rotary, self_cache, **kwargs)
        hidden_states = self.self_attention_norm(hidden_states + self.dropout(attended), padding_mask)
        attended, _ = self.cross_attention(hidden_states, *cross)
        hidden_states = self.cross_attention_norm(hidden_states + self.dropout(attended), padding_mask)
        return self.ffn_norm(hidden_states + self.dropout(self._ffn(hidden_states, padding_mask)), padding_mask)


@dataclass
class HfxDecoderOutput(BaseModelOutputWithPastAndCrossAttentions):
    """The decoder stack's output plus its components' auxiliary terms (see :mod:`hfx.auxiliary`)."""

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfxSeq2SeqModelOutput(Seq2SeqModelOutput):
    """``Seq2SeqModelOutput`` plus the auxiliary terms of both stacks (encoder's first, then decoder's)."""

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfxSeq2SeqLMOutput(Seq2SeqLMOutput):
    """``Seq2SeqLMOutput`` whose ``loss`` includes ``aux_loss``; the auxiliary fields as in HfxSeq2SeqModelOutput."""

    aux_loss: torch.Tensor | None = None
    aux_stats: dict[str, torch.Tensor] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


def _merge_auxiliary(*outputs) -> dict:
    """One set of auxiliary fields from the stacks' outputs (encoder first): losses summed, per-module stat
    rows and router logits concatenated in module order."""
    losses, stats, logits = [], {}, []
    for fields in map(auxiliary_fields, outputs):
        if fields["aux_loss"] is not None:
            losses.append(fields["aux_loss"].float())
        for name, rows in (fields["aux_stats"] or {}).items():
            stats.setdefault(name, []).append(rows)
        logits.extend(fields["router_logits"] or ())
    return {
        "aux_loss": torch.stack(losses).sum() if losses else None,
        "aux_stats": {name: torch.cat([r.to(parts[0].device) for r in parts]) for name, parts in stats.items()} or None,
        "router_logits": tuple(logits) or None,
    }


class HfxSeq2SeqDecoder(HfxPreTrainedModel):
    """The decoder stack: its own embeddings (positions restart at 0 for the target), causal self-attention
    with a KV cache, cross-attention over the encoder's last hidden states."""

    _no_split_modules = ["HfxDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": OutputRecorder(HfxDecoderLayer, index=0, num_hidden_layers_key="decoder_layers"),
        "attentions": OutputRecorder(HfxAttention, index=1, layer_name="self_attention"),
        "cross_attentions": OutputRecorder(HfxCrossAttention, index=1, layer_name="cross_attention"),
    }

    def __init__(self, config: HfxConfig):
        super().__init__(config)
        self.embeddings = HfxEmbeddings(config)
        self.layers = nn.ModuleList([HfxDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.final_norm = build_norm(config) if config.norm_position == "pre" else None
        self.gradient_checkpointing = False
        self.post_init()

    get_input_embeddings = HfxModel.get_input_embeddings
    set_input_embeddings = HfxModel.set_input_embeddings
    _inputs = HfxModel._inputs
    _run_layers = HfxModel._run_layers

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> HfxDecoderOutput:
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states=None is invalid: the decoder cross-attends to the encoder's output.")
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif isinstance(past_key_values, Cache) and not isinstance(past_key_values, EncoderDecoderCache):
            past_key_values = EncoderDecoderCache(past_key_values, DynamicCache())  # self-attention only was given
        self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        inputs = self._inputs(
            input_ids, inputs_embeds, attention_mask, None, position_ids, self_cache, causal=True,
            names="decoder_input_ids or decoder_inputs_embeds",
        )
        implementation = cross_attention_implementation(self.config)
        cross_mask = cross_attention_mask(
            implementation, self.config, inputs.hidden_states, encoder_attention_mask, encoder_hidden_states
        )
        hidden_states, aux_fields = self._run_layers(
            inputs,
            encoder_hidden_states,
            cross_attention_mask=cross_mask,
            cross_attention_implementation=implementation,
            past_key_values=past_key_values,
            input_ids=input_ids,
            **kwargs,
        )
        return HfxDecoderOutput(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None, **aux_fields
        )


def _check_seq2seq_config(config: HfxConfig) -> None:
    """Mark the config encoder-decoder and refuse what the two stacks cannot honour, before any weights exist."""
    if config.is_decoder:
        raise ValueError(
            "is_decoder=True is invalid for an encoder-decoder model; valid values: is_decoder=False (the encoder "
            "attends both ways, the decoder stack is always causal)."
        )
    if not config.is_encoder_decoder:
        logger.info("HfxForConditionalGeneration sets is_encoder_decoder=True.")
        config.is_encoder_decoder = True
        config._check_shapes()  # fills in what an encoder-decoder config derives (decoder_layers)
        # what refuses an encoder-decoder config when it is built (segment memory, xl_relative) sees it now
        validate_memory_config(config)
        position = registry.get("position", config.position_embedding_type)
        if position.validate_config is not None:
            position.validate_config(config)
    start = decoder_start_token_id(config)
    if start is None:
        raise ValueError(
            "decoder_start_token_id=None is invalid when pad_token_id is None too; valid values: an integer in "
            f"[0, vocab_size={config.vocab_size})."
        )
    if not (isinstance(start, int) and 0 <= start < config.vocab_size):
        raise ValueError(
            f"decoder_start_token_id={start!r} is invalid; valid values: an integer in [0, vocab_size={config.vocab_size})."
        )


class HfxSeq2SeqModel(HfxPreTrainedModel):
    """Encoder and decoder, no head. With ``tie_encoder_decoder_embeddings`` (default) both stacks read one
    token embedding matrix; otherwise each has its own (e.g. two vocabularies' worth of meaning)."""

    _no_split_modules = ["HfxLayer", "HfxDecoderLayer"]
    # Candidates transformers may drop as duplicates when saving; which pairs are tied: get_expanded_tied_weights_keys.
    _tied_weights_keys = {"decoder.embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfxConfig):
        _check_seq2seq_config(config)
        super().__init__(config)
        self.encoder = HfxModel(config)
        self.decoder = HfxSeq2SeqDecoder(config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # Sharing the token embedding across stacks is its own switch, independent of tie_word_embeddings.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys) if shares_embeddings(self.config) else {}

    def get_input_embeddings(self):
        return self.encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.encoder.embeddings.word_embeddings = value
        if shares_embeddings(self.config):
            self.decoder.embeddings.word_embeddings = value

    def get_encoder(self, modality=None):
        return self.encoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs=None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> HfxSeq2SeqModelOutput:
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "Pass decoder_input_ids (or decoder_inputs_embeds), or labels to HfxForConditionalGeneration, "
                "which shifts them right to make the decoder inputs."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
                use_cache=False, **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput) and not hasattr(encoder_outputs, "last_hidden_state"):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return HfxSeq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            past_key_values=decoder_outputs.past_key_values,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=getattr(encoder_outputs, "hidden_states", None),
            encoder_attentions=getattr(encoder_outputs, "attentions", None),
            **_merge_auxiliary(encoder_outputs, decoder_outputs),
        )


class HfxForConditionalGeneration(HfxGenerationDefaults, HfxPreTrainedModel, GenerationMixin):
    """Encoder-decoder language model (BART / T5 style) for translation, summarisation, any text-to-text task.

    ``labels`` are the target tokens (-100 where ignored); the decoder reads them shifted right behind
    ``decoder_start_token_id``. The loss honours ``num_items_in_batch`` (Trainer's gradient accumulation and
    multi-process averaging over real target tokens) and includes the components' ``aux_loss``.
    """

    _no_split_modules = ["HfxLayer", "HfxDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.decoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: HfxConfig):
        _check_seq2seq_config(config)
        super().__init__(config)
        self.model = HfxSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # transformers maps "*ForConditionalGeneration" to the causal (shifting) loss; seq2seq labels are aligned.
        self.loss_type = "ForMaskedLM"
        self._apply_generation_defaults()

    def _apply_generation_defaults(self) -> None:
        if self.generation_config.decoder_start_token_id is None:
            self.generation_config.decoder_start_token_id = decoder_start_token_id(self.config)
        super()._apply_generation_defaults()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The head ties to the decoder's token embedding, which itself may be the encoder's: name the final source.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        if not self.config.tie_word_embeddings:
            return {}
        stack = "encoder" if shares_embeddings(self.config) else "decoder"
        return {"lm_head.weight": f"model.{stack}.embeddings.word_embeddings.weight"}

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_encoder(self, modality=None):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resize the encoder's embedding (and head); a separate decoder embedding is resized alike."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        decoder = self.model.decoder
        if not shares_embeddings(self.config) and decoder.get_input_embeddings().num_embeddings != embeddings.num_embeddings:
            resized = self._get_resized_embeddings(
                decoder.get_input_embeddings(), embeddings.num_embeddings, mean_resizing=mean_resizing
            )
            decoder.set_input_embeddings(resized)
            self.tie_weights()
        return embeddings

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """What ``DataCollatorForSeq2Seq`` calls to build ``decoder_input_ids``."""
        return shift_tokens_right(labels, self.config.pad_token_id, decoder_start_token_id(self.config))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs=None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> HfxSeq2SeqLMOutput:
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            token_type_ids=token_type_ids,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HfxSeq2SeqLMOutput(
            loss=auxiliary.add_to_loss(loss, outputs.aux_loss),
            logits=logits,
            past_key_values=outputs.past_key_values,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            **auxiliary_fields(outputs),
        )


__all__ = [
    "HfxCrossAttention",
    "HfxDecoderLayer",
    "HfxSeq2SeqDecoder",
    "HfxSeq2SeqModel",
    "HfxSeq2SeqModelOutput",
    "HfxSeq2SeqLMOutput",
    "HfxForConditionalGeneration",
    "shift_tokens_right",
]
