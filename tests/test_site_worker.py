"""What a hospital runs and what it accepts from a coordinator: only its installed fedmusk, configuration as plain
data, its own paths and devices, the run's base model.

The deployed behaviour (a real SuperNode, a foreign bundle submitted to a running SuperLink) is in
tests/test_deployment.py; these tests pin the rules it relies on, without Flower processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import parse_config_args

from fedmusk.client.site_client import site_address, site_config
from fedmusk.config import ConfigError, FedMuskConfig, load_config
from fedmusk.ops.coordinator import _write_app
from fedmusk.ops.daemon import runtime_folder, toml_string, write_runtime_files
from fedmusk.ops.worker import (
    FLOWER_VERSION,
    WorkerError,
    bundle_problems,
    check_flower_version,
)
from fedmusk.site_settings import load_site_settings, parse_coordinator_config
from fedmusk.wire import NODE_SITE_ROOT, RUN_BASE_MODEL, RUN_CONFIG, RUN_SITE_SETTINGS, wire_run_config


def fab(folder: Path) -> bytes:
    return build_fab_from_disk(folder)


@pytest.fixture
def fedmusk_app(tmp_path) -> Path:
    return _write_app(tmp_path / "app")


def test_the_coordinators_own_bundle_is_accepted(fedmusk_app):
    assert bundle_problems(fab(fedmusk_app)) == []


def test_a_bundle_carrying_code_that_would_shadow_fedmusk_is_refused(fedmusk_app):
    shadow = fedmusk_app / "fedmusk" / "client"
    shadow.mkdir(parents=True)
    (fedmusk_app / "fedmusk" / "__init__.py").write_text("")
    (shadow / "client_app.py").write_text("open('/tmp/pwned', 'w')\n")
    problems = bundle_problems(fab(fedmusk_app))
    assert problems and "fedmusk/client/client_app.py" in problems[0]


def test_a_bundle_naming_other_components_is_refused(fedmusk_app):
    project = fedmusk_app / "pyproject.toml"
    project.write_text(project.read_text().replace("fedmusk.client.client_app:app", "evil.client:app"))
    (problem,) = bundle_problems(fab(fedmusk_app))
    assert "clientapp is 'evil.client:app'" in problem


def test_something_that_is_not_a_bundle_is_refused_without_reading_it_as_code():
    assert "not a readable app description" in bundle_problems(b"#!/bin/sh\nrm -rf /\n")[0]


def test_the_worker_runs_only_with_the_flower_version_it_speaks():
    check_flower_version()  # the installed one: pinned in pyproject.toml
    with pytest.raises(WorkerError, match=rf"speaks Flower {FLOWER_VERSION}.*Flower 1\.43\.0 is installed"):
        check_flower_version("1.43.0")


def test_a_worker_whose_claims_are_refused_stops_saying_the_secret_differs():
    """A SuperNode that refuses the worker's claims (another secret) stops the worker with a reason, not a retry
    loop: the daemon then stops the site (exit 2) instead of idling."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fedmusk.ops.worker import SiteWorker

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the handler's name is http.server's
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        worker = SiteWorker(f"127.0.0.1:{server.server_address[1]}", b"0" * 64)
        with pytest.raises(WorkerError, match="refuses this worker's claims: the shared secret differs"):
            worker.serve(threading.Event())
    finally:
        server.shutdown()
        server.server_close()


def test_node_config_values_with_quotes_spaces_and_unicode_reach_flower_intact(tmp_path):
    values = {
        "site-root": '/data/St. Mary\'s "North" wing/site 1', "site-name": "site-1",
        "policy": "C:\\policies\\ward\tA.yaml", "coordinator": "kö.example.org:9092",
    }  # fmt: skip
    secret, node_config = write_runtime_files(tmp_path / "runtime", values)
    assert parse_config_args([str(node_config)]) == values
    assert (tmp_path / "runtime").stat().st_mode & 0o777 == 0o700
    for path in (secret, node_config):
        assert path.stat().st_mode & 0o777 == 0o600
    assert len(secret.read_bytes()) == 64
    assert toml_string('a"b') == '"a\\"b"'


def test_a_second_daemon_on_a_site_leaves_the_running_daemons_secret_alone(tmp_path):
    """Two `fedmusk client` on one site folder (a second start by mistake, a stranger's key): each has its runtime
    port and its own runtime files, so the running SuperNode and its worker keep sharing one secret."""
    running = write_runtime_files(runtime_folder(tmp_path, 9094), {"site-name": "site-1"})
    before = [p.read_bytes() for p in running]
    second = write_runtime_files(runtime_folder(tmp_path, 9095), {"site-name": "site-1"})
    assert [p.read_bytes() for p in running] == before
    assert second[0].read_bytes() != before[0]


