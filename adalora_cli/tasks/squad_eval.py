"""SQuAD exact match and F1, as the official evaluation scripts (v1.1 and v2.0) define them.

Both scripts normalise an answer the same way: lower case, drop ASCII punctuation, drop the articles
a/an/the (as whole words), collapse white space. A question scores the maximum over its gold answers;
the totals are percentages (0-100), as the scripts print them.

They differ in two places, kept apart here because the numbers differ:
- v1.1 scores every gold answer as given; F1 is 0 whenever no token is shared, even between two empty
  strings (exact match of two empty strings is still 1).
- v2.0 drops gold answers that normalise to nothing; an unanswerable question (no gold answers left) has
  the single gold answer "", and F1 between token lists where either is empty is 1 if both are empty,
  else 0. It also reports the `HasAns_` and `NoAns_` breakdowns (answerable / unanswerable questions) and,
  given each question's no-answer odds, the best exact match / F1 over all no-answer thresholds.
Plain Python: no network, no `evaluate` library.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles removed, white space collapsed (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_v1(prediction: str, gold: str) -> float:
    """Token F1 of the v1.1 script: 0 when no normalised token is shared."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    return _overlap_f1(predicted, expected)


def f1_v2(prediction: str, gold: str) -> float:
    """Token F1 of the v2.0 script: an empty side scores 1 only against another empty side."""
    predicted, expected = _tokens(prediction), _tokens(gold)
    if not predicted or not expected:
        return float(predicted == expected)
    return _overlap_f1(predicted, expected)


def _overlap_f1(predicted: list[str], expected: list[str]) -> float:
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(predictions: Iterable[str], golds: Iterable[list[str]]) -> dict[str, float]:
    """`exact_match` and `f1` (0-100) of the v1.1 script; every question needs at least one gold answer."""
    exact = f1 = 0.0
    count = 0
    for prediction, answers in zip(predictions, golds, strict=True):
        if not answers:
            raise ValueError("SQuAD v1.1 scoring needs at least one gold answer per question")
        exact += max(exact_match(prediction, a) for a in answers)
        f1 += max(f1_v1(prediction, a) for a in answers)
        count += 1
    return {"exact_match": 100.0 * exact / count, "f1": 100.0 * f1 / count, "total": count} if count else {}


def squad_v2_scores(predictions: Iterable[str], golds: Iterable[list[str]]) -> dict[str, float]:
    """`exact_match`, `f1` and the `HasAns_` / `NoAns_` breakdowns (0-100) of the v2.0 script.

    A question is answerable when its gold list (as given, before normalisation) is non-empty; the
    empty prediction "" means "no answer".
    """
    groups: dict[str, list[tuple[int, float]]] = {"HasAns": [], "NoAns": []}
    for prediction, answers in zip(predictions, golds, strict=True):
        kept = [a for a in answers if normalize_answer(a)] or [""]
        scores = (max(exact_match(prediction, a) for a in kept), max(f1_v2(prediction, a) for a in kept))
        groups["HasAns" if answers else "NoAns"].append(scores)
    everything = groups["HasAns"] + groups["NoAns"]
    if not everything:
        return {}
    metrics = _averages("", everything)
    for name, scores in groups.items():
        if scores:
            metrics.update(_averages(name + "_", scores))
    return metrics


def _averages(prefix: str, scores: list[tuple[int, float]]) -> dict[str, float]:
    exact = "exact_match" if not prefix else "exact"  # the v2.0 script's own names: HasAns_exact, NoAns_f1
    return {
        prefix + exact: 100.0 * sum(e for e, _ in scores) / len(scores),
        prefix + "f1": 100.0 * sum(f for _, f in scores) / len(scores),
        prefix + "total": len(scores),
    }


def best_null_thresholds(spans: list[str], null_gaps: list[float], golds: list[list[str]]) -> dict[str, float]:
    """`best_exact`, `best_f1` (0-100) and the thresholds reaching them, as the v2.0 script computes them
    from a prediction that always answers (`spans`) and the no-answer odds (`null_gaps`).

    A question is answered with its span when its gap is at most the threshold, else with "". Starting from
    every question unanswered, questions are taken in order of increasing gap: an answerable one gains its
    span's score, an unanswerable one loses 1 if its span is non-empty; the best running total wins (first
    reached; threshold 0.0 when answering nothing is best, as in the script). The thresholds are tuned on
    the evaluation set itself: an upper bound for the `null_threshold` setting, not a held-out score.
    """
    metrics: dict[str, float] = {}
    answerable = [bool(answers) for answers in golds]
    for name, score in (("exact", exact_match), ("f1", f1_v2)):
        total = best = float(answerable.count(False))
        threshold = 0.0
        for i in sorted(range(len(spans)), key=lambda k: null_gaps[k]):
            if answerable[i]:
                kept = [a for a in golds[i] if normalize_answer(a)] or [""]
                total += max(score(spans[i], a) for a in kept)
            elif spans[i]:
                total -= 1
            if total > best:
                best, threshold = total, null_gaps[i]
        metrics[f"best_{name}"] = 100.0 * best / len(spans) if spans else 0.0
        metrics[f"best_{name}_thresh"] = threshold
    return metrics
