"""Evaluation metrics in numpy/pure Python (scikit-learn/scipy are only used by the tests, to check these).

The metric functions take predictions first and return fractions; `compute_metrics` scores a task's
generated texts and reports percentages (x100, as the paper does) plus the count of invalid predictions.

Invalid predictions (text outside the label set, or not a number for regression) always count as wrong:
- classification, binary F1 (`f1`): the label opposite to the reference (a false negative or a false
  positive), as the authors' `f1_score_with_invalid` does;
- classification, every other metric (accuracy, macro-F1, Matthews correlation): the prediction text itself,
  a class of its own that matches no task label, as scikit-learn does on the raw predictions (the authors call
  `sklearn.metrics.matthews_corrcoef` and `fbeta_score(labels=range(n))` on the stripped generations);
- regression: it becomes the end of the references' range farthest from its reference (the worst in-range
  guess), so a model cannot gain correlation by emitting garbage. A fixed value such as 0.0 would count as
  a good guess on low-similarity pairs.

Extractive QA: `squad_em` / `squad_f1` take the best score over every gold answer (the MRQA evaluation);
`squad_em_first` / `squad_f1_first` score against the first gold answer only, as the authors' code does (their
target is `answers[0]`), which is how the paper's MRQA numbers were computed.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np

from pipeline.errors import PipelineError

QA_METRICS = ("squad_em", "squad_f1", "squad_em_first", "squad_f1_first")
METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews_corrcoef", "pearson", "spearman", *QA_METRICS)
KIND_METRICS = {
    "classification": ("accuracy", "f1", "macro_f1", "matthews_corrcoef"),
    "regression": ("pearson", "spearman"),
    "qa": QA_METRICS,
}


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise PipelineError(
            f"{len(predictions)} predictions for {len(references)} references: score complete runs only"
        )
    if not len(predictions):
        raise PipelineError("no predictions to score: the evaluation set is empty")


# Classification ---------------------------------------------------------------------------------------


def accuracy(predictions: list, references: list) -> float:
    """Fraction of predictions equal to their reference."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def f1(predictions: list, references: list, positive: str = "1") -> float:
    """Binary F1 of the `positive` class; 0.0 when it has no true positive (scikit-learn's convention)."""
    _check_lengths(predictions, references)
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(predictions: list, references: list, labels: list | tuple | None = None) -> float:
    """Unweighted mean of per-class F1 over `labels` (default: every class seen in either list)."""
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
    return sum(f1(predictions, references, positive=label) for label in labels) / len(labels)


def matthews_corrcoef(predictions: list, references: list) -> float:
    """Matthews correlation (multi-class form of Gorodkin); 0.0 when undefined (a constant column)."""
    _check_lengths(predictions, references)
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    true_counts, pred_counts = Counter(references), Counter(predictions)
    classes = set(true_counts) | set(pred_counts)
    cov_true_pred = correct * n - sum(true_counts[c] * pred_counts[c] for c in classes)
    cov_pred = n * n - sum(count * count for count in pred_counts.values())
    cov_true = n * n - sum(count * count for count in true_counts.values())
    if cov_pred == 0 or cov_true == 0:
        return 0.0
    return cov_true_pred / math.sqrt(cov_true * cov_pred)


# Regression -------------------------------------------------------------------------------------------


def pearson(predictions: list, references: list) -> float:
    """Pearson correlation; 0.0 when a side is constant (undefined: no linear relation can be shown)."""
    _check_lengths(predictions, references)
    x = np.asarray(predictions, dtype=np.float64) - np.mean(predictions)
    y = np.asarray(references, dtype=np.float64) - np.mean(references)
    denominator = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return 0.0 if denominator == 0 else max(-1.0, min(1.0, float(np.dot(x, y)) / denominator))


