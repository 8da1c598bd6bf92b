"""A study recorded on a real `mlflow server` (loopback): parent and child runs, the final test under one name, and
a registered model that loads from the server and scores a site as `fedmusk predict` does."""

import subprocess
import sys
import time
import urllib.request

import pytest

from fedmusk.config import load_config
from fedmusk.ops.supervise import free_port

# Slow: the server takes ~7 s to become healthy and registering and loading a pyfunc model through it ~20 s more on
# 2 shared cores; it is the only test that runs fedmusk's tracking against a real server rather than a SQLite file.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --workers 1` on 127.0.0.1 (about 7 s to become healthy), stopped by its PID."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_study_on_an_mlflow_server_nests_arms_and_serves_the_registered_model(server, report_cohorts, tmp_path):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from fedmusk.tracking import Tracker
    from fedmusk.tracking_model import register_model
    from fedmusk.training.bundle import Lineage
    from fedmusk.training.global_adapter import initial_adapter_state, save_global_adapter
    from fedmusk.training.predict import run_predict

    overrides = ["train.fusion=report", f"tracking.uri={server}", "tracking.experiment=study"]
    cfg = load_config(["configs/demo.yaml"], overrides)
    adapter = save_global_adapter(cfg, initial_adapter_state(cfg), tmp_path / "adapter", Lineage("federated", ["a"]))
    with Tracker(tmp_path / "study", uri=server, experiment="study", run_name="study", announce=False) as study:
        for arm in ("federated", "centralized"):
            with Tracker(tmp_path / arm, uri=server, experiment="study", run_name=arm, announce=False,
                         parent_run_id=study.run_id, tags={"fedmusk.arm": arm}) as child:  # fmt: skip
                child.log_config(cfg, arm=arm)
                child.log_final_test({"c_index": 0.6, "c_index_ci": [0.5, 0.7], "n": 40}, {"a": {"c_index": 0.6}})
                if arm == "federated":
                    version = register_model(child, adapter, "study-survival", {"fedmusk.strategy": "fedit"}, "card")
    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    children = [r for r in runs if r.info.run_id != study.run_id]
    assert len(children) == 2 and all(r.data.tags["mlflow.parentRunId"] == study.run_id for r in children)
    assert all(r.data.metrics["test/c_index"] == 0.6 and r.data.tags["test/c_index_ci"] for r in children)

    site = report_cohorts[1][0]
    _, table = run_predict(site, str(adapter), out=tmp_path / "scores.csv")
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model(f"models:/study-survival/{version}")
    finally:
        mlflow.set_tracking_uri(None)
    scores = model.predict(pd.DataFrame({"site_root": [str(site)]}))
    assert list(scores["case_id"]) == [row[0] for row in table.rows]
    assert scores["risk_score"].tolist() == pytest.approx([row[2] for row in table.rows], rel=1e-6)
