"""Short -> long conversion of BERT/RoBERTa-style checkpoints, the way the Longformer paper did it.

The position-embedding table is extended by copying the learned rows over and over (so every new
position starts from an embedding the model already knows), and the checkpoint is switched to
``hfx_sliding_window`` attention with the first token ([CLS] / <s>) global. The result stays a stock
BERT/RoBERTa checkpoint: ``config.json`` gains ``attention_window`` and ``global_attention_token_ids``;
:func:`load_long_model` loads it with the right backend. On an input of at most
``attention_window/2 + 1`` tokens every token still sees every other one, so outputs equal the original's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

BACKEND = "hfx_sliding_window"


def _model_class(config):
    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return AutoModel


def _position_offset(config) -> int:
    """RoBERTa-style models number positions from pad_token_id + 1; BERT from 0."""
    return config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0


def convert_to_long(
    source: str | Path,
    output: str | Path,
    max_position_embeddings: int = 4096,
    attention_window: int = 512,
    global_token_ids: list[int] | None = None,
) -> Path:
    """Write a long-context copy of the local checkpoint ``source`` to ``output`` and return ``output``."""
    from hfx_attention.sliding_window import check_window

    check_window(attention_window)
    config = AutoConfig.from_pretrained(source)
    old_max = config.max_position_embeddings
    offset = _position_offset(config)
    if max_position_embeddings - offset <= old_max - offset or max_position_embeddings <= old_max:
        raise ValueError(
            f"max_position_embeddings={max_position_embeddings} must exceed the checkpoint's {old_max}."
        )
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        pass
    if global_token_ids is None:
        first = None if tokenizer is None else (tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id)
        if first is None:
            raise ValueError(
                f"{source} has no tokenizer with a [CLS]/<s> token; pass global_token_ids (e.g. [101] for BERT)."
            )
        global_token_ids = [first]

    model_class = _model_class(config)
    short = model_class.from_pretrained(source)
    prefix = short.base_model_prefix
    state = short.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embeddings.weight"))
    old = state[key]
    learned = old[offset:]
    repeats = -(-(max_position_embeddings - offset) // learned.shape[0])
    state[key] = torch.cat([old[:offset], learned.repeat(repeats, 1)[: max_position_embeddings - offset]])

    config.max_position_embeddings = max_position_embeddings
    config.attention_window = attention_window
    config.global_attention_token_ids = list(global_token_ids)
    long = model_class._from_config(config, attn_implementation=BACKEND)
    missing, unexpected = long.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto the long {model_class.__name__} ({prefix}): {missing} {unexpected}")
    output = Path(output)
    long.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.model_max_length = max_position_embeddings - offset
        tokenizer.save_pretrained(output)
    return output


def load_long_model(path: str | Path, model_class=None, **kwargs):
    """Load a converted checkpoint with ``hfx_sliding_window`` and its always-global token ids active."""
    from hfx_attention import attach_global_token_ids

    import hfx  # noqa: F401  (registers the backend with transformers)

    model_class = model_class or _model_class(AutoConfig.from_pretrained(path))
    model = model_class.from_pretrained(path, attn_implementation=BACKEND, **kwargs)
    attach_global_token_ids(model)
    return model