def average_ranks(values: list) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their positions (scipy's `rankdata` 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: list, references: list) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    _check_lengths(predictions, references)
    return pearson(average_ranks(predictions), average_ranks(references))


# Extractive QA (SQuAD v1.1 conventions, as the MRQA evaluation uses) -----------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when both normalise to the same text."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised token bags (0.0 when they share no token, even if both are empty, as SQuAD v1.1)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def _best_over_golds(score, predictions: list[str], answers: list[list[str]]) -> float:
    _check_lengths(predictions, answers)
    for golds in answers:
        if not golds:
            raise PipelineError("a QA reference has no gold answer: every example needs at least one")
    return sum(max(score(p, g) for g in golds) for p, golds in zip(predictions, answers)) / len(answers)


def squad_em(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean over examples of the best exact match against any gold answer."""
    return _best_over_golds(exact_match, predictions, answers)


def squad_f1(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean over examples of the best token F1 against any gold answer."""
    return _best_over_golds(token_f1, predictions, answers)


# Task-level scoring -----------------------------------------------------------------------------------


def _as_float(text: object) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _classification_scores(task, predictions: list[str], references: list) -> tuple[dict, int]:
    # Surrounding whitespace is ignored (decoders often emit it; the authors strip too); nothing else is.
    predictions = [str(p).strip() for p in predictions]
    references = [str(r).strip() for r in references]
    # Custom tasks without label_words have no declared label set: the references' classes stand in.
    label_set = list(task.labels) if task.labels is not None else sorted(set(references))
    invalid = [p not in label_set for p in predictions]

    def opposite(prediction: str, reference: str, bad: bool) -> str:
        if bad and len(label_set) == 2 and reference in label_set:
            return label_set[1 - label_set.index(reference)]
        return prediction

    # Binary F1 only: an invalid prediction becomes the wrong label (the authors' f1_score_with_invalid).
    for_f1 = [opposite(p, r, bad) for p, r, bad in zip(predictions, references, invalid)]
    functions = {
        "accuracy": lambda: accuracy(predictions, references),
        "f1": lambda: f1(for_f1, references, positive="1"),
        "macro_f1": lambda: macro_f1(predictions, references, labels=label_set),
        "matthews_corrcoef": lambda: matthews_corrcoef(predictions, references),
    }
    return {name: functions[name]() for name in task.metrics}, sum(invalid)


def _regression_scores(task, predictions: list, references: list) -> tuple[dict, int]:
    truth = []
    for reference in references:
        value = _as_float(reference)
        if value is None:
            raise PipelineError(f"reference {reference!r} of task {task.name!r} is not a number")
        truth.append(value)
    low, high = min(truth), max(truth)
    parsed = [_as_float(p) for p in predictions]
    scored = [p if p is not None else (high if t - low < high - t else low) for p, t in zip(parsed, truth)]
    functions = {"pearson": pearson, "spearman": spearman}
    return {name: functions[name](scored, truth) for name in task.metrics}, sum(p is None for p in parsed)


def _qa_scores(task, predictions: list[str], references: list, answers) -> tuple[dict, int]:
    golds = answers if answers is not None else [[str(r)] for r in references]
    # The authors' target is the first gold answer (answers[0]); without `answers` the reference is that one.
    firsts = [[g[0]] if g else [] for g in golds]
    functions = {
        "squad_em": lambda p: squad_em(p, golds),
        "squad_f1": lambda p: squad_f1(p, golds),
        "squad_em_first": lambda p: squad_em(p, firsts),
        "squad_f1_first": lambda p: squad_f1(p, firsts),
    }
    return {name: functions[name]([str(p) for p in predictions]) for name in task.metrics}, 0


def compute_metrics(task, predictions: list[str], references: list, answers: list[list[str]] | None = None) -> dict:
    """The task's metrics in percent (first = the headline metric) plus `"invalid"`, the unusable predictions.
    The task's `selection_metric` (checkpoint choice) is one of them.

    `references` are target strings; for QA pass `answers` (all gold answers per example, the first one being
    the reference) to score against every gold answer, else only the reference counts.
    """
    _check_lengths(predictions, references)
    if answers is not None:
        _check_lengths(predictions, answers)
    allowed = KIND_METRICS[task.kind]
    wrong = [name for name in task.metrics if name not in allowed]
    if wrong:
        raise PipelineError(
            f"task {task.name!r} ({task.kind}) cannot report {', '.join(wrong)}; use {', '.join(allowed)}"
        )
    if task.kind == "classification":
        scores, invalid = _classification_scores(task, predictions, references)
    elif task.kind == "regression":
        scores, invalid = _regression_scores(task, predictions, references)
    else:
        scores, invalid = _qa_scores(task, predictions, references, answers)
    return {**{name: 100.0 * value for name, value in scores.items()}, "invalid": invalid}
