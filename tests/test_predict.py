"""Applying a trained model at a site: predictions stay inside the site, a model ranks the planted risk on an
external cohort, and a model that does not fit the site is refused in one clear line."""

import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

from fedmusk.cli import app
from fedmusk.config import load_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(report_cohorts, tmp_path_factory):
    """A report-only survival model trained on one development site (fast: no slides), and the external cohort."""
    from fedmusk.training.run import run_train

    dev, ext = report_cohorts
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(["configs/demo.yaml"], ["train.fusion=report", "train.epochs=4", "train.bootstrap=20"])
    run_train(cfg, dev[:1], out)
    site = tmp_path_factory.mktemp("external") / ext[0].name
    shutil.copytree(ext[0], site)  # the test writes results into it
    return out, site


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_scores_every_case_inside_the_site(trained):
    run, site = trained
    result = runner.invoke(app, ["predict", str(site), "--model", str(run)])
    assert result.exit_code == 0, result.output
    written = sorted((site / "fedmusk-results").glob("predict-*.csv"))
    assert len(written) == 1, "the predictions are written inside the site folder"
    rows = read_rows(written[0])
    assert len(rows) == 100
    assert set(rows[0]) >= {"case_id", "risk_score", "risk_group", "survival_12m", "survival_48m"}
    assert {r["risk_group"] for r in rows} == {"low", "high"}
    assert all(float(r["survival_12m"]) >= float(r["survival_48m"]) for r in rows), "S(t) never rises"


def test_evaluate_on_an_external_cohort_ranks_the_planted_risk_above_chance(trained, tmp_path):
    # The synthetic reports state pTNM stage, which orders survival (C-index ~0.69 for stage alone); a model
    # trained on another seed's site must rank this cohort's cases better than chance.
    run, site = trained
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(site), "--model", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 100
    assert metrics["metrics"]["c_index"] > 0.55, metrics["metrics"]
    assert 0 <= metrics["logrank"]["p_value"] <= 1
    assert (out / "kaplan_meier.png").stat().st_size > 0 and (out / "calibration.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "C-index (Uno)" in report and "Log-rank" in report
    assert str(site) not in report and "A-" not in report, "no paths or case ids in the report"


def test_evaluate_compares_models_on_the_same_cases_with_a_paired_difference(trained, tmp_path):
    run, site = trained
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["evaluate", str(site), "--model", str(run), "--against", str(run / "adapter"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "metrics.json").read_text())["comparisons"][0]
    assert comparison["difference"] == pytest.approx(0.0) and comparison["ci"] == pytest.approx([0.0, 0.0])


def test_predict_scores_new_cases_without_outcomes(trained, tmp_path):
    run, site = trained
    with open(site / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:5]
    new = site / "new-cases.csv"
    with open(new, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "slide", "report"])
        writer.writerows([[r["case_id"], r["slide"], r["report"]] for r in rows])
    out = tmp_path / "new.csv"
    result = runner.invoke(app, ["predict", str(site), "--model", str(run), "--manifest", str(new), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["split"] for r in read_rows(out)] == ["new"] * len({r["case_id"] for r in rows})


def test_a_model_trained_on_another_base_musk_is_refused_in_one_line(trained):
    run, site = trained
    result = runner.invoke(app, ["predict", str(site), "--model", str(run), "--set", "seed=5"])
    assert result.exit_code == 2
    assert "trained on another base MUSK" in result.output and "Traceback" not in result.output


def test_models_for_different_tasks_are_not_compared(trained, tmp_path):
    run, site = trained
    other = tmp_path / "response-model"
    shutil.copytree(run / "adapter", other)
    meta = json.loads((other / "fedmusk_model.json").read_text())
    (other / "fedmusk_model.json").write_text(json.dumps({**meta, "task": "response"}))
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("task: survival", "task: response"))
    result = runner.invoke(app, ["evaluate", str(site), "--model", str(run), "--against", str(other)])
    assert result.exit_code == 2
    assert "cannot compare" in result.output or "does not fit" in result.output, result.output


def test_a_folder_without_a_model_is_named_in_the_error(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path), "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not found" in result.output
