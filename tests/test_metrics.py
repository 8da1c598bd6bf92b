"""Survival and response metrics agree with scikit-survival, lifelines and scikit-learn; plots get written."""

import json
import warnings

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index as lifelines_c_index
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve
from sksurv.metrics import brier_score as sksurv_brier_score
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.metrics import integrated_brier_score as sksurv_integrated_brier_score
from sksurv.util import Surv

from fedmusk.evaluation import arrays, binary, bootstrap, survival
from fedmusk.training.plots import plot_kaplan_meier, plot_roc, plot_round_curves

TOL = 1e-9


def cohort(seed, n=60, tie_times=True, tie_risks=True):
    """Exponential survival driven by the risk, uniform censoring; optionally rounded to create ties.

    The longest follow-up is a lone censoring, so IPCW is defined at every event (scikit-survival insists on that).
    """
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    event_time = rng.exponential(10 * np.exp(-0.8 * risk))
    censor_time = rng.uniform(0, 25, size=n)
    time = np.minimum(event_time, censor_time) + 0.1
    event = event_time <= censor_time
    if tie_times:
        time = np.ceil(time)
    if tie_risks:
        risk = np.round(risk, 1)
    last = np.argmax(time)
    time[last], event[last] = time[last] + 1, False
    return time, event, risk


def within_follow_up(time, event, quantiles=(0.2, 0.4, 0.6)):
    times = np.unique(np.quantile(time[event], quantiles))
    return times[(times >= time.min()) & (times < time.max())]


# ------------------------------------------------------------------------------------------- concordance


def test_harrell_c_counts_tied_times_and_tied_risks_like_sksurv():
    time = np.array([2.0, 2.0, 3.0, 5.0, 5.0, 8.0])
    event = np.array([1, 0, 1, 1, 0, 0])
    risk = np.array([0.9, 0.5, 0.5, 0.7, 0.2, 0.5])
    # comparable pairs: patient 0 with 1 (censored at the same time), 2, 3, 4, 5 -> 5 concordant;
    # 2 with 3 (discordant), 4 (concordant), 5 (tied risk, 1/2); 3 with 4 (censored at 5) and 5 -> 2 concordant
    assert survival.harrell_c_index(time, event, risk) == pytest.approx(8.5 / 10, abs=TOL)
    expected = concordance_index_censored(event.astype(bool), time, risk)[0]
    assert survival.harrell_c_index(time, event, risk) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", range(12))
def test_harrell_c_matches_sksurv_on_random_cohorts_with_ties_and_censoring(seed):
    time, event, risk = cohort(seed, n=20 + 10 * seed)
    if seed % 2:  # differences below the 1e-8 tolerance are ties too
        risk = risk + np.random.default_rng(seed).uniform(0, 1e-10, size=len(risk))
    expected = concordance_index_censored(event, time, risk)[0]
    assert survival.harrell_c_index(time, event, risk) == pytest.approx(expected, abs=TOL)


def test_harrell_c_matches_lifelines_when_times_are_distinct():
    time, event, risk = cohort(3, n=150, tie_times=False)
    expected = lifelines_c_index(time, -risk, event)
    assert survival.harrell_c_index(time, event, risk) == pytest.approx(expected, abs=1e-6)


def test_perfect_risk_gives_one_reversed_gives_zero_constant_gives_half():
    time, event, _ = cohort(4, n=80, tie_times=False)
    perfect = -time
    for c_index in (survival.harrell_c_index, survival.uno_c_index):
        assert c_index(time, event, perfect) == pytest.approx(1.0)
        assert c_index(time, event, -perfect) == pytest.approx(0.0)
        assert c_index(time, event, np.zeros_like(time)) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(6))
def test_uno_c_matches_sksurv_with_and_without_tau(seed):
    time, event, risk = cohort(seed, n=40 + 20 * seed)
    y = Surv.from_arrays(event, time)
    tau = float(np.quantile(time, 0.75))
    for kwargs in ({}, {"tau": tau}):
        expected = concordance_index_ipcw(y, y, risk, **kwargs)[0]
        assert survival.uno_c_index(time, event, risk, **kwargs) == pytest.approx(expected, abs=TOL)


