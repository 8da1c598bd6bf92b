"""Metrics of a survival endpoint (prognosis, relapse): Kaplan-Meier, C-indices, time-dependent AUC, Brier score,
log-rank test, and ``survival_metrics``, all of them with bootstrap confidence intervals.

Everything here is plain numpy and takes array-likes: numpy arrays, lists or torch tensors (on any device).
Conventions: ``time`` is follow-up time, ``event`` is 1 where the event was observed and 0 where follow-up was
censored, ``risk`` is higher for patients expected to have the event sooner.

The survival estimators follow the definitions of scikit-survival (tie handling included), so numbers can be
compared with results published with that library; the tests use it, lifelines and scikit-learn as references.
The censoring distribution for inverse-probability-of-censoring weights (IPCW) is the Kaplan-Meier estimate on
``train_time``/``train_event`` when given, else on the evaluation data itself.

Malformed input raises ``ValueError``; data that do not define a metric (no comparable pairs, a time past the end of
follow-up) raise ``UndefinedMetricError`` (``fedmusk.evaluation.arrays``). ``survival_metrics`` reports such
metrics as None with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from fedmusk.evaluation.arrays import UndefinedMetricError, as_array, binary_labels, same_length, vector
from fedmusk.evaluation.binary import roc_points, tie_groups, trapezoid_area
from fedmusk.evaluation.bootstrap import record

TIED_TOL = 1e-8  # risk scores closer than this count as tied (scikit-survival's default)


class LogRankResult(NamedTuple):
    statistic: float
    p_value: float
    df: int


def survival_arrays(time: Any, event: Any, risk: Any | None = None) -> tuple[np.ndarray, ...]:
    arrays = {"time": vector(time, "time"), "event": binary_labels(event, "event")}
    if risk is not None:
        arrays["risk"] = vector(risk, "risk")
    same_length(**arrays)
    return tuple(arrays.values())


def _eval_times(times: Any, time: np.ndarray) -> np.ndarray:
    times = np.atleast_1d(as_array(times).astype(float))
    if times.ndim != 1 or len(times) == 0 or not np.isfinite(times).all():
        raise ValueError("times must be a non-empty one-dimensional array of finite values")
    if np.any(np.diff(times) <= 0):
        raise ValueError("times must be strictly increasing")
    if len(time) == 0 or times[0] < time.min() or times[-1] >= time.max():
        span = f"[{time.min():g}, {time.max():g})" if len(time) else "empty"
        raise UndefinedMetricError(f"evaluation times must lie within the follow-up {span}")
    return times


# ---------------------------------------------------------------------------------------- Kaplan-Meier pieces


def _risk_table(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per distinct time: the time, number at risk just before it, events at it, censorings at it."""
    if len(time) == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    order = np.argsort(time, kind="stable")
    uniq, first, counts = np.unique(time[order], return_index=True, return_counts=True)
    n_events = np.add.reduceat(event[order].astype(float), first)
    return uniq, len(time) - first.astype(float), n_events, counts - n_events


