"""Transformer-XL segment memory (Dai et al. 2019) as a transformers ``Cache``.

A long text is read segment by segment. Each block keeps the hidden states that entered its attention
sub-layer for the last ``config.memory_length`` positions, detached; the next segment's queries attend to
``[memory ; segment]``, the memory projected by the *current* block's key/value projections (as in XL), with
the causal rule offset by the memory length. Cost per segment is fixed: at most ``memory_length`` extra keys.

The memory travels as ``past_key_values`` (a :class:`SegmentMemory`), so models return it the way they
return a KV cache and ``generate()`` carries it from step to step: the prompt is one segment, every new token
another (XL's evaluation with segment length 1). It holds hidden states, not keys, and it is not a prefix of
``input_ids``: ``get_seq_length()`` is 0 so that ``generate`` feeds every prompt token; :meth:`memory_size`
is the number of positions held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MEMORY_ATTENTION = ("eager", "sdpa")  # backends that take an explicit (batch, 1, queries, keys) mask
MEMORY_POSITIONS = ("rotary", "xl_relative")  # relative encodings: a memory position keeps its meaning


def validate_memory_config(config) -> None:
    """Refuse what segment memory cannot honour (called by the config and again when a model is built)."""
    memory = getattr(config, "memory_length", 0)
    if not memory:
        return
    if config.position_embedding_type not in MEMORY_POSITIONS:
        raise ValueError(
            f"position_embedding_type={config.position_embedding_type!r} is invalid with memory_length={memory}; "
            f"valid values: {list(MEMORY_POSITIONS)} (absolute positions would give a memory position the same "
            "encoding as a position of the current segment)."
        )
    check_memory_attention(getattr(config, "_attn_implementation", None) or config.attention_type, memory)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"memory_length={memory!r} is invalid for an encoder-decoder model; valid values: 0 (segment memory is "
            "for HfxModel with is_decoder=True and HfxForCausalLM)."
        )


def check_memory_attention(attention: str, memory_length: int, field: str = "attention_type") -> None:
    """Refuse a backend that cannot take the explicit [memory ; segment] mask (``field``: how the caller names it;
    the model checks again per forward, as ``attn_implementation`` may change after it was built)."""
    if attention not in MEMORY_ATTENTION:
        raise ValueError(
            f"{field}={attention!r} is invalid with memory_length={memory_length}; valid values: "
            f"{list(MEMORY_ATTENTION)} (memory attention needs an explicit [memory ; segment] mask)."
        )


class SegmentMemoryLayer(CacheLayerMixin):
    """One block's memory: ``states`` (batch, m, hidden), detached, m <= memory_length."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, memory_length: int):
        super().__init__()
        self.memory_length = memory_length
        self.states: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:  # states arrive through SegmentMemory.append
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("SegmentMemory holds hidden states, not keys and values; it is filled by the hfx model.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.states is None else self.states.shape[1]

    def get_max_length(self) -> int:
        return self.memory_length

    def reset(self) -> None:
        self.states = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.states is not None:
            self.states = self.states.index_select(0, beam_idx.to(self.states.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.states is not None:
            self.states = self.states.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.states is not None:
            self.states = self.states[indices]


@dataclass(frozen=True)
class MemoryView:
    """What one forward reads from and writes to the memory.

    ``states`` is a snapshot taken before the first block ran, so that gradient checkpointing, which runs a
    block again during backward, reads the same memory; ``record`` receives each block's attention input
    (recomputation overwrites it with the same values, after the memory was already updated)."""

    states: tuple[torch.Tensor | None, ...]
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    record: list


class SegmentMemory(Cache):
    """The memory of every block of one hfx model, plus which memory positions hold real tokens."""

    def __init__(self, config=None, memory_length: int | None = None, num_layers: int | None = None):
        memory_length = memory_length if memory_length is not None else config.memory_length
        num_layers = num_layers if num_layers is not None else config.num_hidden_layers
        if not isinstance(memory_length, int) or memory_length <= 0:
            raise ValueError(f"memory_length={memory_length!r} is invalid; valid values: an integer > 0.")
        super().__init__(layers=[SegmentMemoryLayer(memory_length) for _ in range(num_layers)])
        self.memory_length = memory_length
        self.real: torch.Tensor | None = None  # (batch, m) bool, True on real tokens
        self.seen_tokens = 0  # every position ever appended, for logging

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: the memory is not a prefix of ``input_ids`` (``generate`` must feed every prompt token)."""
        return 0

    def memory_size(self) -> int:
        """Positions currently held (the same in every block)."""
        return self.layers[0].get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            f"crop({tokens_to_remove!r}) is invalid: SegmentMemory cannot be cropped (it holds hidden states, not a "
            "prefix of the input); valid: a KV cache (memory_length=0) for assisted decoding."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.real is not None:
            self.real = self.real.index_select(0, beam_idx.to(self.real.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.real is not None:
            self.real = self.real.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.real is not None:
            self.real = self.real[indices]

    def reset(self) -> None:
        super().reset()
        self.real = None
        self.seen_tokens = 0

    def check_batch(self, batch_size: int) -> None:
        held = None if self.real is None else self.real.shape[0]
        if held is not None and held != batch_size:
            raise ValueError(
                f"SegmentMemory holds a batch of {held} rows but this segment has {batch_size}; valid: the same rows "
                "in the same order as the previous segment (or a new SegmentMemory)."
            )

    def view(self, rotary=None) -> MemoryView:
        return MemoryView(tuple(layer.states for layer in self.layers), rotary, [None] * len(self.layers))

    def real_tokens(self, batch_size: int, device) -> torch.Tensor:
        """(batch, m) bool: which memory positions hold real tokens."""
        if self.real is None:
            return torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return self.real

    @torch.no_grad()
    def append(self, records: list, real: torch.Tensor) -> None:
        """Keep the last ``memory_length`` positions of [memory ; segment] per block, detached (XL's stop-gradient)."""
        if any(r is None for r in records):
            raise RuntimeError("a block did not record its attention input for the segment memory.")
        keep = self.memory_length
        for layer, new in zip(self.layers, records):
            joined = new.detach() if layer.states is None else torch.cat([layer.states, new.detach()], dim=1)
            layer.states = joined[:, -keep:]
            layer.is_initialized = True
        joined = real if self.real is None else torch.cat([self.real, real], dim=1)
        self.real = joined[:, -keep:]
        self.seen_tokens += real.shape[1]


def memory_attention_mask(memory_real: torch.Tensor, segment_real: torch.Tensor | None, segment_length: int):
    """Bool (batch, 1, T, m + T): query i sees every real memory position and the real segment positions <= i
    (XL's causal rule offset by the memory length); each query also sees itself, so no softmax row is empty."""
    batch, held = memory_real.shape
    device = memory_real.device
    if segment_real is None:
        segment_real = torch.ones(batch, segment_length, dtype=torch.bool, device=device)
    keys_real = torch.cat([memory_real, segment_real.to(device)], dim=1)  # (B, m + T)
    keys = held + segment_length
    itself = torch.arange(keys, device=device)[None, :] == torch.arange(held, keys, device=device)[:, None]
    allowed = causal_after(segment_length, keys, device)[None] & keys_real[:, None, :]
    return (allowed | itself[None])[:, None]


def causal_after(length: int, keys: int, device) -> torch.Tensor:
    """Bool (T, K): the T queries are the last T of the K keys (the K - T earlier ones: memory or a KV cache);
    query i sees key j iff j <= i + K - T, the causal rule offset by the earlier keys."""
    rows = torch.arange(length, device=device)[:, None] + (keys - length)
    return torch.arange(keys, device=device)[None, :] <= rows


def key_positions(query_positions: torch.Tensor, earlier: int) -> torch.Tensor:
    """Positions of ``[earlier keys ; segment]``: the earlier ones (memory, or a KV cache) directly precede the
    segment's first position; the segment's keys are at its query positions."""
    if not earlier:
        return query_positions
    offsets = torch.arange(-earlier, 0, device=query_positions.device, dtype=query_positions.dtype)
    return torch.cat([query_positions[..., :1] + offsets, query_positions], dim=-1)


__all__ = [
    "SegmentMemory",
    "SegmentMemoryLayer",
    "MemoryView",
    "validate_memory_config",
    "check_memory_attention",
    "memory_attention_mask",
    "key_positions",
    "causal_after",
    "MEMORY_ATTENTION",
    "MEMORY_POSITIONS",
]