def test_each_daemon_start_writes_a_new_secret(tmp_path):
    first = write_runtime_files(tmp_path, {"site-name": "a"})[0].read_bytes()
    assert write_runtime_files(tmp_path, {"site-name": "a"})[0].read_bytes() != first


# --- what the coordinator sends, and what the site fills in -----------------------------------------------------


def test_coordinator_interpolation_is_refused_not_resolved_at_the_site(monkeypatch):
    monkeypatch.setenv("HOSPITAL_SECRET", "s3cret")
    text = "train:\n  lr: 0.001\ntracking:\n  experiment: ${oc.env:HOSPITAL_SECRET}\n"
    with pytest.raises(ConfigError, match=r"'tracking.experiment' uses interpolation"):
        parse_coordinator_config(text)


def test_a_coordinator_chosen_path_is_refused_at_the_site():
    with pytest.raises(ConfigError, match=r"sets 'model.weights', a setting of this site's own machine"):
        parse_coordinator_config("model:\n  weights: /coordinator/musk/model.safetensors\n")


def test_unknown_keys_and_non_mappings_from_the_coordinator_are_refused():
    with pytest.raises(ConfigError, match=r"unknown configuration key 'federation.strategee'"):
        parse_coordinator_config("federation:\n  strategee: fedit\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_coordinator_config("- a\n- b\n")


def test_what_a_coordinator_sends_carries_no_site_local_setting(tmp_path):
    weights = tmp_path / "tok.spm"
    weights.write_bytes(b"not really a tokenizer")
    cfg = load_config([], ["device=cpu", "data.batch_size=7", f"model.tokenizer={weights}", "train.epochs=3"])
    wire = wire_run_config(cfg)
    assert str(tmp_path) not in wire[RUN_CONFIG] and "batch_size: 32" in wire[RUN_CONFIG]
    sent = parse_coordinator_config(wire[RUN_CONFIG])
    assert sent.train.epochs == 3 and sent.device == "auto" and sent.model.tokenizer is None
    assert json.loads(wire[RUN_BASE_MODEL])["tokenizer"] != "none"


def deployed_site(tmp_path: Path, settings: str, tokenizer: bytes) -> Path:
    """A site folder holding its own tokenizer file and a site-settings.yaml."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tok.spm").write_bytes(tokenizer)
    (site / "site-settings.yaml").write_text(settings)
    return site


def config_at(site: Path, run_config: dict):
    """The configuration the deployed site at ``site`` trains with for ``run_config``."""
    node_config = {NODE_SITE_ROOT: str(site)}
    return site_config(run_config, node_config, site_address(node_config, run_config))


def test_a_deployed_site_uses_its_own_settings_file(tmp_path):
    settings = "device: cpu\ndata: {batch_size: 4}\nmodel: {tokenizer: tok.spm}\n"
    site = deployed_site(tmp_path, settings, b"tokenizer bytes")
    coordinator = tmp_path / "coordinator-tok.spm"
    coordinator.write_bytes(b"tokenizer bytes")  # the same release file, elsewhere on another machine
    run_config = wire_run_config(load_config([], [f"model.tokenizer={coordinator}", "train.epochs=2"]))
    cfg = config_at(site, run_config)
    assert (cfg.device, cfg.data.batch_size, cfg.train.epochs) == ("cpu", 4, 2)
    assert cfg.model.tokenizer == str((site / "tok.spm").resolve())


def test_a_site_whose_base_model_differs_refuses_and_says_which_file(tmp_path):
    site = deployed_site(tmp_path, "model: {tokenizer: tok.spm}\n", b"an older tokenizer")
    theirs = tmp_path / "tok.spm"
    theirs.write_bytes(b"the release tokenizer")
    run_config = wire_run_config(load_config([], [f"model.tokenizer={theirs}"]))
    with pytest.raises(ConfigError, match=r"this site's tokenizer \(model.tokenizer in site-settings.yaml"):
        config_at(site, run_config)


def test_a_deployed_site_ignores_no_site_settings_sent_by_a_coordinator(tmp_path):
    run_config = {**wire_run_config(FedMuskConfig()), RUN_SITE_SETTINGS: json.dumps({"device": "cuda:7"})}
    with pytest.raises(ConfigError, match="carries 'site-settings': a site chooses its own"):
        config_at(tmp_path, run_config)


def test_a_settings_file_may_set_only_site_local_keys(tmp_path):
    path = tmp_path / "site-settings.yaml"
    path.write_text("federation: {rounds: 50}\n")
    with pytest.raises(ConfigError, match=r"'federation.rounds' is not a site-local setting"):
        load_site_settings(path)
    path.write_text("data: {batch_size: many}\n")
    with pytest.raises(ConfigError, match=r"bad value for 'data.batch_size'"):
        load_site_settings(path)
