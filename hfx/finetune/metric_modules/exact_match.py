"""Exact match of generated texts: the fraction equal to their reference after whitespace normalisation."""

import datasets
import evaluate

_DESCRIPTION = ("Fraction of predictions equal to their reference once leading and trailing whitespace is removed and "
                "every run of whitespace inside is one space; case-sensitive unless ignore_case.")
_INPUTS = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
    ignore_case (bool): compare lower-cased texts.
Returns:
    exact_match (float): in [0, 1].
"""


def normalise(text: str, ignore_case: bool = False) -> str:
    """Whitespace collapsed to single spaces and stripped; lower-cased with ``ignore_case``."""
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False):
        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(normalise(p, ignore_case) == normalise(r, ignore_case) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
