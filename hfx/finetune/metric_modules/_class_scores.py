"""The shared part of the per-class scores (f1, precision, recall): features, arguments, averaging.

Not a metric script itself. ``evaluate.load`` copies this file next to the script that imports it
(``from ._class_scores import ClassScore``) and takes the first non-abstract ``EvaluationModule``
subclass of the script's namespace as its metric, so :class:`ClassScore` is abstract and never the
one picked.
"""

import abc

import datasets
import evaluate

_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): reference class ids.
    average (str): 'binary' (the class `pos_label` only), 'macro', 'micro' or 'weighted'.
    labels (list of int, optional): the classes to average over (default: those that occur).
    pos_label (int): the positive class of 'binary'.
Returns:
    {key} (float): in [0, 1]; a class never predicted (or never present) counts 0.
"""


class ClassScore(evaluate.Metric, metaclass=abc.ABCMeta):
    """A scikit-learn per-class score averaged as ``average`` says; a subclass names ``key``, ``description``
    and :meth:`score`."""

    key: str
    description: str

    @abc.abstractmethod
    def score(self, references, predictions, **kwargs) -> float:
        """scikit-learn's ``<key>_score(references, predictions, **kwargs)``."""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.description, citation="", inputs_description=_INPUTS.format(key=self.key),
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", labels=None, pos_label=1):
        value = self.score(references, predictions, average=average, labels=labels, pos_label=pos_label,
                           zero_division=0)
        return {self.key: float(value)}
