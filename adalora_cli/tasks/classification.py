"""Scores and prediction records shared by the tasks that classify or score a text (GLUE, text-classification,
text-regression): one place both task files import, so neither imports the other."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    metrics = {"accuracy": float(accuracy_score(labels, predicted)),
               "macro_f1": float(f1_score(labels, predicted, average="macro", labels=list(range(num_classes)),
                                          zero_division=0))}
    if num_classes == 2:
        metrics["f1"] = float(f1_score(labels, predicted, pos_label=1, zero_division=0))
    return metrics


def correlations(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman; 0 where one side is constant (a model predicting one score for every row), since the
    correlations are undefined there and SciPy would give NaN with a warning."""
    from scipy.stats import pearsonr, spearmanr

    if np.ptp(scores) == 0 or np.ptp(labels) == 0:
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}


def regression_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {**correlations(scores, labels), "mse": float(np.mean((scores - labels) ** 2))}


def classification_records(logits: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Per row: the predicted class name and the softmax probability of every class."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return [{"label": names[int(row.argmax())], "probabilities": {n: round(float(p), 6) for n, p in zip(names, row)}}
            for row in probabilities]


class SequenceClassifier:
    """What the tasks that classify or score a text share about their model: a sequence-classification head, PEFT's
    SEQ_CLS, the labels a PEFT export carries beside it, the class names a run predicts."""

    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def label_config(self, model_config) -> dict[str, Any]:
        labels = {key: getattr(model_config, key) for key in ("id2label", "label2id")}
        return {"num_labels": len(labels["id2label"]), **labels}

    def class_names(self, model_config) -> list[str] | None:
        """The classes in id order; None for regression."""
        if getattr(model_config, "problem_type", None) == "regression":
            return None
        return [model_config.id2label[i] for i in sorted(model_config.id2label)]
