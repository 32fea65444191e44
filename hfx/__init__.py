"""hfx: a plugin-based extension of the Hugging Face ecosystem.

``import hfx`` registers the ``hfx`` model type with AutoConfig and the AutoModel* classes, and
makes every installed attention plugin known to transformers' ``AttentionInterface``. After that,
only the transformers API is needed.

``import hfx`` itself imports neither torch nor transformers: each registration runs as soon as
the transformers module it extends is imported (at once when it already is), and the model
classes load on first use (see ``hfx.auto_registration``).
"""

import importlib

from . import auto_registration, peft_integration, quantization
from .registry import Component, PluginLoadError, registry

__version__ = "0.1.0"

# Imported on first access (``hfx.HfxForCausalLM``, ``from hfx import HfxConfig``): the model
# classes need torch and ``transformers.modeling_utils``, which ``import hfx`` does not pay for.
_LAZY_ATTRIBUTES = {
    "HfxConfig": "hfx.configuration_hfx",
    "SegmentMemory": "hfx.segment_memory",
    **{name: "hfx.modeling_hfx" for name in (
        "HfxForCausalLM",
        "HfxForMaskedLM",
        "HfxForMultipleChoice",
        "HfxForPreTraining",
        "HfxForPreTrainingOutput",
        "HfxForQuestionAnswering",
        "HfxForSequenceClassification",
        "HfxForTokenClassification",
        "HfxModel",
        "HfxPreTrainedModel",
    )},
    "HfxForConditionalGeneration": "hfx.modeling_hfx_seq2seq",
    "HfxSeq2SeqModel": "hfx.modeling_hfx_seq2seq",
}


def __getattr__(name: str):
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module 'hfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


auto_registration.install()
peft_integration.install()
quantization.quiet_bitsandbytes_notices()

__all__ = [
    "Component",
    "SegmentMemory",
    "HfxConfig",
    "HfxForCausalLM",
    "HfxForConditionalGeneration",
    "HfxForMaskedLM",
    "HfxForMultipleChoice",
    "HfxForPreTraining",
    "HfxForPreTrainingOutput",
    "HfxForQuestionAnswering",
    "HfxForSequenceClassification",
    "HfxForTokenClassification",
    "HfxModel",
    "HfxPreTrainedModel",
    "HfxSeq2SeqModel",
    "PluginLoadError",
    "registry",
]
