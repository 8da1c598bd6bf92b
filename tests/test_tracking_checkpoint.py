"""The coordinator's records: MLflow runs (config, rounds, artifacts, resume) and round checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fedmusk.config import ConfigError, FedMuskConfig
from fedmusk.server.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    list_rounds,
    load_latest,
    load_round,
    resume_point,
    round_dir,
    save_round,
)
from fedmusk.tracking import Tracker

# --- tracking ------------------------------------------------------------------------------------------------


# MLflow 3.17's SQLAlchemy store uses a loader strategy that SQLAlchemy deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.store.tracking.sqlalchemy_store")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One output folder whose SQLite store is created once (MLflow takes seconds to set a new one up), in a fresh
    process so that everything MLflow prints while doing so is seen."""
    out_dir = tmp_path_factory.mktemp("run")
    code = "import sys; from fedmusk.tracking import Tracker; Tracker(sys.argv[1], run_name='setup').finish()"
    done = subprocess.run([sys.executable, "-c", code, str(out_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out_dir, done.stdout + done.stderr


def client_for(out_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out_dir.resolve() / 'mlflow.db'}")


def test_importing_tracking_leaves_mlflow_unimported():
    code = "import sys, fedmusk.tracking; print('mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_tracker_prints_only_where_to_open_the_run(store):
    out_dir, console = store
    lines = console.strip().splitlines()
    assert len(lines) == 1, console
    assert f"mlflow ui --backend-store-uri sqlite:///{out_dir.resolve() / 'mlflow.db'}" in lines[0]


def test_tracker_run_holds_the_config_as_params_and_metrics_per_round(store):
    out_dir, _ = store
    cfg = FedMuskConfig()
    cfg.federation.rounds = 7
    with Tracker(out_dir, run_name="two-rounds", announce=False) as tracker:
        tracker.log_config(cfg)
        for r in (1, 2):
            tracker.log_round(
                r,
                aggregated={"val": {"c_index": 0.6 + r / 100, "note": "text"}, "skipped": None},
                per_site={"Hospital A": {"loss": 1.0 / r}, "Hospital B": {"loss": torch.tensor(2.0 / r)}},
                bytes_up=1000 * r,
                bytes_down=2000,
                seconds=1.5,
            )
    run = client_for(out_dir).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "two-rounds"
    assert run.data.params["federation.rounds"] == "7" and run.data.params["train.lora.rank"] == "8"
    assert run.data.params["tracking.uri"] == "None"
    assert set(run.data.metrics) == {
        "round/site_mean/val/c_index",
        "round/site/Hospital A/loss",
        "round/site/Hospital B/loss",
        "round/bytes_up",
        "round/bytes_down",
        "round/seconds",
    }
    history = client_for(out_dir).get_metric_history(tracker.run_id, "round/site/Hospital B/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]
    assert tracker.metric_history("round/bytes_up") == [(1, 1000.0), (2, 2000.0)]


def test_tracker_truncates_params_over_mlflows_limit(store):
    out_dir, _ = store
    with Tracker(out_dir, announce=False) as tracker:
        tracker.log_config({"notes": "x" * 10_000, "nested": {"list": [1, 2]}})
    params = client_for(out_dir).get_run(tracker.run_id).data.params
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")
    assert params["nested.list"] == "[1, 2]"


def test_tracker_resumed_by_run_id_appends_to_the_same_run(store):
    out_dir, _ = store
    first = Tracker(out_dir, announce=False)
    first.log_config({"federation": {"rounds": 2}, "seed": 0})
    first.log_metrics({"loss": 1.0}, step=1)
    first.finish("KILLED")
    with Tracker(out_dir, run_id=first.run_id, announce=False) as resumed:
        assert resumed.run_id == first.run_id and resumed.resumed
        assert client_for(out_dir).get_run(first.run_id).info.status == "RUNNING"
        assert resumed.log_config({"federation": {"rounds": 4}, "seed": 0}) == ["federation.rounds"]
        resumed.log_metrics({"loss": 0.5}, step=2)
    run = client_for(out_dir).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.rounds"] == "2"  # MLflow params never change...
    assert run.data.tags["fedmusk.config_changed_on_resume"] == "federation.rounds"  # ...so the change is tagged
    assert resumed.metric_history("loss") == [(1, 1.0), (2, 0.5)]


def test_tracker_refuses_to_resume_an_unknown_run(store):
    with pytest.raises(ValueError, match="no MLflow run 0123456789abcdef"):
        Tracker(store[0], run_id="0123456789abcdef", announce=False)


def test_tracker_artifacts_land_under_the_output_folder(store, tmp_path):
    out_dir, _ = store
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "report.txt").write_text("c-index 0.61")
    with Tracker(out_dir, announce=False) as tracker:
        tracker.log_config(FedMuskConfig())
        tracker.log_artifact(tmp_path / "report.txt")
        tracker.log_dir(tmp_path / "adapter", artifact_path="adapter")
    root = out_dir / "mlartifacts"
    found = {p.relative_to(root).as_posix().split("/artifacts/", 1)[1] for p in root.rglob("*") if p.is_file()
             and tracker.run_id in p.as_posix()}
    assert found == {"report.txt", "adapter/adapter_config.json", "config.yaml"}
    listed = {a.path for a in client_for(out_dir).list_artifacts(tracker.run_id)}
    assert listed == {"report.txt", "adapter", "config.yaml"}


def test_a_shared_sqlite_store_keeps_artifacts_beside_it_not_in_the_working_folder(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    started_in = tmp_path / "cwd"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    (tmp_path / "report.txt").write_text("c-index 0.61")
    with Tracker(tmp_path / "out", uri=f"sqlite:///{shared / 'mlflow.db'}", announce=False) as tracker:
        tracker.log_artifact(tmp_path / "report.txt")
    assert not (started_in / "mlruns").exists()
    assert [p.name for p in (shared / "mlartifacts").rglob("report.txt")] == ["report.txt"]


def test_tracker_marks_a_run_failed_when_the_federation_raises(store):
    with pytest.raises(RuntimeError), Tracker(store[0], announce=False) as tracker:
        raise RuntimeError("round 3 lost too many sites")
    assert client_for(store[0]).get_run(tracker.run_id).info.status == "FAILED"


# --- checkpoints ---------------------------------------------------------------------------------------------


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight": torch.randn(8, 32, generator=g),
        "beit3.encoder.layers.0.self_attn.q_proj.B.lora_B.weight": torch.randn(32, 8, generator=g),
        "task_heads.fusion.gate.weight": torch.randn(4, 16, generator=g).to(torch.bfloat16),
        "task_heads.outcome.bias": torch.randn(3, generator=g).to(torch.float16),
    }


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    state = adapter(0)
    state["beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight"][0, 0] = float("nan")  # NaN payload survives
    strategy = {
        "name": "fedadam",
        "step": 3,
        "m": {k: v.float() * 0.1 for k, v in adapter(1).items()},
        "history": [{"round": 1, "norm": 0.5}, (2, torch.arange(3))],
    }
    extra = {"mlflow_run_id": "abc123", "config_sha256": "f" * 64, "seeds": {"torch": 7}}
    save_round(tmp_path, 3, state, strategy, extra)
    loaded = load_round(tmp_path, 3)
    assert loaded.round == 3 and loaded.extra == extra and loaded.path == round_dir(tmp_path, 3)
    assert set(loaded.global_state) == set(state)
    assert all(bit_equal(loaded.global_state[k], v) for k, v in state.items())
    assert loaded.strategy_state["name"] == "fedadam" and loaded.strategy_state["step"] == 3
    assert all(bit_equal(loaded.strategy_state["m"][k], v) for k, v in strategy["m"].items())
    assert loaded.strategy_state["history"][0] == {"round": 1, "norm": 0.5}
    assert loaded.strategy_state["history"][1][0] == 2
    assert bit_equal(loaded.strategy_state["history"][1][1], torch.arange(3))


def test_latest_checkpoint_wins_and_only_the_newest_are_kept(tmp_path):
    assert load_latest(tmp_path) is None
    for r in range(1, 6):
        save_round(tmp_path, r, adapter(r), {"step": r}, keep=3)
    assert list_rounds(tmp_path) == [3, 4, 5]
    latest = load_latest(tmp_path)
    assert latest.round == 5 and latest.strategy_state == {"step": 5}
    assert all(bit_equal(latest.global_state[k], v) for k, v in adapter(5).items())
    save_round(tmp_path, 5, adapter(50), {"step": 50}, keep=None)  # saving a round again replaces it
    assert load_latest(tmp_path).strategy_state == {"step": 50} and list_rounds(tmp_path) == [3, 4, 5]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_half_written_checkpoints_are_ignored(tmp_path):
    save_round(tmp_path, 1, adapter(1), {"step": 1})
    save_round(tmp_path, 2, adapter(2), {"step": 2})
    # A crash before the rename leaves a hidden temporary folder; a copy cut short leaves a folder with no manifest.
    shutil.copytree(round_dir(tmp_path, 2), tmp_path / ".tmp-round-000003-dead")
    round_dir(tmp_path, 4).mkdir()
    (round_dir(tmp_path, 4) / "global_state.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="round-000004: incomplete checkpoint"):
        assert load_latest(tmp_path).round == 2
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        load_round(tmp_path, 4)
    with pytest.raises(FileNotFoundError):
        load_round(tmp_path, 3)


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_it(tmp_path):
    save_round(tmp_path, 1, adapter(1))
    save_round(tmp_path, 2, adapter(2))
    damaged = round_dir(tmp_path, 2) / "global_state.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="do not match the sha256"):
        assert load_latest(tmp_path).round == 1


def test_checkpoint_refuses_values_that_are_not_json_by_key(tmp_path):
    with pytest.raises(TypeError, match=r"strategy_state\.optimizer\.lr_schedule: not JSON-able"):
        save_round(tmp_path, 1, adapter(1), {"optimizer": {"lr_schedule": object()}})
    assert list_rounds(tmp_path) == [] and not any(tmp_path.iterdir())
    manifest = json.dumps({"ok": 1})  # JSON values pass through unchanged
    save_round(tmp_path, 1, adapter(1), extra={"m": manifest})
    assert load_round(tmp_path, 1).extra == {"m": manifest}


def test_a_federation_resumes_only_from_a_completed_round_and_never_overwrites_one(tmp_path):
    assert resume_point(tmp_path, resume=False) is None  # a fresh start in an empty folder
    with pytest.raises(ConfigError, match="nothing to resume: .* holds no completed round"):
        resume_point(tmp_path, resume=True)
    save_round(tmp_path / CHECKPOINT_DIR, 2, adapter(2))
    assert resume_point(tmp_path, resume=True, total_rounds=3).round == 2
    with pytest.raises(ConfigError, match="already completed all 2 rounds"):
        resume_point(tmp_path, resume=True, total_rounds=2)
    with pytest.raises(ConfigError, match="already holds a federation's checkpoints"):
        resume_point(tmp_path, resume=False)
