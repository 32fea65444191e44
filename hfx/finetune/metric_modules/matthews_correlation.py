"""Matthews correlation coefficient (scikit-learn's matthews_corrcoef): in [-1, 1], 0 for chance level."""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "Matthews correlation between predicted and reference class ids; the multi-class form for more than 2."
_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): reference class ids.
Returns:
    matthews_correlation (float): in [-1, 1].
"""


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
