"""Federated rounds: SecAgg+ against plain aggregation, FFA-LoRA exactness, dropouts, halts and resume.

The simulations run the real ServerApp and ClientApps under Flower's simulation runtime (Ray, in this process's
machine) on a tiny synthetic cohort of 3 sites. Per-site updates are recomputed here, outside Flower, from the
checkpointed global states: a site's round is a function of (seed, site, round), and the sites' audit logs hold
the sha256 of exactly what they sent, so the test can check the coordinator against the sites' own records.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from _federation_helpers import FakeTracker, config

from fedmusk.client.audit import AuditLog, tensor_record
from fedmusk.client.site_client import SiteAddress, SiteClient, secure_weight, secure_weight_cap
from fedmusk.config import ConfigError
from fedmusk.data.synth.cohort import synthesize_cohort
from fedmusk.musk_model.lora import adapter_state as full_adapter_state
from fedmusk.musk_model.lora import read_adapter_file
from fedmusk.server.checkpoint import load_round
from fedmusk.server.rounds import RoundController, RoundFailed
from fedmusk.strategies.aggregation import lora_products, weighted_mean
from fedmusk.training.global_adapter import initial_adapter_state
from fedmusk.wire import AdapterLayout, phase_round

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """An MLflow store shared by the later simulations (a new store costs seconds of migrations each time)."""
    from fedmusk.tracking import Tracker

    tracker = Tracker(tmp_path_factory.mktemp("mlflow"), announce=False)
    tracker.finish()

    def with_store(*overrides: str):
        return config(f"tracking.uri={tracker.tracking_uri}", *overrides)

    return with_store


@pytest.fixture(scope="module", autouse=True)
def flower_environment():
    """Flower and Ray write nowhere shared and install nothing; Ray's sockets need a short path."""
    ray_tmp = tempfile.mkdtemp(prefix="fmray", dir="/tmp")
    flwr_home = tempfile.mkdtemp(prefix="fmflwr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", flwr_home)
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        mp.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        yield
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(flwr_home, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("cohort")
    return synthesize_cohort(
        out, sites=3, cases_per_site=12, tile_px=96, slide_px=256, pretrain_tiles=2, pretrain_reports=2,
        progress=False, workers=1,
    )  # fmt: skip


def simulate(cfg, roots, out, resume=False):
    from fedmusk.federation import run_simulation_from_config

    return run_simulation_from_config(cfg, roots, out, resume=resume)


@pytest.fixture(scope="module")
def secure_run(cohort, tmp_path_factory):
    cfg = config("federation.secure_aggregation=true")
    out = tmp_path_factory.mktemp("secure")
    return cfg, out, simulate(cfg, cohort, out)


def site_clients(cfg, roots, audit_dir: Path) -> list[SiteClient]:
    """The sites as they run in the simulation, here in the test process (their own audit logs left alone)."""
    clients = []
    for root in roots:
        site = SiteClient.from_address(cfg, SiteAddress(Path(root), None, None, "simulation"))
        site.audit = AuditLog(audit_dir / f"{root.name}.jsonl")
        clients.append(site)
    return clients


def site_updates(clients, global_state, round, federation_id, secure):
    """Each site's update for ``round`` from ``global_state``, as the state dict it sent."""
    updates = []
    for site in clients:
        reply = site.fit(global_state, round, federation_id)
        layout = site.layout.update_layout(site.cfg.federation.strategy, secure, phase_round(site.cfg, round))
        updates.append(layout.from_arrays(reply.arrays))
    return updates


def sent_hashes(root: Path, federation_id: str, round: int) -> dict[str, str]:
    entries = [e for e in AuditLog(root / ".fedmusk" / "audit.jsonl").entries() if e["run_id"] == federation_id]
    sends = [e for e in entries if e["round"] == round and e["event"] == "send"]
    assert sends, f"{root.name} recorded no send in round {round}"
    return {t["name"]: t["sha256"] for t in sends[-1]["tensors"]}


# --- end to end ------------------------------------------------------------------------------------------------


def test_secure_federation_completes_and_records_every_round(secure_run, cohort):
    cfg, out, summary = secure_run
    assert summary["secure_aggregation"] is True
    assert summary["rounds_completed"] == 2 and [r["round"] for r in summary["rounds"]] == [1, 2]
    names = [root.name for root in cohort]
    assert summary["sites"] == names
    for record in summary["rounds"]:
        assert record["sampled"] == 3 and record["replies"] == 3 and record["failures"] == []
        assert sorted(record["train_loss"]) == names
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert set(record["per_site"]) | {n for f in record["eval_failures"] for n in names if n in f} == set(names)
    assert summary["bytes_up_per_client_round"] > 0
    assert set(summary["test"]["per_site"]) == set(names)
    assert summary["test"]["pooled"]["n"] == sum(m["n"] for m in summary["test"]["per_site"].values())
    assert summary["secagg"]["sum_error_bound"] > 0
    assert json.loads((out / "summary.json").read_text())["run_id"] == summary["run_id"]

    # the final adapter in peft's format is the last checkpoint's global state
    final = load_round(out / "checkpoints", 2).global_state
    saved = read_adapter_file(summary["adapter"])
    assert (Path(summary["adapter"]) / "adapter_config.json").is_file()
    assert all(torch.equal(saved[name], value) for name, value in final.items())

    # MLflow holds one step per round, with the operators' site names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    assert [m.step for m in client.get_metric_history(summary["run_id"], "round/bytes_up")] == [1, 2]
    logged = client.get_run(summary["run_id"]).data.metrics
    assert any(key.startswith(f"round/site/{names[0]}/") for key in logged)
    pooled = summary["test"]["pooled"].get("c_index")
    assert logged["test/c_index"] == pytest.approx(float("nan") if pooled is None else pooled, nan_ok=True)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"adapter", "rounds.json", "rounds_train_loss.png", "summary.json", "model"} <= artifacts, artifacts


