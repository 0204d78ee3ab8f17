"""Point metrics with COVID as the positive class (label 1), all from scikit-learn.

The ``macro_*`` metrics average each class's precision, recall and F1 (sklearn's
``average="macro"``): the paper's Table 1 most plausibly reports those, since several of its
rows have equal accuracy, precision, recall and F1.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "auc",
                "macro_precision", "macro_recall", "macro_f1")


def binary_metrics(y_true, p_covid, threshold: float = 0.5) -> dict:
    """Table 1's columns plus specificity, and the confusion matrix, at ``threshold``."""
    y_true = np.asarray(y_true, dtype=int)
    p_covid = np.asarray(p_covid, dtype=float)
    y_pred = (p_covid >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "positive_class": "COVID",
        "threshold": threshold,
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "auc": float(skm.roc_auc_score(y_true, p_covid)) if both else float("nan"),
        "macro_precision": float(skm.precision_score(y_true, y_pred, average="macro", labels=[0, 1], zero_division=0)),
        "macro_recall": float(skm.recall_score(y_true, y_pred, average="macro", labels=[0, 1], zero_division=0)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", labels=[0, 1], zero_division=0)),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
