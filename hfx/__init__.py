"""hfx: a plugin-based extension of the Hugging Face ecosystem.

``import hfx`` registers the ``hfx`` model type with AutoConfig and the AutoModel* classes, and
makes every installed attention plugin known to transformers' ``AttentionInterface``. After that,
only the transformers API is needed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import peft_integration
from .attention import register_attention_plugins
from .configuration_hfx import HfxConfig
from .modeling_hfx import (
    HfxForCausalLM,
    HfxForMaskedLM,
    HfxForMultipleChoice,
    HfxForPreTraining,
    HfxForPreTrainingOutput,
    HfxForQuestionAnswering,
    HfxForSequenceClassification,
    HfxForTokenClassification,
    HfxModel,
    HfxPreTrainedModel,
)
from .registry import Component, PluginLoadError, registry

__version__ = "0.1.0"

AUTO_CLASSES = {
    AutoModel: HfxModel,
    AutoModelForMaskedLM: HfxForMaskedLM,
    AutoModelForPreTraining: HfxForPreTraining,
    AutoModelForCausalLM: HfxForCausalLM,
    AutoModelForSequenceClassification: HfxForSequenceClassification,
    AutoModelForTokenClassification: HfxForTokenClassification,
    AutoModelForQuestionAnswering: HfxForQuestionAnswering,
    AutoModelForMultipleChoice: HfxForMultipleChoice,
}


def _register_with_auto_classes() -> None:
    AutoConfig.register(HfxConfig.model_type, HfxConfig, exist_ok=True)
    for auto_class, model_class in AUTO_CLASSES.items():
        auto_class.register(HfxConfig, model_class, exist_ok=True)


register_attention_plugins()
_register_with_auto_classes()
peft_integration.install()

__all__ = [
    "Component",
    "HfxConfig",
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
    "PluginLoadError",
    "registry",
]
