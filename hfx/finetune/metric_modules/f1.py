"""F1 score, the harmonic mean of precision and recall (scikit-learn's f1_score)."""

from sklearn.metrics import f1_score

from ._class_scores import ClassScore


class F1(ClassScore):
    key = "f1"
    description = "F1 score, the harmonic mean of precision and recall; averaged over classes as `average` says."

    def score(self, references, predictions, **kwargs):
        return f1_score(references, predictions, **kwargs)
