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

from .config import METHODS, FinetuneConfig
from .data import DataError
from .model import HFX_LORA_TARGET_MODULES, BackendError, TargetModulesError, register_peft_mappings
from .quickstart import quickstart_step
from .train import FinetuneResult, OutputDirError, finetune

register_peft_mappings()

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
