"""Merge a trained adapter into its base and save a plain checkpoint that loads without PEFT.

A quantised base is dequantised first (the weights the adapter was trained against), then the
LoRA product is added in full precision; the result carries no ``quantization_config``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import FinetuneConfig
from .model import model_class_for, quantization_config


def merge_adapter(config: FinetuneConfig, task: str, model_config, adapter_dir: Path, merged_dir: Path, tokenizer):
    from peft import PeftModel

    from ..safe_paths import replace_folder

    from ..long_context import long_load_kwargs, prepare_long_model

    dtype = getattr(torch, config.merge_dtype or _checkpoint_dtype(model_config))
    model_class = model_class_for(task)
    long = long_load_kwargs(model_config, where=f"--model {config.model}")  # the merged model keeps the backend
    if config.quantized:
        base = model_class.from_pretrained(
            config.model,
            config=model_config,
            quantization_config=quantization_config(config, task),
            dtype=torch.float32,
            trust_remote_code=config.trust_remote_code,
            **long,
        )
        base = base.dequantize(dtype=torch.float32)
    else:
        base = model_class.from_pretrained(
            config.model, config=model_config, dtype=torch.float32, trust_remote_code=config.trust_remote_code,
            **long,
        )
    merged = prepare_long_model(PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(dtype))
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    replace_folder(merged_dir, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return merged


def _checkpoint_dtype(model_config) -> str:
    dtype = getattr(model_config, "dtype", None) or torch.float32
    return str(dtype).removeprefix("torch.")