def test_uno_c_uses_the_training_censoring_distribution_like_sksurv():
    time, event, risk = cohort(7, n=80)
    train_time, train_event, _ = cohort(8, n=300)
    keep = time < train_time.max()
    time, event, risk = time[keep], event[keep], risk[keep]
    expected = concordance_index_ipcw(Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), risk)
    got = survival.uno_c_index(time, event, risk, train_time, train_event)
    assert got == pytest.approx(expected[0], abs=TOL)
    assert got != pytest.approx(survival.uno_c_index(time, event, risk), abs=1e-6)  # the weights really changed


def test_uno_c_is_undefined_past_the_training_follow_up():
    time, event, risk = cohort(9, n=50)
    with pytest.raises(arrays.UndefinedMetricError, match="follow-up"):
        survival.uno_c_index(time, event, risk, train_time=time / 10, train_event=np.ones_like(event))


# ----------------------------------------------------------------------------------- time-dependent AUC


@pytest.mark.parametrize("seed", range(6))
def test_time_dependent_auc_matches_sksurv_per_time_and_mean(seed):
    time, event, risk = cohort(seed, n=50 + 25 * seed)
    times = within_follow_up(time, event)
    y = Surv.from_arrays(event, time)
    expected_auc, expected_mean = cumulative_dynamic_auc(y, y, risk, times)
    auc, mean = survival.time_dependent_auc(time, event, risk, times)
    np.testing.assert_allclose(auc, expected_auc, atol=TOL)
    assert mean == pytest.approx(expected_mean, abs=TOL)


def test_time_dependent_auc_with_training_censoring_and_one_time_matches_sksurv():
    time, event, risk = cohort(11, n=90)
    train_time, train_event, _ = cohort(12, n=200)
    train = Surv.from_arrays(train_event, train_time)
    test = Surv.from_arrays(event, time)
    times = within_follow_up(time, event)
    for t in (times, times[1:2]):
        expected_auc, expected_mean = cumulative_dynamic_auc(train, test, risk, t)
        auc, mean = survival.time_dependent_auc(time, event, risk, t, train_time, train_event)
        np.testing.assert_allclose(auc, expected_auc, atol=TOL)
        assert mean == pytest.approx(expected_mean, abs=TOL)


def test_time_dependent_auc_needs_censoring_weights_only_up_to_the_last_time():
    # an event and a censoring tie at the longest follow-up, so G is zero there; scikit-survival refuses, but that
    # patient is a control at every evaluation time and its weight never enters the AUC
    time, event, risk = cohort(14, n=80)
    last = np.argmax(time)
    time, event, risk = np.r_[time, time[last]], np.r_[event, True], np.r_[risk, 0.3]
    times = within_follow_up(time, event)
    got_auc, got_mean = survival.time_dependent_auc(time, event, risk, times)
    relabelled = Surv.from_arrays(np.r_[event[:-1], False], time)  # G and the KM curve are unchanged before it
    want_auc, want_mean = cumulative_dynamic_auc(relabelled, relabelled, risk, times)
    np.testing.assert_allclose(got_auc, want_auc, atol=TOL)
    assert got_mean == pytest.approx(want_mean, abs=TOL)


# --------------------------------------------------------------------------------------------- Brier score


@pytest.mark.parametrize("seed", range(4))
def test_brier_and_integrated_brier_match_sksurv(seed):
    time, event, risk = cohort(seed, n=60 + 30 * seed)
    times = np.linspace(np.quantile(time, 0.1), np.quantile(time, 0.8), 7)
    prob = np.exp(-np.outer(np.exp(0.8 * risk), times) / 10)  # a calibrated-ish survival curve per patient
    y = Surv.from_arrays(event, time)
    np.testing.assert_allclose(survival.brier_score(time, event, prob, times), sksurv_brier_score(y, y, prob, times)[1])
    expected = sksurv_integrated_brier_score(y, y, prob, times)
    assert survival.integrated_brier_score(time, event, prob, times) == pytest.approx(expected, abs=TOL)
    train_time, train_event, _ = cohort(seed + 100, n=300)
    train = Surv.from_arrays(train_event, np.maximum(train_time, time.max() + 1))
    got = survival.integrated_brier_score(time, event, prob, times, train["time"], train["event"])
    assert got == pytest.approx(sksurv_integrated_brier_score(train, y, prob, times), abs=TOL)


