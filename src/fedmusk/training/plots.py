"""Report figures: Kaplan-Meier curves by predicted risk group, ROC curves, metrics per federated round.

Figures are built on matplotlib's object API with the Agg renderer (no pyplot, so no display is needed and no
global figure registry keeps them alive); each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmusk.evaluation.arrays import UndefinedMetricError, binary_labels
from fedmusk.evaluation.binary import auroc, roc_curve
from fedmusk.evaluation.survival import kaplan_meier, logrank_test, step, survival_arrays

_GROUP_NAMES = {2: ("Low risk", "High risk"), 3: ("Low risk", "Intermediate risk", "High risk")}
_GROUP_COLOURS = {2: ("#1f77b4", "#d62728"), 3: ("#1f77b4", "#ff7f0e", "#d62728")}  # low risk blue, high red
_DPI = 150


def _save(fig: Figure, out_png: str | PathLike[str]) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    fig.clear()  # frees the artists now rather than at garbage collection
    return path


def risk_groups(risk: Any, groups: int = 2) -> np.ndarray:
    """Group index per patient from predicted risk: 0/1 split at the median, or 0/1/2 at the tertiles.

    Patients tied at a cut point go to the lower group, so heavily tied risks can leave a group empty.
    """
    if groups not in _GROUP_NAMES:
        raise ValueError(f"groups must be 2 (median split) or 3 (tertiles), got {groups}")
    risk = np.asarray(risk, dtype=float)
    cuts = np.quantile(risk, np.arange(1, groups) / groups)
    return np.searchsorted(cuts, risk, side="left")


def _format_p(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


def _numbers_at_risk(
    table: Axes,
    time: np.ndarray,
    group: np.ndarray,
    shown: list[int],
    names: Sequence[str],
    colours: Sequence[str],
    ticks: np.ndarray,
) -> None:
    for row, g in enumerate(reversed(shown)):
        member_times = time[group == g]
        for tick in ticks:
            table.text(tick, row, str(int(np.sum(member_times >= tick))), ha="center", va="center", fontsize=8)
    table.set_yticks(range(len(shown)), [names[g] for g in reversed(shown)], fontsize=8)
    for label, g in zip(table.get_yticklabels(), reversed(shown), strict=True):
        label.set_color(colours[g])
    table.set_ylim(-0.6, len(shown) - 0.4)
    table.tick_params(axis="y", length=0, pad=14)
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.set_title("Number at risk", fontsize=9, loc="left")


def plot_kaplan_meier(
    time: Any,
    event: Any,
    risk: Any,
    out_png: str | PathLike[str],
    groups: int = 2,
    title: str = "Survival by predicted risk group",
    time_label: str = "Time",
) -> Path:
    """Kaplan-Meier curves per predicted risk group with censoring ticks, numbers at risk and log-rank p.

    ``groups`` is 2 (split at the median risk) or 3 (tertiles). Returns the written PNG's path.
    """
    time, event, risk = survival_arrays(time, event, risk)
    if len(time) == 0:
        raise ValueError("no patients to plot")
    group = risk_groups(risk, groups)
    names, colours = _GROUP_NAMES[groups], _GROUP_COLOURS[groups]
    shown = [g for g in range(groups) if np.any(group == g)]

    fig = Figure(figsize=(7, 5.2 + 0.25 * groups))
    curves, table = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 0.35 * groups + 0.4]})
    start = min(0.0, float(time.min()))
    for g in shown:
        member = group == g
        steps, surv = kaplan_meier(time[member], event[member])
        curves.step(np.r_[start, steps], np.r_[1.0, surv], where="post", color=colours[g],
                    label=f"{names[g]} (n={int(member.sum())})")
        censored = time[member & ~event]
        curves.plot(censored, step(steps, surv, censored), "|", color=colours[g], markersize=8, mew=1.2)
    try:
        result = logrank_test(time, event, group)
        test_text = f"Log-rank {_format_p(result.p_value)}"
    except UndefinedMetricError as err:
        test_text = f"Log-rank test: n/a ({err})"
    curves.text(0.02, 0.04, test_text, transform=curves.transAxes, fontsize=9)
    curves.set_ylim(-0.02, 1.02)
    curves.set_ylabel("Survival probability")
    curves.set_title(title)
    curves.grid(alpha=0.3)
    curves.legend(loc="upper right", fontsize=9, title="| censored", title_fontsize=8)
    curves.set_xlim(start, float(time.max()) * 1.02)

    ticks = np.array([t for t in curves.get_xticks() if start <= t <= time.max()])
    _numbers_at_risk(table, time, group, shown, names, colours, ticks)
    table.set_xlabel(time_label)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_roc(
    y: Any, score: Any, out_png: str | PathLike[str], title: str = "ROC curve", label: str = "Model"
) -> Path:
    """ROC curve with the AUROC in the legend and the chance diagonal; UndefinedMetricError unless both classes."""
    y = binary_labels(y, "y")
    fpr, tpr, _ = roc_curve(y, score)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="#1f77b4", lw=2, label=f"{label} (AUC = {auroc(y, score):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="Chance (AUC = 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"{title} (n={len(y)}, {int(y.sum())} positive)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_round_curves(
    history: Mapping[str, Sequence[float | None]],
    out_png: str | PathLike[str],
    title: str = "Federated training",
    ylabel: str = "Metric",
) -> Path:
    """One line per series of ``history`` (e.g. {"val c-index": [...], "site A loss": [...]}) against round 1, 2, ...

    None or NaN entries (rounds without that metric) are left as gaps.
    """
    if not history:
        raise ValueError("history has no series to plot")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    longest = 0
    for name, values in history.items():
        y = np.array([math.nan if v is None else float(v) for v in values])
        rounds = np.arange(1, len(y) + 1)
        longest = max(longest, len(y))
        ax.plot(rounds, y, marker="o", markersize=3, label=name)
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(0.5, max(longest, 1) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_calibration(
    predicted: Sequence[float],
    observed: Sequence[float],
    counts: Sequence[int],
    out_png: str | PathLike[str],
    title: str = "Calibration",
    xlabel: str = "Predicted",
    ylabel: str = "Observed",
) -> Path:
    """Observed against predicted probability per group of cases (marker area ~ cases), with the diagonal of
    perfect calibration."""
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="Perfect calibration")
    sizes = 20 + 180 * np.asarray(counts, dtype=float) / max(max(counts, default=1), 1)
    ax.plot(predicted, observed, "-", color="#1f77b4", lw=1)
    ax.scatter(predicted, observed, s=sizes, color="#1f77b4", zorder=3, label="Groups of cases (size ~ n)")
    for x, y, n in zip(predicted, observed, counts, strict=True):
        ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)
