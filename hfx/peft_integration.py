"""Make PEFT know hfx models without making ``import hfx`` import PEFT.

``LoraConfig(task_type=...)`` without ``target_modules`` looks the model type up in PEFT's
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``. hfx adds itself there as soon as that
module exists: at once if PEFT is already imported, otherwise right after PEFT's import (a
one-shot import hook), so the ~2 s PEFT import is paid only by those who use it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

HFX_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
_CONSTANTS = "peft.utils.constants"


def register_peft_mappings() -> None:
    """Add the hfx projections (every block linear, no output head) to PEFT's LoRA mapping."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("hfx", list(HFX_LORA_TARGET_MODULES))


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of PEFT's constants module so the mapping is extended right after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _CONSTANTS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            module.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("hfx", list(HFX_LORA_TARGET_MODULES))

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _CONSTANTS in sys.modules:
        register_peft_mappings()
    elif not any(isinstance(finder, _RegisterAfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftImport())