# ----------------------------------------------------------------------------------------- binary response


@pytest.mark.parametrize("seed", range(8))
def test_auroc_and_auprc_match_sklearn_with_tied_scores(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(30 + 20 * seed) < 0.3
    y[:2] = [True, False]
    score = np.round(rng.normal(size=len(y)) + y, 1)
    assert binary.auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=TOL)
    assert binary.auprc(y, score) == pytest.approx(average_precision_score(y, score), abs=TOL)


def test_roc_curve_has_the_points_of_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.35, 0.2])
    fpr, tpr, thresholds = binary.roc_curve(y, score)
    want_fpr, want_tpr, want_thresholds = sklearn_roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    np.testing.assert_allclose(thresholds[1:], want_thresholds[1:])


# -------------------------------------------------------------------------------------- KM and log-rank


def test_kaplan_meier_matches_lifelines():
    time, event, _ = cohort(5, n=120)
    steps, surv = survival.kaplan_meier(time, event)
    fitter = KaplanMeierFitter().fit(time, event)
    np.testing.assert_allclose(surv, fitter.survival_function_at_times(steps).to_numpy(), atol=TOL)


@pytest.mark.parametrize("n_groups", [2, 3, 4])
def test_logrank_p_matches_lifelines(n_groups):
    time, event, risk = cohort(6, n=150)
    group = np.digitize(risk, np.quantile(risk, np.arange(1, n_groups) / n_groups))
    got = survival.logrank_test(time, event, group)
    if n_groups == 2:
        a, b = group == 0, group == 1
        want = lifelines_logrank(time[a], time[b], event[a], event[b])
    else:
        want = multivariate_logrank_test(time, group, event)
    assert got.df == n_groups - 1
    assert got.statistic == pytest.approx(want.test_statistic, rel=1e-9)
    assert got.p_value == pytest.approx(want.p_value, rel=1e-7, abs=1e-15)


# --------------------------------------------------------------------------------- bootstrap and summaries


def test_bootstrap_ci_contains_the_point_and_narrows_with_more_cases():
    widths = []
    for n in (60, 600):
        time, event, risk = cohort(13, n=n)
        point, low, high = bootstrap.bootstrap_ci(survival.harrell_c_index, time, event, risk, n_boot=200, seed=1)
        assert point == survival.harrell_c_index(time, event, risk)
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_skips_resamples_where_the_metric_is_undefined():
    y = np.zeros(15, dtype=bool)
    y[0] = True  # about a third of resamples hold no responder at all
    score = np.linspace(0, 1, 15)
    values = bootstrap._bootstrap_values(binary.auroc, [y, score], n_boot=300, seed=0)
    assert 100 < len(values) < 300
    point, low, high = bootstrap.bootstrap_ci(binary.auroc, y, score, n_boot=300)
    assert point == 0.0 and low == high == 0.0


def test_undefined_metrics_raise_undefined_metric_error():
    time = np.array([1.0, 2.0, 3.0])
    with pytest.raises(arrays.UndefinedMetricError):
        survival.harrell_c_index(time, [0, 0, 0], [1, 2, 3])
    with pytest.raises(arrays.UndefinedMetricError):
        binary.auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(arrays.UndefinedMetricError):
        binary.auprc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(arrays.UndefinedMetricError, match="follow-up"):
        survival.time_dependent_auc(time, [1, 1, 0], [1, 2, 3], [3.0])
    with pytest.raises(arrays.UndefinedMetricError, match="two groups"):
        survival.logrank_test(time, [1, 0, 1], ["a", "a", "a"])