def test_secure_aggregate_equals_plain_aggregate_within_quantisation_error(secure_run, cohort, tmp_path):
    """Each round's SecAgg+ aggregate against the plain example-weighted mean of the same sites' updates."""
    cfg, out, _ = secure_run
    fed = cfg.federation
    plain_cfg = config("federation.secure_aggregation=false")
    clients = site_clients(plain_cfg, cohort, tmp_path)
    previous = initial_adapter_state(cfg)
    for rnd in (1, 2):
        ckpt = load_round(out / "checkpoints", rnd)
        fid = ckpt.extra["federation_id"]
        updates = site_updates(clients, previous, rnd, fid, secure=False)
        cases = [site.session.num_train_cases for site in clients]
        mean = weighted_mean(updates, cases)
        expected = {k: previous[k] + mean[k] for k in previous}

        # The unmasked value is the plain mean over sites of [w * delta, w]; each site's stochastic rounding moves
        # it by less than one step 2c/Q, and dividing by the mean weight magnifies that (finish_secure_sum).
        step = 2 * fed.secagg_clipping_range / fed.secagg_quantization_range
        mean_w = sum(secure_weight(n, secure_weight_cap(cfg), dp=False) for n in cases) / len(cases)
        for name, value in ckpt.global_state.items():
            bound = (step + mean[name].abs() * step) / (mean_w - step) + 1e-6
            assert bool(((value - expected[name]).abs() <= bound).all()), f"round {rnd}: {name}"
        # ...and the sites sent exactly the masked-in versions of these updates
        for root, site in zip(cohort, clients):
            assert sent_hashes(root, fid, rnd)  # every site's send is on its own record
        previous = ckpt.global_state


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(secure_run, cohort, tmp_path, tracked):
    _, _, uninterrupted = secure_run
    cfg = tracked("federation.secure_aggregation=true")
    out = tmp_path / "resumed"
    first = simulate(tracked("federation.secure_aggregation=true", "federation.rounds=1"), cohort, out)
    assert first["rounds_completed"] == 1
    second = simulate(cfg, cohort, out, resume=True)
    assert second["rounds_completed"] == 2 and [r["round"] for r in second["rounds"]] == [1, 2]
    assert second["run_id"] == first["run_id"] and second["federation_id"] == first["federation_id"]
    resumed = load_round(out / "checkpoints", 2).global_state
    reference = load_round(Path(uninterrupted["checkpoint"]).parent, 2).global_state
    # Bit for bit: the sites reseed from (seed, site, round), SecAgg+'s stochastic rounding draws from the
    # generator they seed, and its masks cancel exactly in modular arithmetic.
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name

    with pytest.raises(ConfigError, match="already holds"):
        simulate(cfg, cohort, out)  # a finished federation's folder is not silently overwritten


