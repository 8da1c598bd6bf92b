"""The fedmusk command as users meet it: useful output, one-line errors, no tracebacks for their mistakes."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedmusk.cli import app

runner = CliRunner()


def test_embed_scores_each_image_against_each_text(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(np.full((120, 100, 3), 200, np.uint8)).save(path)
    result = runner.invoke(app, ["embed", str(path), "-t", "tumour", "-t", "stroma"])
    assert result.exit_code == 0, result.output
    assert "tile.png" in result.output


def test_missing_image_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["embed", str(tmp_path / "absent.png"), "-t", "tumour"])
    assert result.exit_code == 2
    assert "image not found" in result.output and "Traceback" not in result.output


def test_embed_scores_a_real_tissue_image(tmp_path):
    from skimage import data

    path = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(path)  # a real IHC-stained section shipped by scikit-image
    result = runner.invoke(app, ["embed", str(path), "-t", "tumour cells", "-t", "benign stroma"])
    assert result.exit_code == 0, result.output
    assert "image-text similarity" in result.output and "ihc.png" in result.output


def test_unknown_override_key_is_named_without_traceback():
    result = runner.invoke(app, ["demo", "model.presett=large"])
    assert result.exit_code == 2
    assert "unknown configuration key 'model.presett'" in result.output
    assert "Traceback" not in result.output


def test_large_model_without_weights_is_refused_with_the_reason(tmp_path):
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "model.preset=large"])
    assert result.exit_code == 2
    assert "needs the released checkpoint" in result.output
    assert not any(tmp_path.iterdir()), "nothing is started before the configuration is known to work"


@pytest.fixture(scope="module")
def demo(small_cohort, tmp_path_factory):
    """One demo run on the small cohort (federation, centralized and local baselines): (console output, run folder)."""
    import shutil

    workdir = tmp_path_factory.mktemp("demo")
    shutil.copytree(small_cohort[0].parent, workdir / "cohort")  # the demo makes its cohort only when absent
    result = runner.invoke(
        app, ["demo", "--workdir", str(workdir), "federation.rounds=1", "train.epochs=1", "train.bootstrap=10"]
    )
    assert result.exit_code == 0, result.output
    (runs,) = [p for p in workdir.iterdir() if p.name != "cohort"]
    return result.output, runs


def study_client(runs):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")


def test_demo_runs_the_federation_and_both_baselines_on_a_cohort(demo):
    output, runs = demo
    for row in ("federated", "centralized (pooled)", "site-1 alone", "site-3 alone"):
        assert row in output
    assert output.count("mlflow ui --backend-store-uri") == 1, "one store, one command to open it"
    assert f"sqlite:///{runs.resolve() / 'mlflow.db'}" in " ".join(output.split())


def test_demo_store_holds_one_experiment_with_the_study_and_every_arm_as_its_child_runs(demo):
    _, runs = demo
    client = study_client(runs)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert len(experiments) == 1
    found = client.search_runs([experiments[0].experiment_id])
    (study,) = [r for r in found if r.data.tags.get("fedmusk.arm") == "study"]
    children = [r for r in found if r is not study]
    arms = sorted(r.data.tags["fedmusk.arm"] for r in children)
    assert arms == ["centralized", "federated", "local", "local", "local"]
    assert all(r.data.tags.get("mlflow.parentRunId") == study.info.run_id for r in children)
    assert sorted(r.info.run_name for r in children if r.data.tags["fedmusk.arm"] == "local") == [
        "local-site-1", "local-site-2", "local-site-3",
    ]  # fmt: skip
    for run in found:
        assert run.data.tags.get("mlflow.source.name") and run.data.tags.get("mlflow.note.content")
    by_arm = {r.data.tags["fedmusk.arm"]: r for r in children}
    assert "federation.secure_aggregation" in by_arm["federated"].data.params
    assert not any(k.startswith("federation.") for k in by_arm["centralized"].data.params), "params of its own arm"
    assert by_arm["federated"].inputs.dataset_inputs, "each site's data recorded as a dataset input"
    assert all("/" not in d.dataset.source.replace('"', "") for d in by_arm["federated"].inputs.dataset_inputs)


def test_every_arm_reports_its_final_test_under_one_name_with_the_value_the_console_prints(demo):
    import json

    output, runs = demo
    client = study_client(runs)
    found = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name != "Default"])
    children = [r for r in found if r.data.tags.get("fedmusk.arm") != "study"]
    assert all("test/c_index" in r.data.metrics for r in children), [sorted(r.data.metrics) for r in children]
    federated = next(r for r in children if r.data.tags["fedmusk.arm"] == "federated")
    summary = json.loads((runs / "federated" / "summary.json").read_text())
    pooled = summary["test"]["pooled"]["c_index"]
    assert federated.data.metrics["test/c_index"] == pytest.approx(pooled)
    assert f"{pooled:.3f}" in output
    assert federated.data.tags["test/c_index_ci"].count(" to ") == 1, "the CI as a tag, not as series"
    assert not any(k.endswith(("_ci_lo", "_ci_hi", "alpha", "n_boot")) for k in federated.data.metrics)


def test_the_registered_model_loads_with_pyfunc_and_predicts_what_fedmusk_predict_writes(demo, tmp_path):
    import csv
    import json

    import mlflow.pyfunc
    import pandas as pd

    _, runs = demo
    summary = json.loads((runs / "federated" / "summary.json").read_text())
    uri = summary["registered_model"]
    client = study_client(runs)
    name, version = uri.split("/")[1:]
    tags = client.get_model_version(name, version).tags
    for key in ("fedmusk.federation_id", "fedmusk.strategy", "fedmusk.rounds", "fedmusk.sites",
                "fedmusk.secure_aggregation", "fedmusk.config_hash", "fedmusk.base_fingerprint"):  # fmt: skip
        assert tags.get(key), key
    site = runs.parent / "cohort" / "site-2"
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["predict", str(site), "--model", str(runs / "federated"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        expected = list(csv.DictReader(f))
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    scores = model.predict(pd.DataFrame({"site_root": [str(site)], "split": ["all"]}))
    assert list(scores["case_id"]) == [r["case_id"] for r in expected]
    assert scores["risk_score"].to_numpy() == pytest.approx([float(r["risk_score"]) for r in expected], rel=1e-5)
    assert list(scores["risk_group"]) == [r["risk_group"] for r in expected]


def test_predict_refuses_a_site_cache_made_with_another_tiling_than_the_models(demo, tmp_path):
    _, runs = demo
    site = runs.parent / "cohort" / "site-1"
    args = ["predict", str(site), "--model", str(runs / "federated"), "--out", str(tmp_path / "x.csv")]
    result = runner.invoke(app, [*args, "--set", "data.tile_size=64"])
    assert result.exit_code == 2
    assert "made with another tiling" in result.output and "--reprepare" in result.output
    assert not (tmp_path / "x.csv").exists()
