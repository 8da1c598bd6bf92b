"""The array-like inputs of the metrics (numpy arrays, lists, torch tensors on any device) checked and turned into
numpy, and the error for data that do not define a metric.

Two kinds of error: malformed input (wrong shapes, NaN, unsorted ``times``) raises ``ValueError``; data that do
not define the metric (one class only, no comparable pairs, a time past the end of follow-up) raise
:class:`UndefinedMetricError`; a bootstrap skips resamples that raise it, and ``survival_metrics`` /
``response_metrics`` report such metrics as None with a reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class UndefinedMetricError(ValueError):
    """The data at hand do not define the metric (e.g. one class only, no comparable pairs)."""


def as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on a GPU or requiring grad
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def vector(x: Any, name: str) -> np.ndarray:
    arr = as_array(x).astype(float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def binary_labels(x: Any, name: str) -> np.ndarray:
    arr = vector(x, name)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must contain only 0/1 (or False/True)")
    return arr.astype(bool)


def same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")