def test_masked_vectors_packed_as_uint32_give_the_bit_identical_aggregate_at_4_bytes_a_value(
    secure_run, cohort, tmp_path, tracked
):
    cfg, _, packed = secure_run
    out = tmp_path / "int64"
    flower = simulate(tracked("federation.secure_aggregation=true", "federation.secagg_packed=false"), cohort, out)
    for rnd in (1, 2):  # Flower's own int64 upload and fedmusk's uint32 one: the same global adapter, bit for bit
        reference = load_round(out / "checkpoints", rnd).global_state
        ours = load_round(Path(packed["checkpoint"]).parent, rnd).global_state
        assert all(torch.equal(ours[name], value) for name, value in reference.items())
    # the bytes counted on the wire differ by exactly 4 bytes per masked value (the update, fedmusk's weight and
    # Flower's weight factor), per site and round
    layout = AdapterLayout.of(initial_adapter_state(cfg)).update_layout("fedit", secure=True)
    values = sum(int(torch.Size(s).numel()) for s in layout.shapes) + 1
    for ours, reference in zip(packed["rounds"], flower["rounds"]):
        assert reference["bytes_up_per_client"] - ours["bytes_up_per_client"] == 4 * values


def test_ffa_lora_aggregate_is_the_exact_mean_of_the_sites_updates(cohort, tmp_path, tracked):
    cfg = tracked("federation.strategy=ffa", "train.lora.ffa=true", "federation.secure_aggregation=false",
                 "federation.rounds=1")  # fmt: skip
    out = tmp_path / "ffa"
    simulate(cfg, cohort, out)
    ckpt = load_round(out / "checkpoints", 1)
    fid = ckpt.extra["federation_id"]
    initial = initial_adapter_state(cfg)
    assert not any(".lora_A." in name for name in ckpt.global_state)  # A never travels

    clients = site_clients(cfg, cohort, tmp_path)
    updates = site_updates(clients, initial, 1, fid, secure=False)
    for root, update in zip(cohort, updates):  # the same updates the sites sent
        assert sent_hashes(root, fid, 1) == {n: tensor_record(n, t)["sha256"] for n, t in update.items()}
    cases = [site.session.num_train_cases for site in clients]
    frozen_a = {k: v for k, v in full_adapter_state(clients[0].session.trainer.model, False).items() if ".lora_A." in k}

    def products(state):
        return lora_products({**frozen_a, **{k: v for k, v in state.items() if ".lora_B." in k}})

    site_products = [products({k: initial[k] + u[k] for k in u}) for u in updates]
    exact = weighted_mean(site_products, cases)  # the mean of the sites' B_i @ A
    aggregated = products(ckpt.global_state)
    for layer, value in exact.items():
        torch.testing.assert_close(aggregated[layer], value, rtol=0, atol=1e-6)


def rolora_rounds(cfg, out, cohort, tmp_path):
    """Per round of a finished RoLoRA federation in ``out``: (round, factor, previous global, global after, the
    sites' updates recomputed outside Flower, their training cases)."""
    plain = config("federation.strategy=rolora", "federation.secure_aggregation=false")
    clients = site_clients(plain, cohort, tmp_path)
    previous = initial_adapter_state(cfg)
    for rnd, factor in ((1, "B"), (2, "A")):
        ckpt = load_round(out / "checkpoints", rnd)
        updates = site_updates(clients, previous, rnd, ckpt.extra["federation_id"], secure=False)
        cases = [site.session.num_train_cases for site in clients]
        yield rnd, factor, previous, ckpt, updates, cases
        previous = ckpt.global_state


