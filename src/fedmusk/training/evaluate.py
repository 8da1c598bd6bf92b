"""``fedmusk evaluate``: external validation of a trained model on a site's cases with outcomes, inside the site.

The report (``report.md``, ``metrics.json`` and PNGs in one folder under ``<site>/fedmusk-results/``) holds
C-index (Harrell and Uno), time-dependent AUC and integrated Brier score, or AUROC and AUPRC, each with a bootstrap
CI; Kaplan-Meier curves by predicted risk group with the log-rank test; a calibration plot; and, for every model
given with ``--against``, the paired bootstrap difference of the headline metric on the same cases.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedmusk.evaluation.arrays import UndefinedMetricError
from fedmusk.evaluation.binary import auroc
from fedmusk.evaluation.bootstrap import bootstrap_ci
from fedmusk.evaluation.survival import harrell_c_index, kaplan_meier, logrank_test
from fedmusk.training.bundle import Bundle, ModelMismatchError, open_bundle, resolve_model
from fedmusk.training.outcome import Predictions, metrics_for
from fedmusk.training.predict import Predictor, default_output, progress_bar, select_cases

HEADLINE = {"survival": ("c_index", "C-index (Harrell)"), "response": ("auc", "AUROC")}


@dataclass
class ModelResult:
    label: str
    bundle: Bundle
    pred: Predictions
    metrics: dict[str, Any]


def run_evaluate(
    site_root: Path,
    model: str,
    against: Sequence[str] = (),
    overrides: Sequence[str] = (),
    split: str = "all",
    out: Path | None = None,
    reprepare: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and each of ``against`` on the same cases) on the site's labelled cases; write the report
    and return its numbers (``report`` is the path of report.md). ModelMismatchError when a model cannot be applied
    here or the models predict different tasks; ValueError when the cases do not define the metrics."""
    console = console or Console(stderr=True)
    site_root = Path(site_root)
    results: list[ModelResult] = []
    with tempfile.TemporaryDirectory(prefix="fedmusk-model-") as scratch:
        for i, spec in enumerate([model, *against]):
            bundle = open_bundle(resolve_model(spec, Path(scratch) / str(i)), list(overrides))
            if results and bundle.task != results[0].bundle.task:
                raise ModelMismatchError(
                    f"{spec} predicts {bundle.task}, {model} predicts {results[0].bundle.task}: cannot compare them"
                )
            cases = select_cases(bundle if not results else results[0].bundle, site_root, split)
            if bundle.task == "response":
                cases = [c for c in cases if c.response is not None]
            if not cases:
                raise ModelMismatchError(
                    f"the site has no {'cases with a response label' if bundle.task == 'response' else 'cases'} "
                    f"in split '{split}' to evaluate this {bundle.task} model on"
                )
            predictor = Predictor(bundle)
            predictor.check_site_cache(cases, reprepare)
            with progress_bar(console, f"scoring with model {i + 1}", len(cases)) as advance:
                pred = predictor.score(cases, advance)
            del predictor
            results.append(ModelResult(f"model {i + 1} ({bundle.name})", bundle, pred, metrics_for(pred, bundle.cfg)))
    main = results[0]
    out = Path(out) if out is not None else default_output(site_root, "evaluate", main.bundle)
    out.mkdir(parents=True, exist_ok=True)
    report = _figures_and_tests(main, out)
    report["comparisons"] = [paired_difference(main, other, i + 1) for i, other in enumerate(results[1:])]
    report["metrics"] = main.metrics
    report["against_metrics"] = [r.metrics for r in results[1:]]
    report["task"] = main.bundle.task
    report["model"] = main.bundle.meta.get("lineage", {})
    (out / "metrics.json").write_text(json.dumps(report, indent=1, default=_json) + "\n")
    (out / "report.md").write_text(markdown_report(report, [r.label for r in results[1:]]))
    report["report"] = out / "report.md"
    return report


def paired_difference(main: ModelResult, other: ModelResult, index: int) -> dict[str, Any]:
    """Headline metric of ``main`` minus ``other`` on the same cases, with a paired bootstrap CI (cases resampled
    together for both models)."""
    task = main.bundle.task
    cfg = main.bundle.cfg
    key, label = HEADLINE[task]
    if task == "survival":
        arrays = (main.pred.time, main.pred.event, main.pred.risk, other.pred.risk)

        def diff(t, e, a, b):
            return harrell_c_index(t, e, a) - harrell_c_index(t, e, b)
    else:
        arrays = (main.pred.response, main.pred.risk, other.pred.risk)

        def diff(y, a, b):
            return auroc(y, a) - auroc(y, b)

    out: dict[str, Any] = {
        "against": index, "metric": label, "model": main.metrics.get(key), "other": other.metrics.get(key),
    }  # fmt: skip
    try:
        ci = bootstrap_ci(diff, *arrays, n_boot=cfg.train.bootstrap, seed=cfg.seed)
    except UndefinedMetricError as err:
        return {**out, "difference": None, "ci": None, "reason": str(err)}
    return {**out, "difference": ci.point, "ci": None if ci.low is None else [ci.low, ci.high]}