def test_malformed_input_raises_value_error_not_undefined():
    time, event, risk = cohort(1, n=30)
    for call in (
        lambda: survival.harrell_c_index(time, event, risk[:-1]),
        lambda: survival.harrell_c_index(time, event * 2, risk),
        lambda: binary.auroc([0, 1, np.nan], [0.1, 0.2, 0.3]),
        lambda: survival.time_dependent_auc(time, event, risk, [5.0, 3.0]),
        lambda: survival.integrated_brier_score(time, event, np.ones((30, 1)), [5.0]),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert not isinstance(err.value, arrays.UndefinedMetricError)


def test_survival_metrics_summary_is_json_ready_and_agrees_with_the_functions():
    time, event, risk = cohort(2, n=120)
    times = within_follow_up(time, event)
    prob = np.exp(-np.outer(np.exp(0.8 * risk), times) / 10)
    out = survival.survival_metrics(time, event, risk, survival_prob=prob, times=times, n_boot=50)
    json.dumps(out)
    assert out["c_index"] == pytest.approx(survival.harrell_c_index(time, event, risk))
    assert out["c_index_uno"] == pytest.approx(survival.uno_c_index(time, event, risk))
    assert out["td_auc"] == pytest.approx(survival.time_dependent_auc(time, event, risk, times)[1])
    assert out["ibs"] == pytest.approx(survival.integrated_brier_score(time, event, prob, times))
    for key in ("c_index", "c_index_uno", "td_auc", "ibs"):
        low, high = out[f"{key}_ci"]
        assert low <= out[key] <= high
    assert out["reasons"] == {}
    assert len(out["td_auc_per_time"]) == len(times)


def test_survival_metrics_reports_none_with_a_reason_instead_of_raising():
    time = np.arange(1.0, 11.0)
    out = survival.survival_metrics(time, np.zeros(10), np.arange(10.0), n_boot=20)
    json.dumps(out)
    for key in ("c_index", "c_index_uno", "td_auc", "ibs"):
        assert out[key] is None and out[f"{key}_ci"] is None
        assert out["reasons"][key]
    assert out["reasons"]["ibs"] == "no survival probabilities given"


def test_response_metrics_give_cis_and_none_for_a_single_class():
    rng = np.random.default_rng(0)
    y = rng.random(100) < 0.4
    score = y + rng.normal(size=100)
    out = binary.response_metrics(y, score, n_boot=100)
    json.dumps(out)
    assert out["auc"] == pytest.approx(roc_auc_score(y, score))
    assert out["auprc"] == pytest.approx(average_precision_score(y, score))
    assert out["auc_ci"][0] <= out["auc"] <= out["auc_ci"][1]
    single = binary.response_metrics(np.ones(10), np.arange(10.0), n_boot=10)
    assert single["auc"] is None and single["auprc"] is None and "both classes" in single["reasons"]["auc"]


def test_metrics_accept_torch_tensors():
    torch = pytest.importorskip("torch")
    time, event, risk = cohort(3, n=40)
    risk_tensor = torch.tensor(risk, requires_grad=True)
    got = survival.harrell_c_index(torch.tensor(time), torch.tensor(event), risk_tensor)
    assert got == pytest.approx(survival.harrell_c_index(time, event, risk))


# ------------------------------------------------------------------------------------------------- plots


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("groups", [2, 3])
def test_kaplan_meier_plot_writes_a_png(tmp_path, groups):
    time, event, risk = cohort(0, n=90)
    out = plot_kaplan_meier(time, event, risk, tmp_path / "km" / f"km{groups}.png", groups=groups, title="OS")
    assert _is_png(out)


def test_kaplan_meier_plot_survives_a_constant_risk(tmp_path):
    time, event, _ = cohort(0, n=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _is_png(plot_kaplan_meier(time, event, np.ones(30), tmp_path / "flat.png"))


def test_roc_and_round_curve_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(50) < 0.5
    assert _is_png(plot_roc(y, y + rng.normal(size=50), tmp_path / "roc.png"))
    history = {"val c-index": [0.55, 0.6, None, 0.66], "site A loss": [1.0, 0.8, 0.7, 0.65, 0.6]}
    assert _is_png(plot_round_curves(history, tmp_path / "rounds.png"))
