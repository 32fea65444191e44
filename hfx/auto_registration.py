"""What ``import hfx`` registers with transformers, and how it stays cheap.

- ``AutoConfig``: ``model_type="hfx"`` -> ``HfxConfig``, as soon as transformers' auto-config
  module exists.
- ``AutoModel`` and eight ``AutoModelFor*`` classes: ``HfxConfig`` -> the hfx model class. The
  entry names the class by module and attribute and is resolved on first read, so
  ``hfx.modeling_hfx`` (and with it ``transformers.modeling_utils``) is imported only when a
  model is built or a mapping is listed, as transformers does for its own models.
- ``AttentionInterface`` / ``AttentionMaskInterface``: every installed attention plugin, when
  ``transformers.modeling_utils`` / ``transformers.masking_utils`` is imported.

Each step goes through :func:`hfx.import_hooks.when_imported`, so it happens before any user
code can look at the registry it extends, whichever of ``import hfx`` and ``import
transformers`` comes first.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .import_hooks import when_imported

MODEL_CLASSES = {
    "AutoModel": "HfxModel",
    "AutoModelForMaskedLM": "HfxForMaskedLM",
    "AutoModelForPreTraining": "HfxForPreTraining",
    "AutoModelForCausalLM": "HfxForCausalLM",
    "AutoModelForSequenceClassification": "HfxForSequenceClassification",
    "AutoModelForTokenClassification": "HfxForTokenClassification",
    "AutoModelForQuestionAnswering": "HfxForQuestionAnswering",
    "AutoModelForMultipleChoice": "HfxForMultipleChoice",
    "AutoModelForSeq2SeqLM": "HfxForConditionalGeneration",
}
MODELING_MODULE = "hfx.modeling_hfx"
# Classes that live outside MODELING_MODULE, by class name.
CLASS_MODULES = {"HfxForConditionalGeneration": "hfx.modeling_hfx_seq2seq"}


class ClassReference:
    """``module:attribute`` standing in for a class until it is first needed."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def resolve(self):
        return getattr(importlib.import_module(self.module), self.name)

    def __repr__(self) -> str:
        return f"ClassReference({self.module}:{self.name})"


class ResolvingDict(dict):
    """A dict whose :class:`ClassReference` values are replaced by their class when read.

    Used as an auto mapping's ``_extra_content``: every reader there (``[]``, ``get``,
    ``values``, ``items``, ``dict(...)``) sees real classes, only the first read imports them.
    """

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, ClassReference):
            value = value.resolve()
            super().__setitem__(key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[key] for key in list(self)]

    def items(self):
        return [(key, self[key]) for key in list(self)]

    def __iter__(self):  # not dict's own: dict(self) then copies through __getitem__
        return iter(list(super().keys()))


def register_config(configuration_auto: ModuleType) -> None:
    from .configuration_hfx import HfxConfig

    configuration_auto.AutoConfig.register(HfxConfig.model_type, HfxConfig, exist_ok=True)


def register_models(modeling_auto: ModuleType) -> None:
    from .configuration_hfx import HfxConfig

    for auto_name, class_name in MODEL_CLASSES.items():
        mapping = getattr(modeling_auto, auto_name)._model_mapping
        if not isinstance(mapping._extra_content, ResolvingDict):
            mapping._extra_content = ResolvingDict(mapping._extra_content)
        module = CLASS_MODULES.get(class_name, MODELING_MODULE)
        mapping.register(HfxConfig, ClassReference(module, class_name), exist_ok=True)


def register_attention(module: ModuleType) -> None:
    from .attention import register_attention_plugins

    register_attention_plugins(module)


def install() -> None:
    """Arm (or run) every registration; called once by ``import hfx``."""
    when_imported("transformers.models.auto.configuration_auto", register_config)
    when_imported("transformers.models.auto.modeling_auto", register_models)
    when_imported("transformers.modeling_utils", register_attention)
    when_imported("transformers.masking_utils", register_attention)


__all__ = ["MODEL_CLASSES", "CLASS_MODULES", "ClassReference", "ResolvingDict", "install"]
