"""Bootstrap confidence intervals: resample cases with replacement, skip resamples that do not define the metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from fedmusk.evaluation.arrays import UndefinedMetricError, as_array, same_length


class BootstrapCI(NamedTuple):
    point: float
    low: float | None
    high: float | None


def _bootstrap_values(metric_fn: Callable[..., float], arrays: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            value = float(metric_fn(*(a[idx] for a in arrays)))
        except UndefinedMetricError:
            continue
        if math.isfinite(value):
            values.append(value)
    return np.asarray(values)


def bootstrap_ci(
    metric_fn: Callable[..., float], *arrays: Any, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> BootstrapCI:
    """Point estimate and percentile (1 - alpha) confidence interval from resampling cases with replacement.

    ``arrays`` (each indexed by case along axis 0) are resampled together and passed to ``metric_fn``.
    Resamples where the metric raises UndefinedMetricError or is not finite are skipped; ``low`` and ``high``
    are None when no resample gave a value. The point estimate itself raises UndefinedMetricError if undefined.
    """
    arrays = [as_array(a) for a in arrays]
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    same_length(**{f"array {k}": a for k, a in enumerate(arrays)})
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    point = float(metric_fn(*arrays))
    values = _bootstrap_values(metric_fn, arrays, n_boot, seed) if len(arrays[0]) else np.zeros(0)
    if len(values) == 0:
        return BootstrapCI(point, None, None)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(point, float(low), float(high))


def record(out: dict, reasons: dict, key: str, metric_fn, arrays, n_boot: int, alpha: float, seed: int) -> None:
    try:
        ci = bootstrap_ci(metric_fn, *arrays, n_boot=n_boot, alpha=alpha, seed=seed)
    except UndefinedMetricError as err:
        out[key], out[f"{key}_ci"], reasons[key] = None, None, str(err)
        return
    out[key] = ci.point
    out[f"{key}_ci"] = None if ci.low is None else [ci.low, ci.high]