def _figures_and_tests(main: ModelResult, out: Path) -> dict[str, Any]:
    from fedmusk.training.plots import plot_calibration, plot_kaplan_meier, plot_roc, risk_groups

    pred, task = main.pred, main.bundle.task
    figures: list[str] = []
    found: dict[str, Any] = {"n": len(pred.cases)}
    if task == "survival":
        figures.append(plot_kaplan_meier(pred.time, pred.event, pred.risk, out / "kaplan_meier.png",
                                         title="Cases by predicted risk group", time_label="Months").name)
        try:
            lr = logrank_test(pred.time, pred.event, risk_groups(pred.risk, 2))
            found["logrank"] = {"statistic": lr.statistic, "p_value": lr.p_value, "df": lr.df}
        except UndefinedMetricError as err:
            found["logrank"] = {"reason": str(err)}
        cal = survival_calibration(pred)
        if cal is not None:
            found["calibration"] = cal
            figures.append(plot_calibration(cal["predicted"], cal["observed"], cal["n"], out / "calibration.png",
                                            title=f"Calibration at {cal['time']:g} months",
                                            xlabel=f"Predicted survival at {cal['time']:g} months",
                                            ylabel="Observed (Kaplan-Meier)").name)
        else:
            found["calibration"] = {"reason": "the model gives no survival probabilities inside this follow-up"}
    else:
        if len(set(pred.response.tolist())) == 2:
            figures.append(plot_roc(pred.response, pred.risk, out / "roc.png", title="Response").name)
        cal = response_calibration(pred)
        found["calibration"] = cal
        figures.append(plot_calibration(cal["predicted"], cal["observed"], cal["n"], out / "calibration.png",
                                        title="Calibration", xlabel="Predicted probability of response",
                                        ylabel="Observed fraction responding").name)
    found["figures"] = figures
    return found


def survival_calibration(pred: Predictions, max_groups: int = 5) -> dict[str, Any] | None:
    """Mean predicted S(t) against the Kaplan-Meier S(t) in groups of cases by predicted S(t), at the middle time
    bin inside the follow-up; None without survival probabilities there."""
    if pred.survival is None or pred.eval_times is None:
        return None
    inside = [i for i, t in enumerate(pred.eval_times) if t < pred.time.max()]
    if not inside:
        return None
    col = inside[len(inside) // 2]
    t = float(pred.eval_times[col])
    predicted = pred.survival[:, col]
    groups = _quantile_groups(predicted, max_groups)
    rows = {"predicted": [], "observed": [], "n": []}
    for g in np.unique(groups):
        member = groups == g
        knots, surv = kaplan_meier(pred.time[member], pred.event[member])
        idx = np.searchsorted(knots, t, side="right") - 1
        rows["predicted"].append(float(predicted[member].mean()))
        rows["observed"].append(float(surv[idx]) if idx >= 0 else 1.0)
        rows["n"].append(int(member.sum()))
    return {"time": t, **rows}


def response_calibration(pred: Predictions, max_groups: int = 5) -> dict[str, Any]:
    """Mean predicted probability against the observed share of responders in groups by predicted probability."""
    prob = 1.0 / (1.0 + np.exp(-pred.risk))
    groups = _quantile_groups(prob, max_groups)
    rows = {"predicted": [], "observed": [], "n": []}
    for g in np.unique(groups):
        member = groups == g
        rows["predicted"].append(float(prob[member].mean()))
        rows["observed"].append(float(pred.response[member].mean()))
        rows["n"].append(int(member.sum()))
    return rows


def _quantile_groups(values: np.ndarray, max_groups: int) -> np.ndarray:
    k = int(max(1, min(max_groups, len(values) // 10)))
    cuts = np.quantile(values, np.arange(1, k) / k) if k > 1 else np.zeros(0)
    return np.searchsorted(cuts, values, side="left")


def markdown_report(report: dict[str, Any], against: list[str]) -> str:
    """The evaluation as markdown: metrics with CIs, tests, comparisons, figures. No case ids, no paths."""
    m, task = report["metrics"], report["task"]
    keys = (
        [("c_index", "C-index (Harrell)"), ("c_index_uno", "C-index (Uno)"), ("td_auc", "Time-dependent AUC (mean)"),
         ("ibs", "Integrated Brier score")]
        if task == "survival"
        else [("auc", "AUROC"), ("auprc", "AUPRC")]
    )  # fmt: skip
    lines = ["# External validation", ""]
    lineage = report.get("model") or {}
    lines += [f"Model: {lineage.get('arm', 'fedmusk model')}"
              + (f", federation {lineage['federation_id']}" if lineage.get("federation_id") else "")
              + (f", sites {', '.join(lineage.get('sites') or [])}" if lineage.get("sites") else ""), ""]
    counted = f"{m.get('n', 0)} cases" + (f", {m['n_events']} events" if "n_events" in m else "")
    counted += f", {m['n_positive']} responders" if "n_positive" in m else ""
    lines += [f"Cases: {counted}.", "", "| metric | value | 95% bootstrap CI |", "|---|---|---|"]
    for key, label in keys:
        reason = (m.get("reasons") or {}).get(key)
        lines.append(f"| {label} | {_num(m.get(key))} | {_ci(m.get(f'{key}_ci'))}"
                     + (f" ({reason})" if reason else "") + " |")
    if task == "survival":
        lr = report.get("logrank", {})
        text = lr.get("reason", "n/a")
        if "p_value" in lr:
            text = f"p = {lr['p_value']:.4g} (chi2 = {lr['statistic']:.3g}, df {lr['df']})"
        lines += ["", f"Log-rank test, high vs low predicted risk (split at the median): {text}."]
    cal = report.get("calibration", {})
    if "reason" in cal:
        lines += ["", f"Calibration: not available ({cal['reason']})."]
    if report["comparisons"]:
        lines += ["", "## Paired comparisons (same cases, paired bootstrap)", "",
                  "| against | this model | other model | difference | 95% CI |", "|---|---|---|---|---|"]
        for comp, name in zip(report["comparisons"], against, strict=True):
            lines.append(f"| {name} | {_num(comp['model'])} | {_num(comp['other'])} | {_num(comp['difference'])} "
                         f"| {_ci(comp['ci'])} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _ci(ci) -> str:
    return "n/a" if not ci or None in ci else f"{ci[0]:.3f} to {ci[1]:.3f}"


def _json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.name
    raise TypeError(type(value).__name__)