def test_rolora_aggregate_is_the_exact_mean_of_the_sites_products_in_b_and_in_a_rounds(cohort, tmp_path, tracked):
    cfg = tracked("federation.strategy=rolora", "federation.secure_aggregation=false")  # 2 rounds: B, then A
    out = tmp_path / "rolora"
    simulate(cfg, cohort, out)
    for rnd, factor, previous, ckpt, updates, cases in rolora_rounds(cfg, out, cohort, tmp_path):
        fid = ckpt.extra["federation_id"]
        for root, update in zip(cohort, updates):  # the same updates the sites sent: this round's factor only
            assert sent_hashes(root, fid, rnd) == {n: tensor_record(n, t)["sha256"] for n, t in update.items()}
            lora = [n for n in update if ".lora_" in n]
            assert lora and all(f".lora_{factor}." in n for n in lora), (rnd, lora[:2])
        other = ".lora_A." if factor == "B" else ".lora_B."
        assert all(torch.equal(ckpt.global_state[n], v) for n, v in previous.items() if other in n)
        site_products = [lora_products({**previous, **{k: previous[k] + u[k] for k in u}}) for u in updates]
        exact = weighted_mean(site_products, cases)  # the mean of the sites' B_i @ A (round 1), B @ A_i (round 2)
        aggregated = lora_products(ckpt.global_state)
        assert any(bool(v.abs().sum() > 0) for v in exact.values())
        for layer, value in exact.items():
            torch.testing.assert_close(aggregated[layer], value, rtol=0, atol=1e-6)


def test_rolora_under_secagg_equals_the_plain_mean_of_the_rounds_factor(cohort, tmp_path, tracked):
    cfg = tracked("federation.strategy=rolora", "federation.secure_aggregation=true")
    out = tmp_path / "rolora-secure"
    summary = simulate(cfg, cohort, out)
    assert summary["rounds_completed"] == 2
    fed = cfg.federation
    step = 2 * fed.secagg_clipping_range / fed.secagg_quantization_range
    for rnd, factor, previous, ckpt, updates, cases in rolora_rounds(cfg, out, cohort, tmp_path):
        mean = weighted_mean(updates, cases)
        mean_w = sum(secure_weight(n, secure_weight_cap(cfg), dp=False) for n in cases) / len(cases)
        assert {n for n in mean if ".lora_" in n} and all(f".lora_{factor}." in n for n in mean if ".lora_" in n)
        for name, value in ckpt.global_state.items():
            if name not in mean:
                assert torch.equal(value, previous[name]), name  # the other factor did not move
                continue
            bound = (step + mean[name].abs() * step) / (mean_w - step) + 1e-6
            assert bool(((value - previous[name] - mean[name]).abs() <= bound).all()), f"round {rnd}: {name}"


def test_a_refusing_site_drops_out_and_too_few_replies_fail_the_round(cohort, tmp_path, tracked):
    sites = tmp_path / "sites"
    roots = [Path(shutil.copytree(root, sites / root.name)) for root in cohort]
    (roots[2] / "site-policy.yaml").write_text("max_update_norm: 1.0e-12\non_norm_exceeded: refuse\n")

    summary = simulate(tracked("federation.rounds=1"), roots, tmp_path / "two-of-three")
    record = summary["rounds"][0]
    assert record["sampled"] == 3 and record["replies"] == 2
    assert any(roots[2].name in f and "refused" in f for f in record["failures"])
    refusals = [e for e in AuditLog(roots[2] / ".fedmusk" / "audit.jsonl").entries() if e["event"] == "refusal"]
    assert refusals and "max_update_norm" in refusals[-1]["reasons"][0]

    with pytest.raises(RoundFailed, match=r"round 1: 2 sites replied and 1 failed .*min_replies is 3"):
        simulate(tracked("federation.rounds=1", "federation.min_replies=3"), roots, tmp_path / "too-few")

    # two refusing sites: SecAgg+ cannot unmask and halts without raising; the coordinator must not carry on
    (roots[1] / "site-policy.yaml").write_text("max_update_norm: 1.0e-12\n")
    with pytest.raises(RoundFailed, match="round 1: no new global adapter"):
        simulate(tracked("federation.rounds=1", "federation.min_replies=1"), roots, tmp_path / "halted")


