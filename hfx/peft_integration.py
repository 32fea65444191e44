"""Make PEFT know hfx models without making ``import hfx`` import PEFT.

``LoraConfig(task_type=...)`` without ``target_modules`` looks the model type up in PEFT's
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``. hfx adds itself there as soon as that
module exists: at once if PEFT is already imported, otherwise right after PEFT's import (a
one-shot import hook, ``hfx.import_hooks``), so the ~2 s PEFT import is paid only by those who use it.
"""

from __future__ import annotations

HFX_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
_CONSTANTS = "peft.utils.constants"


def moe_target_parameters(config) -> list[str]:
    """The routed experts' stacked weights of an ``ffn_type="moe"`` model, for ``LoraConfig(target_parameters=...)``.

    They are ``nn.Parameter`` tensors ``[experts, out, in]``, not ``nn.Linear`` modules, so ``target_modules`` never
    reaches them (``up_proj``/``down_proj`` there match the dense and shared-expert linears only).
    """
    if getattr(config, "ffn_type", None) != "moe":
        raise ValueError(f"ffn_type={getattr(config, 'ffn_type', None)!r} has no stacked experts; valid values: 'moe'.")
    first = "experts.gate_up_proj" if config.moe_expert_type == "swiglu" else "experts.up_proj"
    return [first, "experts.down_proj"]


def register_peft_mappings() -> None:
    """Add the hfx projections (every block linear, no output head) to PEFT's LoRA mapping."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("hfx", list(HFX_LORA_TARGET_MODULES))


def _extend_mapping(constants) -> None:
    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("hfx", list(HFX_LORA_TARGET_MODULES))


def install() -> None:
    """Extend PEFT's mapping now if PEFT is imported, else right after its constants module is."""
    from .import_hooks import when_imported

    when_imported(_CONSTANTS, _extend_mapping)
