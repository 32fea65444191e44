"""Recall, the fraction of references of a class that are found (scikit-learn's recall_score)."""

import datasets
import evaluate
from sklearn.metrics import recall_score

_DESCRIPTION = "Recall, the fraction of references of a class that are found; averaged over classes as `average` says."
_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): reference class ids.
    average (str): 'binary' (the class `pos_label` only), 'macro', 'micro' or 'weighted'.
    labels (list of int, optional): the classes to average over (default: those that occur).
    pos_label (int): the positive class of 'binary'.
Returns:
    recall (float): in [0, 1]; a class never predicted (or never present) counts 0.
"""


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", labels=None, pos_label=1):
        value = recall_score(references, predictions, average=average, labels=labels, pos_label=pos_label, zero_division=0)
        return {"recall": float(value)}