def step(knots: np.ndarray, values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Right-continuous step function that is 1 before the first knot."""
    idx = np.searchsorted(knots, t, side="right") - 1
    return np.where(idx >= 0, values[np.maximum(idx, 0)], 1.0)


def kaplan_meier(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival curve: the distinct observed times and S(t) just after each of them."""
    time, event = survival_arrays(time, event)
    uniq, at_risk, n_events, _ = _risk_table(time, event)
    return uniq, np.cumprod(1.0 - n_events / np.maximum(at_risk, 1.0))


def _censoring_survival(time: np.ndarray, event: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """G(t) = P(censoring time > t), by Kaplan-Meier with the roles of event and censoring swapped."""
    uniq, at_risk, n_events, n_censored = _risk_table(time, event)
    # events at the same time leave before the censorings (scikit-survival's convention)
    ratio = np.divide(n_censored, at_risk - n_events, out=np.zeros(len(uniq)), where=n_censored > 0)
    surv = np.cumprod(1.0 - ratio)

    def survival(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        if t.size and (len(uniq) == 0 or (np.any(t > uniq[-1]) and surv[-1] > 0)):
            end = f"{uniq[-1]:g}" if len(uniq) else "none"
            raise UndefinedMetricError(f"time past the censoring data's last follow-up ({end}); IPCW undefined")
        return step(uniq, surv, t)

    return survival


def _training_censoring(time, event, train_time, train_event) -> Callable[[np.ndarray], np.ndarray]:
    if (train_time is None) != (train_event is None):
        raise ValueError("give both train_time and train_event, or neither")
    if train_time is None:
        return _censoring_survival(time, event)
    return _censoring_survival(*survival_arrays(train_time, train_event))


def _inverse(g: np.ndarray, what: str) -> np.ndarray:
    if np.any(g <= 0):
        raise UndefinedMetricError(f"censoring survival is zero at {what}; choose an earlier tau or times")
    return 1.0 / g


# ------------------------------------------------------------------------------------------------ concordance


def _count_later_below(rank: np.ndarray, query_pos: np.ndarray, query_rank: np.ndarray) -> np.ndarray:
    """For each query q: how many positions p > query_pos[q] hold rank[p] < query_rank[q].

    Divide and conquer over positions, vectorised per level: every (query, element) pair is counted at the one
    level where their positions fall in the two halves of the same block. O(n log^2 n) in all.
    """
    counts = np.zeros(len(query_pos), dtype=np.int64)
    positions = np.arange(len(rank))
    stride = int(rank.max(initial=0)) + 2  # keys block * stride + rank never collide across blocks
    half = 1
    while half < len(rank):
        right = (positions // half) % 2 == 1
        keys = np.sort((positions[right] // (2 * half)) * stride + rank[right])
        left = (query_pos // half) % 2 == 0
        base = (query_pos[left] // (2 * half)) * stride
        counts[left] += np.searchsorted(keys, base + query_rank[left]) - np.searchsorted(keys, base)
        half *= 2
    return counts


def _concordance(time, event, risk, weights, tied_tol) -> float:
    """Weighted share of comparable pairs ordered correctly by risk; ties in risk count 1/2.

    A pair (i, j) is comparable when i had the event and j was still followed afterwards: t_j > t_i, or
    t_j == t_i with j censored. Each pair counts with the weight of its earlier member i.
    """
    # order by time with events first among equal times: i's partners are then exactly the positions after
    # the last event at t_i
    order = np.lexsort((~event, time))
    time, event, risk, weights = time[order], event[order], risk[order], weights[order]
    n_events_at = np.searchsorted(time[event], time, side="right") - np.searchsorted(time[event], time, side="left")
    first_at = np.searchsorted(time, time, side="left")
    last_event_at = first_at + n_events_at - 1
    cases = np.flatnonzero(event & (weights > 0))
    query_pos = last_event_at[cases]
    n_comparable = len(time) - 1 - query_pos
    levels = np.unique(risk)
    rank = np.searchsorted(levels, risk)
    below = _count_later_below(rank, query_pos, np.searchsorted(levels, risk[cases] - tied_tol, side="left"))
    not_above = _count_later_below(rank, query_pos, np.searchsorted(levels, risk[cases] + tied_tol, side="right"))
    w = weights[cases]
    denominator = float(w @ n_comparable)
    if denominator == 0:
        raise UndefinedMetricError("no comparable pairs (needs an event followed by a longer follow-up)")
    return float(w @ (below + 0.5 * (not_above - below))) / denominator


def harrell_c_index(time: Any, event: Any, risk: Any, tied_tol: float = TIED_TOL) -> float:
    """Harrell's concordance index, as scikit-survival's ``concordance_index_censored`` (first value).

    1 means risk orders every comparable pair correctly, 0.5 is chance. Raises UndefinedMetricError when no
    pair is comparable (e.g. no events).
    """
    time, event, risk = survival_arrays(time, event, risk)
    return _concordance(time, event, risk, np.ones(len(time)), tied_tol)


def uno_c_index(
    time: Any,
    event: Any,
    risk: Any,
    train_time: Any | None = None,
    train_event: Any | None = None,
    tau: float | None = None,
    tied_tol: float = TIED_TOL,
) -> float:
    """Uno's IPCW concordance index (Uno et al. 2011), as scikit-survival's ``concordance_index_ipcw``.

    Each comparable pair is weighted by 1 / G(t_i)^2, G being the Kaplan-Meier censoring survival on the
    training data (the evaluation data when not given). With ``tau``, only pairs whose earlier time is below
    tau count. Raises UndefinedMetricError when no pair is comparable or G is zero (or unknown, past the
    training follow-up) at a needed event time; a ``tau`` below the last follow-up avoids the latter.
    """
    time, event, risk = survival_arrays(time, event, risk)
    censoring = _training_censoring(time, event, train_time, train_event)
    weights = np.zeros(len(time))
    if len(time):
        # events without any comparable partner get no weight, so G is not needed (and may be 0) there
        last = time == time.max()
        used = event & ((time < time.max()) | np.any(last & ~event))
        if tau is not None:
            used &= time < tau
        weights[used] = _inverse(censoring(time[used]), "an event time") ** 2
    return _concordance(time, event, risk, weights, tied_tol)




def time_dependent_auc(
    time: Any,
    event: Any,
    risk: Any,
    times: Any,
    train_time: Any | None = None,
    train_event: Any | None = None,
    tied_tol: float = TIED_TOL,
) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC with IPCW, as scikit-survival's ``cumulative_dynamic_auc``.

    At each t in ``times`` (strictly increasing, within [min, max) of ``time``) cases are events by t, weighted
    by 1 / G(t_i), and controls are patients still followed after t. Returns the AUC per time and their mean
    weighted by the drops of the Kaplan-Meier curve of the evaluation data (the plain value for one time).
    """
    time, event, risk = survival_arrays(time, event, risk)
    times = _eval_times(times, time)
    censoring = _training_censoring(time, event, train_time, train_event)
    groups, _ = tie_groups(risk, tied_tol)
    auc = np.empty(len(times))
    for k, t in enumerate(times):
        case = event & (time <= t)
        if not case.any():
            raise UndefinedMetricError(f"no events by time {t:g}")
        weights = np.zeros(len(time))
        weights[case] = _inverse(censoring(time[case]), "an event time")
        fpr, tpr = roc_points(groups, weights, (time > t).astype(float))
        auc[k] = trapezoid_area(fpr, tpr)
    if len(times) == 1:
        return auc, float(auc[0])
    km_time, km_surv = kaplan_meier(time, event)
    surv = step(km_time, km_surv, times)
    drops = -np.diff(np.r_[1.0, surv])
    return auc, float(np.sum(auc * drops) / (1.0 - surv[-1]))


# ------------------------------------------------------------------------------------------------ Brier score


def brier_score(
    time: Any,
    event: Any,
    survival_prob: Any,
    times: Any,
    train_time: Any | None = None,
    train_event: Any | None = None,
) -> np.ndarray:
    """IPCW Brier score at each of ``times`` (Graf et al. 1999), as scikit-survival's ``brier_score``.

    ``survival_prob[i, k]`` is the predicted P(T_i > times[k]). Events by t are weighted 1 / G(t_i), patients
    followed past t by 1 / G(t); patients censored before t drop out.
    """
    time, event = survival_arrays(time, event)
    times = _eval_times(times, time)
    prob = as_array(survival_prob).astype(float)
    if prob.shape != (len(time), len(times)):
        raise ValueError(f"survival_prob must have shape {(len(time), len(times))}, got {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("survival_prob contains NaN or infinite values")
    censoring = _training_censoring(time, event, train_time, train_event)
    case = event[:, None] & (time[:, None] <= times)
    control = time[:, None] > times
    inv_g_time = np.ones(len(time))
    needed = case.any(axis=1)
    inv_g_time[needed] = _inverse(censoring(time[needed]), "an event time")
    inv_g_t = _inverse(censoring(times), "an evaluation time")
    losses = case * prob**2 * inv_g_time[:, None] + control * (1.0 - prob) ** 2 * inv_g_t
    return losses.mean(axis=0)


def integrated_brier_score(
    time: Any,
    event: Any,
    survival_prob: Any,
    times: Any,
    train_time: Any | None = None,
    train_event: Any | None = None,
) -> float:
    """Brier score integrated over ``times`` by the trapezoid rule and divided by the time span (lower is better)."""
    if np.size(as_array(times)) < 2:
        raise ValueError("the integrated Brier score needs at least two times")
    scores = brier_score(time, event, survival_prob, times, train_time, train_event)
    times = as_array(times).astype(float)
    return trapezoid_area(times, scores) / float(times[-1] - times[0])


# --------------------------------------------------------------------------------------------- log-rank test


def _chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-squared distribution for integer df (closed forms, no scipy needed)."""
    if x <= 0:
        return 1.0
    h = x / 2.0
    if df % 2 == 0:
        term = total = 1.0
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return math.exp(-h) * total
    total, term = math.erfc(math.sqrt(h)), math.sqrt(h) / math.gamma(1.5)
    for i in range(1, (df + 1) // 2):
        total += math.exp(-h) * term
        term *= h / (i + 0.5)
    return min(1.0, total)


def logrank_test(time: Any, event: Any, group: Any) -> LogRankResult:
    """Log-rank test that survival is the same in all groups (chi-squared with groups - 1 degrees of freedom).

    ``group`` holds one label per patient (any values). Raises UndefinedMetricError with fewer than two groups
    or no events.
    """
    time, event = survival_arrays(time, event)
    labels, group = np.unique(as_array(group), return_inverse=True)
    same_length(time=time, group=group)
    if len(labels) < 2:
        raise UndefinedMetricError("the log-rank test needs at least two groups")
    event_times = np.unique(time[event])
    if len(event_times) == 0:
        raise UndefinedMetricError("the log-rank test needs at least one event")
    at_risk, deaths = [], []
    for g in range(len(labels)):
        member_times, member_events = np.sort(time[group == g]), np.sort(time[(group == g) & event])
        at_risk.append(len(member_times) - np.searchsorted(member_times, event_times, side="left"))
        ends = np.searchsorted(member_events, event_times, "right")
        deaths.append(ends - np.searchsorted(member_events, event_times, "left"))
    at_risk, deaths = np.array(at_risk, dtype=float), np.array(deaths, dtype=float)  # (groups, event times)
    n, d = at_risk.sum(axis=0), deaths.sum(axis=0)
    share = at_risk / n
    spread = np.divide(d * (n - d), n - 1, out=np.zeros_like(n), where=n > 1)  # hypergeometric variance factor
    observed_minus_expected = (deaths - share * d).sum(axis=1)
    covariance = np.diag((share * spread).sum(axis=1)) - np.einsum("gm,hm,m->gh", share, share, spread)
    z = observed_minus_expected[:-1]  # one group is redundant: the differences sum to zero
    statistic = float(z @ np.linalg.pinv(covariance[:-1, :-1]) @ z)
    df = len(labels) - 1
    return LogRankResult(statistic, _chi2_sf(statistic, df), df)


# ----------------------------------------------------------------------------------------------------- summary


def _default_times(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Quartiles of the observed event times that lie within the follow-up."""
    if not event.any():
        return np.zeros(0)
    times = np.unique(np.quantile(time[event], [0.25, 0.5, 0.75]))
    return times[(times >= time.min()) & (times < time.max())]


def survival_metrics(
    time: Any,
    event: Any,
    risk: Any,
    *,
    survival_prob: Any | None = None,
    times: Any | None = None,
    train_time: Any | None = None,
    train_event: Any | None = None,
    tau: float | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """All survival metrics with bootstrap CIs, as a JSON-ready dict.

    Keys: ``c_index``, ``c_index_uno``, ``td_auc`` (mean over ``times``), ``ibs`` (needs ``survival_prob`` of
    shape (n, len(times))), each with ``<key>_ci`` = [low, high]; ``td_auc_per_time``, ``times``, ``n``,
    ``n_events``, ``tau``, ``alpha``, ``n_boot``. ``times`` defaults to the quartiles of the event times.
    An undefined metric is None and ``reasons[key]`` says why; nothing is raised for data-dependent problems.
    """
    time, event, risk = survival_arrays(time, event, risk)
    if survival_prob is not None and times is None:
        raise ValueError("survival_prob needs the times its columns refer to")
    times = _default_times(time, event) if times is None else as_array(times).astype(float)
    out: dict[str, Any] = {"n": len(time), "n_events": int(event.sum()), "times": [float(t) for t in times]}
    out.update(tau=None if tau is None else float(tau), alpha=alpha, n_boot=n_boot)
    reasons: dict[str, str] = {}
    boot = dict(n_boot=n_boot, alpha=alpha, seed=seed)
    survival_data = (time, event, risk)

    record(out, reasons, "c_index", harrell_c_index, survival_data, **boot)

    def uno(t, e, r):
        return uno_c_index(t, e, r, train_time, train_event, tau)

    record(out, reasons, "c_index_uno", uno, survival_data, **boot)

    def mean_td_auc(t, e, r):
        return time_dependent_auc(t, e, r, times, train_time, train_event)[1]

    if len(times) == 0:
        out["td_auc"], out["td_auc_ci"], out["td_auc_per_time"] = None, None, None
        reasons["td_auc"] = "no event times inside the follow-up to evaluate at"
    else:
        record(out, reasons, "td_auc", mean_td_auc, survival_data, **boot)
        if out["td_auc"] is None:
            out["td_auc_per_time"] = None
        else:
            per_time = time_dependent_auc(time, event, risk, times, train_time, train_event)[0]
            out["td_auc_per_time"] = [float(a) for a in per_time]

    if survival_prob is None:
        out["ibs"], out["ibs_ci"], reasons["ibs"] = None, None, "no survival probabilities given"
    else:

        def ibs(t, e, p):
            return integrated_brier_score(t, e, p, times, train_time, train_event)

        record(out, reasons, "ibs", ibs, (time, event, as_array(survival_prob).astype(float)), **boot)
    out["reasons"] = reasons
    return out
