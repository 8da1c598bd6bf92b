"""Byzantine-robust aggregates: coordinate-wise median and trimmed mean (Yin et al. 2018).

Plain mode only: both need every site's individual update, which secure aggregation exists to hide, so they cannot
run under SecAgg+. Both are unweighted on purpose: example counts are self-reported, and a site that lies about
them could otherwise buy the influence the robust rule is meant to deny it. Like FedIT, they act on the A and B
factors separately, so for LoRA layers they robustly aggregate the factors, not the products ``B @ A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedmusk.strategies.aggregation import StateDict, check_compatible

# A median of two values is their mean: one outlier moves it arbitrarily far.
MIN_UPDATES_FOR_MEDIAN = 3


def _stacked(updates: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """Updates of one tensor sorted along a new leading axis, in float64: (n, *shape)."""
    return torch.stack([u[name].to(torch.float64) for u in updates]).sort(dim=0).values


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Element-wise median over sites (the mean of the two middle values for an even count).

    Raises ValueError with fewer than ``MIN_UPDATES_FOR_MEDIAN`` updates, where the median resists no outlier.
    """
    names = check_compatible(updates)
    n = len(updates)
    if n < MIN_UPDATES_FOR_MEDIAN:
        raise ValueError(
            f"a coordinate-wise median of {n} updates resists no outlier; need >= {MIN_UPDATES_FOR_MEDIAN}"
        )
    out: StateDict = {}
    for name in names:
        s = _stacked(updates, name)
        mid = s[(n - 1) // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        out[name] = mid.to(updates[0][name].dtype)
    return out


def trim_count(n_updates: int, beta: float) -> int:
    """How many values ``trimmed_mean`` drops at each end: floor(beta n).

    Raises ValueError when beta is outside [0, 0.5), when beta > 0 but the count is too small to drop any value
    (the trim would silently be a plain mean), or when nothing would remain.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta must lie in [0, 0.5), got {beta}")
    k = math.floor(beta * n_updates + 1e-9)  # tolerance: 0.3 * 10 must give 3
    if beta > 0 and k == 0:
        need = math.ceil(1.0 / beta - 1e-9)
        raise ValueError(
            f"trim fraction {beta} of {n_updates} updates drops none; need at least {need} updates for this trim"
        )
    if n_updates - 2 * k < 1:
        raise ValueError(f"trimming {k} from each end of {n_updates} updates leaves nothing")
    return k


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], beta: float) -> StateDict:
    """Element-wise mean after dropping the ``floor(beta n)`` largest and smallest values of each coordinate.

    Tolerates up to that many arbitrary sites per coordinate. Raises ValueError (see ``trim_count``) when there are
    too few updates for the requested trim.
    """
    names = check_compatible(updates)
    k = trim_count(len(updates), beta)
    out: StateDict = {}
    for name in names:
        s = _stacked(updates, name)
        out[name] = s[k : len(updates) - k].mean(dim=0).to(updates[0][name].dtype)
    return out
