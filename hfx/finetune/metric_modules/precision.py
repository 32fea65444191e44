"""Precision, the fraction of predictions of a class that are right (scikit-learn's precision_score)."""

from sklearn.metrics import precision_score

from ._class_scores import ClassScore


class Precision(ClassScore):
    key = "precision"
    description = ("Precision, the fraction of predictions of a class that are right; averaged over classes as "
                   "`average` says.")

    def score(self, references, predictions, **kwargs):
        return precision_score(references, predictions, **kwargs)
