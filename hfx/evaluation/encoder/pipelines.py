"""``pipeline("hfx-zero-shot-classification")``: the three zero-shot methods behind one transformers pipeline.

Importing this module registers the task in transformers' ``PIPELINE_REGISTRY``. The method is
``method=`` or follows from the model: a sequence classifier with an ``entailment`` label does
NLI (the same scores as transformers' ``zero-shot-classification``); a masked LM given a
``template`` does cloze; any other encoder embeds ``label_descriptions`` (or the labels).
Output: ``{"sequence", "labels", "scores"}``, labels sorted by score; scores are the softmax
over the candidate labels of the method's scores.
"""

from __future__ import annotations

from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .zeroshot import (
    DEFAULT_HYPOTHESIS,
    check_method,
    cloze_scores,
    description_scores,
    nli_scores,
)

TASK = "hfx-zero-shot-classification"


class AutoModelForZeroShot:
    """Loads a checkpoint with the head it was saved with, so a path picks its own method.

    transformers tries a pipeline's model classes in order; any of the Auto classes would load an
    MLM checkpoint under a freshly initialised classification head (or the reverse) without failing.
    A convert-long checkpoint loads with its long backend and its global token ids active
    (``hfx.long_context``); an ``attn_implementation=`` keyword chooses another implementation.
    """

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoConfig

        from ...long_context import long_load_kwargs, prepare_long_model

        config = AutoConfig.from_pretrained(path)
        architectures = config.architectures or []
        auto_class = AutoModel
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            auto_class = AutoModelForSequenceClassification
        elif any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures):
            auto_class = AutoModelForMaskedLM
        kwargs.pop("_from_pipeline", None)
        kwargs.update(long_load_kwargs(config, kwargs.pop("attn_implementation", None), where=str(path)))
        return prepare_long_model(auto_class.from_pretrained(path, **kwargs))


class HfxZeroShotClassificationPipeline(Pipeline):
    """Zero-shot classification by label descriptions, cloze or NLI; see the module docstring."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, candidate_labels=None, method=None, label_descriptions=None, template=None,
                             verbalizers=None, hypothesis_template=DEFAULT_HYPOTHESIS, pooling="mean",
                             distance="cosine"):
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
        forward = dict(candidate_labels=candidate_labels, method=method, label_descriptions=label_descriptions,
                       template=template, verbalizers=verbalizers, hypothesis_template=hypothesis_template,
                       pooling=pooling, distance=distance)
        return {}, forward, {}

    def _method(self, method, template):
        if method is not None:
            check_method(method)
            return method
        label2id = getattr(self.model.config, "label2id", None) or {}
        if type(self.model).__name__.endswith("ForSequenceClassification") and any(
            label.lower().startswith("entail") for label in label2id
        ):
            return "nli"
        return "cloze" if template is not None else "description"

    def preprocess(self, inputs):
        return {"sequence": inputs}

    def _forward(self, model_inputs, candidate_labels=None, method=None, label_descriptions=None, template=None,
                 verbalizers=None, hypothesis_template=DEFAULT_HYPOTHESIS, pooling="mean", distance="cosine"):
        if not candidate_labels:
            raise ValueError(f"{TASK} needs candidate_labels (a list or a comma-separated string).")
        text = [model_inputs["sequence"]]
        method = self._method(method, template)
        if method == "nli":
            scores = nli_scores(self.model, self.tokenizer, text, candidate_labels, hypothesis_template)
        elif method == "cloze":
            if template is None:
                raise ValueError(f"{TASK} with method='cloze' needs template=, e.g. '{{text}} It was {{mask}}.'")
            words = {label: (verbalizers or {}).get(label, label) for label in candidate_labels}
            scores = cloze_scores(self.model, self.tokenizer, text, template, words)
        else:
            descriptions = [(label_descriptions or {}).get(label, label) for label in candidate_labels]
            scores = description_scores(self.model, self.tokenizer, text, descriptions, pooling, distance)
        return {"sequence": model_inputs["sequence"], "labels": list(candidate_labels), "scores": scores[0]}

    def postprocess(self, model_outputs):
        probabilities = model_outputs["scores"].softmax(-1)
        order = probabilities.argsort(descending=True, stable=True).tolist()
        return {
            "sequence": model_outputs["sequence"],
            "labels": [model_outputs["labels"][i] for i in order],
            "scores": [probabilities[i].item() for i in order],
        }


PIPELINE_REGISTRY.register_pipeline(
    TASK,
    pipeline_class=HfxZeroShotClassificationPipeline,
    pt_model=AutoModelForZeroShot,
    type="text",
)