def test_a_pretraining_phase_runs_before_the_outcome_rounds_and_hands_over_its_lora(cohort, tmp_path, tracked):
    # One site has no pretrain/ folder and a blank scan: it pretrains on its own training cases, and the case of the
    # blank slide is excluded and counted instead of stopping the site (and with it the federation).
    from _validation_helpers import blank_first_training_slide

    from fedmusk.training.pretrain import lora_only

    cfg = tracked("federation.pretrain_rounds=1", "federation.rounds=1", "train.pretrain.steps=2",
                  "federation.secure_aggregation=false")  # fmt: skip
    roots = [Path(shutil.copytree(root, tmp_path / "sites" / root.name)) for root in cohort]
    shutil.rmtree(roots[2] / "pretrain")
    blank_first_training_slide(roots[2])
    manifest = roots[1] / "manifest.csv"  # and another site has no test cases
    manifest.write_text(manifest.read_text().replace(",test\n", ",val\n"))
    out = tmp_path / "pretrained"
    summary = simulate(cfg, roots, out)
    assert summary["rounds_completed"] == 2
    on_disk = json.loads((out / "rounds.json").read_text())
    for rounds in (summary["rounds"], on_disk):
        pre, outcome = rounds
        assert (pre["phase"], outcome["phase"]) == ("pretrain", "outcome")
        assert pre["replies"] == 3 and outcome["replies"] == 3
        assert pre["failures"] == [] and outcome["failures"] == []
        assert sorted(pre["per_site"]) == sorted(r.name for r in roots)
        assert "val_loss" in pre["aggregated"] and not any("c_index" in k for k in pre["aggregated"])
        assert "val_c_index" in outcome["aggregated"] and "val_loss" not in outcome["aggregated"]
        assert outcome["per_site"][roots[2].name]["excluded_no_tissue"] == 1
        assert outcome["aggregated"]["excluded_no_tissue"] == 1 and outcome["aggregated"]["excluded_unreadable"] == 0
    assert summary["excluded"][roots[2].name] == {"no_tissue": 1, "unreadable": 0}
    assert summary["excluded"][roots[0].name] == {"no_tissue": 0, "unreadable": 0}
    assert summary["test"]["per_site"][roots[1].name] == {"c_index": None, "auc": None, "n": 0,
                                                          "note": "this site has no test cases"}  # fmt: skip
    assert summary["test"]["pooled"]["n"] == sum(summary["test"]["per_site"][r.name]["n"] for r in roots) > 0

    pretrained = load_round(out / "checkpoints", 1)
    assert pretrained.extra["phase"] == "pretrain" and load_round(out / "checkpoints", 2).extra["phase"] == "outcome"
    # the outcome phase starts from the pretrained global LoRA with fresh outcome heads: what a coordinator
    # resuming after the pretraining round builds at round 2
    partial = tmp_path / "after-pretraining"
    shutil.copytree(pretrained.path, partial / "checkpoints" / pretrained.path.name)
    controller = RoundController(cfg, partial, resume=True, tracker_factory=FakeTracker)
    assert list(controller.rounds_to_run()) == [2] and controller.begin_round(2) == "outcome"
    start = controller.global_state
    assert set(start) == set(initial_adapter_state(cfg))
    lora = lora_only(pretrained.global_state)
    assert lora and all(torch.equal(start[name], value) for name, value in lora.items())
    assert any(bool(value.abs().sum() > 0) for name, value in lora.items() if ".lora_B." in name)  # it trained
