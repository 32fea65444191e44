"""LoRA / QLoRA / LLM.int8 / full fine-tuning over Trainer, PEFT and bitsandbytes.

```python
>>> from hfx.finetune import finetune
>>> result = finetune(model="path/to/model", data="train.jsonl", output="runs/lora", method="qlora",
...                   max_steps=200, merge=True)
>>> result.saved_dir, result.merged_dir
```

Importing this package registers the hfx model type in PEFT's LoRA target-module mapping, so
``LoraConfig(task_type="CAUSAL_LM")`` without ``target_modules`` works for hfx models.
See ``docs/finetuning.md``.
"""

import importlib

# Loaded on first access, so that `hfx finetune --help` (which reads only .config) does not import
# torch, Trainer and PEFT. PEFT's mapping is extended by `import hfx` itself (hfx.peft_integration).
_LAZY = {
    "METHODS": ".config", "FinetuneConfig": ".config", "DataError": ".data", "HFX_LORA_TARGET_MODULES": ".model",
    "BackendError": ".model", "TargetModulesError": ".model", "register_peft_mappings": ".model",
    "quickstart_step": ".quickstart", "FinetuneResult": ".train", "OutputDirError": ".train", "finetune": ".train",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "HFX_LORA_TARGET_MODULES",
    "METHODS",
    "BackendError",
    "DataError",
    "FinetuneConfig",
    "FinetuneResult",
    "OutputDirError",
    "TargetModulesError",
    "finetune",
    "quickstart_step",
    "register_peft_mappings",
]
