"""Metrics of a binary endpoint (immunotherapy response): ROC curve, AUROC and AUPRC, as scikit-learn defines them,
and ``response_metrics``, all of them with bootstrap confidence intervals. ``y`` is 1 for responders, ``score`` is
higher for patients more likely to respond. The ROC pieces also serve the time-dependent AUC of survival."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmusk.evaluation.arrays import UndefinedMetricError, binary_labels, same_length, vector
from fedmusk.evaluation.bootstrap import record


def tie_groups(score: np.ndarray, tied_tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each score's tie group, 0 for the highest, and each group's highest score."""
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    starts = np.r_[True, np.abs(np.diff(ranked)) > tied_tol]
    groups = np.empty(len(score), dtype=int)
    groups[order] = np.cumsum(starts) - 1
    return groups, ranked[starts]


def roc_points(groups: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (FPR, TPR) of weighted positives/negatives, one point per threshold, starting at (0, 0)."""
    tp = np.r_[0.0, np.cumsum(np.bincount(groups, weights=positive))]
    fp = np.r_[0.0, np.cumsum(np.bincount(groups, weights=negative))]
    return fp / fp[-1], tp / tp[-1]


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> float:
    """The area under the polyline through (x, y), by the trapezoid rule."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _labels_and_scores(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y, score = binary_labels(y, "y"), vector(score, "score")
    same_length(y=y, score=score)
    if y.all() or not y.any():
        raise UndefinedMetricError("needs both classes (responders and non-responders)")
    return y, score


def roc_curve(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from (0, 0) to (1, 1)."""
    y, score = _labels_and_scores(y, score)
    groups, thresholds = tie_groups(score, 0.0)
    fpr, tpr = roc_points(groups, y.astype(float), (~y).astype(float))
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(y: Any, score: Any) -> float:
    """Area under the ROC curve (ties in score count 1/2), as scikit-learn's ``roc_auc_score``."""
    fpr, tpr, _ = roc_curve(y, score)
    return trapezoid_area(fpr, tpr)


def auprc(y: Any, score: Any) -> float:
    """Average precision, as scikit-learn's ``average_precision_score``: sum over thresholds of P * delta R.

    Raises UndefinedMetricError unless both classes are present (with no negatives it would be trivially 1).
    """
    y, score = _labels_and_scores(y, score)
    groups, _ = tie_groups(score, 0.0)
    tp = np.cumsum(np.bincount(groups, weights=y.astype(float)))
    predicted = np.cumsum(np.bincount(groups))
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / predicted))


def response_metrics(y: Any, score: Any, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """AUROC and AUPRC with bootstrap CIs, as a JSON-ready dict.

    Keys: ``auc``, ``auc_ci``, ``auprc``, ``auprc_ci``, ``n``, ``n_positive``, ``prevalence``, ``alpha``,
    ``n_boot``. An undefined metric (one class only) is None and ``reasons[key]`` says why.
    """
    y, score = binary_labels(y, "y"), vector(score, "score")
    same_length(y=y, score=score)
    out: dict[str, Any] = {"n": len(y), "n_positive": int(y.sum())}
    out["prevalence"] = float(y.mean()) if len(y) else None
    out.update(alpha=alpha, n_boot=n_boot)
    reasons: dict[str, str] = {}
    for key, metric_fn in (("auc", auroc), ("auprc", auprc)):
        record(out, reasons, key, metric_fn, (y, score), n_boot=n_boot, alpha=alpha, seed=seed)
    out["reasons"] = reasons
    return out
