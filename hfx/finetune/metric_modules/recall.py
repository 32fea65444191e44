"""Recall, the fraction of references of a class that are found (scikit-learn's recall_score)."""

from sklearn.metrics import recall_score

from ._class_scores import ClassScore


class Recall(ClassScore):
    key = "recall"
    description = ("Recall, the fraction of references of a class that are found; averaged over classes as "
                   "`average` says.")

    def score(self, references, predictions, **kwargs):
        return recall_score(references, predictions, **kwargs)
