"""A real deployment on 127.0.0.1: `fedmusk server` (SuperLink with TLS and node authentication) and three
`fedmusk client` daemons (SuperNodes with site keys), each a separate process tree as on separate machines.

One module-scoped federation serves the scenarios in order: a SecAgg+ run of 2 rounds (with a client holding an
unregistered key and one trusting the wrong CA trying to join while it runs), a run whose coordinator is killed
after round 1 and resumed, and a run in which one hospital's SuperNode is killed mid-round. Every process is
started in its own process group and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedmusk.data.synth.cohort import synthesize_cohort
from fedmusk.ops.certs import add_site, init_ca, site_key_pair
from fedmusk.ops.coordinator import _write_app
from fedmusk.ops.supervise import free_port

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
FEDERATION = """\
device: cpu
data: {tile_size: 96, max_tiles_per_slide: 16}
model: {max_text_len: 64}
train: {epochs: 1, bootstrap: 20, lr: 0.002, lora: {experts: [B]}}
federation: {rounds: 2, pretrain_rounds: 0, local_epochs: 1, min_sites: 3, min_replies: 2,
             wait_for_sites_s: 240, reply_timeout_s: 300}
"""
RUN_TIMEOUT_S = 600


class Proc:
    """A `fedmusk` command in its own process group, output to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmusk.cli", *args], stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.log_path.name} did not finish within {timeout:g} s:\n{self.output()[-3000:]}")

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> None:
        """Wait until the output after character ``since`` matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()[since:]):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log_path.name} exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            time.sleep(0.5)
        pytest.fail(f"{self.log_path.name} never printed {pattern!r}:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the daemons' SuperNodes run in process groups of their own)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(status.parent.name))
    return found


@pytest.fixture(scope="module")
def env():
    home = tempfile.mkdtemp(prefix="fmdeploy")
    environ = {
        **os.environ, "FLWR_HOME": home, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "200",
    }  # fmt: skip
    yield environ
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, env):
    """Three hospitals with their data and key bundles, a coordinator's certificate folder, a free port."""
    root = tmp_path_factory.mktemp("deployment")
    sites = synthesize_cohort(
        root / "hospitals", sites=3, cases_per_site=8, tile_px=96, slide_px=256, pretrain_tiles=2,
        pretrain_reports=2, progress=False, workers=1,
    )  # fmt: skip
    certs = root / "certs"
    init_ca(certs)
    for name in SITES:
        add_site(certs, name)
    stranger = site_key_pair(root / "stranger", "stranger")  # a key no coordinator registered
    other_ca = init_ca(root / "other-certs")  # a CA that did not sign the SuperLink's certificate
    config = root / "federation.yaml"
    config.write_text(FEDERATION)
    world = {
        "root": root, "sites": dict(zip(SITES, sites, strict=True)), "certs": certs, "config": config,
        "state": root / "coordinator", "port": free_port(), "stranger": stranger, "other_ca": other_ca,
        "daemons": {},
    }  # fmt: skip
    yield world
    for daemon in world["daemons"].values():
        daemon.stop()


def server(world, env, name: str, *args: str) -> Proc:
    return Proc(
        ["server", str(world["config"]), *args, "--certs", str(world["certs"]), "--state", str(world["state"]),
         "--out", str(world["root"] / name), "--port", str(world["port"])],
        world["root"] / f"{name}.server.log", env,
    )  # fmt: skip


def client(world, env, name: str, site: str, ca: Path, key: Path, *args: str) -> Proc:
    world.setdefault("runtime_ports", {})[name] = port = free_port()
    return Proc(
        ["client", str(world["sites"][site]), "--name", site, "--superlink", f"127.0.0.1:{world['port']}",
         "--ca", str(ca), "--key", str(key), "--runtime-port", str(port), "--quick", *args],
        world["root"] / f"{name}.client.log", env,
    )  # fmt: skip


def bundle(world, site: str) -> tuple[Path, Path]:
    folder = world["certs"] / "sites" / site
    return folder / "ca.crt", folder / "site.key"


def rounds(out: Path) -> list[dict]:
    try:
        return json.loads((out / "rounds.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.fixture(scope="module")
def first_run(world, env):
    """The federation's first run, with two unwelcome clients trying to join while it runs."""
    coordinator = server(world, env, "first")
    coordinator.wait_for(r"federation started", 120)
    for site in SITES:
        world["daemons"][site] = client(world, env, site, site, *bundle(world, site))
    stranger = client(
        world, env, "stranger", "site-1", bundle(world, "site-1")[0], world["stranger"].private_key,
        "--registration-wait", "0",
    )  # fmt: skip
    wrong_ca = client(world, env, "wrong-ca", "site-2", world["other_ca"].ca_cert, bundle(world, "site-2")[1])
    outcomes = {"stranger": stranger.wait(180), "wrong_ca": wrong_ca.wait(120)}
    outcomes["stranger_output"], outcomes["wrong_ca_output"] = stranger.output(), wrong_ca.output()
    code = coordinator.wait(RUN_TIMEOUT_S)
    outcomes["sites_output"] = {site: world["daemons"][site].output() for site in SITES}
    return {"code": code, "output": coordinator.output(), "out": world["root"] / "first", **outcomes}


def test_tls_federation_with_registered_sites_completes_two_secure_rounds(first_run):
    assert first_run["code"] == 0, first_run["output"][-3000:]
    history = rounds(first_run["out"])
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["replies"] == 3 for r in history), history
    assert all(sorted(r["train_loss"]) == sorted(SITES) for r in history), history  # the names the sites run under
    assert set(history[-1]["per_site"]) <= set(SITES), history[-1]
    assert (first_run["out"] / "adapter" / "adapter_model.safetensors").is_file()
    assert "2 rounds completed" in first_run["output"]


def test_each_site_builds_its_model_once_per_run_not_once_per_message(first_run):
    assert first_run["code"] == 0
    for site, output in first_run["sites_output"].items():
        messages = re.findall(r"(train|evaluate) message of run \d+ received", output)
        assert len(messages) >= 10, (site, messages)  # 2 SecAgg+ rounds: 4 training stages and 1 evaluation each
        assert output.count("outcome model built") == 1, output[-3000:]
        assert "flwr-clientapp" not in output  # no per-message ClientApp process, no bundle installed


def test_a_sites_runtime_port_serves_task_claims_only_with_its_secret(first_run, world):
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedmusk.ops.daemon import runtime_folder
    from fedmusk.ops.worker import ACQUIRE_METHOD, CLIENT_TASK

    assert first_run["code"] == 0
    address = f"127.0.0.1:{world['runtime_ports']['site-1']}"
    runtime = runtime_folder(world["sites"]["site-1"], world["runtime_ports"]["site-1"])
    secret = (runtime / "superexec.secret").read_bytes()
    request = AcquireTaskRequest(supported_task_types=[CLIENT_TASK])
    for wrong in (None, b"a guess"):
        interceptors = [] if wrong is None else [
            SuperExecAuthHttpInterceptor(master_secret=wrong, protected_methods={ACQUIRE_METHOD})
        ]  # fmt: skip
        stranger = RuntimeHttpClient.from_server_address(address, True, None, interceptors)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            stranger.AcquireTask(request)
        assert refused.value.response.status_code in (401, 403)
    signed = [SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})]
    assert not RuntimeHttpClient.from_server_address(address, True, None, signed).AcquireTask(request).token


def test_client_with_an_unregistered_key_is_refused(first_run):
    assert first_run["stranger"] == 2, first_run["stranger_output"][-2000:]
    assert "does not accept this site's key" in first_run["stranger_output"]
    assert "Traceback" not in first_run["stranger_output"]


def test_client_trusting_another_ca_stops_with_a_clear_error(first_run):
    assert first_run["wrong_ca"] == 2, first_run["wrong_ca_output"][-2000:]
    text = " ".join(first_run["wrong_ca_output"].split())
    assert "does not check out against ca.crt" in text and "unable to get local issuer certificate" in text
    assert "Traceback" not in text


def test_keys_and_site_paths_stay_out_of_logs_databases_and_the_tracking_store(first_run, world):
    secrets = [_key_body(p) for p in world["certs"].rglob("*.key")]
    site_paths = [str(p) for p in world["sites"].values()]
    coordinator_side = [p for p in [*world["state"].rglob("*"), *first_run["out"].rglob("*")] if p.is_file()]
    assert any(p.name == "superlink.db" for p in coordinator_side)
    assert any(p.name == "mlflow.db" for p in coordinator_side)
    site_logs = [site / ".fedmusk" / "logs" / "client.log" for site in world["sites"].values()]
    assert all(log.is_file() and log.stat().st_mode & 0o077 == 0 for log in site_logs)
    for site in world["sites"].values():  # what the daemon and its worker wrote there: this account's only
        for path in [site / ".fedmusk" / "runtime", *(site / ".fedmusk" / "runtime").iterdir()]:
            assert path.stat().st_mode & 0o077 == 0, path
    for path in [*coordinator_side, *site_logs, world["root"] / "first.server.log"]:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"key material in {path}"
        if path not in site_logs:  # a site's own log may name its folder only as <site>
            for site in site_paths:
                assert site.encode() not in data, f"a site path in {path}"
    for log in site_logs:
        assert str(log.parent.parent.parent).encode() not in log.read_bytes(), f"the site path in {log}"


def _key_body(path: Path) -> bytes:
    """The base64 body of a private key file: what must never be copied anywhere."""
    lines = [line for line in path.read_bytes().splitlines() if line and not line.startswith(b"-----")]
    return b"".join(lines)[:48]


def test_coordinator_killed_after_round_one_resumes_to_the_same_result(first_run, world, env):
    assert first_run["code"] == 0
    out = world["root"] / "crash"
    coordinator = server(world, env, "crash")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not rounds(out) and time.monotonic() < deadline:
        assert coordinator.proc.poll() is None, coordinator.output()[-3000:]
        time.sleep(0.5)
    assert [r["round"] for r in rounds(out)] == [1]
    # A crash of the coordinator's machine: the command and the SuperLink with its ServerApp die at once.
    superlink = int((world["state"] / "superlink.pid").read_text())
    coordinator.stop(signal.SIGKILL)
    kill_group(superlink, signal.SIGKILL)

    resumed = server(world, env, "crash", "--resume")
    assert resumed.wait(RUN_TIMEOUT_S) == 0, resumed.output()[-3000:]
    assert [r["round"] for r in rounds(out)] == [1, 2]
    first = load_file(first_run["out"] / "adapter" / "adapter_model.safetensors")
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys()
    for name in first:
        assert first[name].equal(again[name]), name


EVIL_SERVER = """\
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes, deadline = [], time.time() + 120
    while len(nodes) < 3 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=n, message_type="train")
                for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=180))
    answers = [r.error.reason if r.has_error() else "content" for r in replies]
    Path(MARKERS, "server-done.json").write_text(json.dumps(answers))
"""
SHADOW_CLIENT = """\
import os
from pathlib import Path
Path(MARKERS, f"client-ran-{os.getpid()}").write_text("this code ran at a hospital")
from flwr.clientapp import ClientApp
app = ClientApp()
"""


def test_a_foreign_app_bundle_runs_no_code_at_any_hospital(first_run, world, env, tmp_path):
    """A bundle submitted on the coordinator's own Control API that would shadow fedmusk at the hospitals."""
    assert first_run["code"] == 0
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = tmp_path / "evil-app"
    _write_app(evil)  # the coordinator's own app description, then code added as an attacker would
    project = evil / "pyproject.toml"
    project.write_text(project.read_text().replace("fedmusk.server.server_app:app", "evil_server:app"))
    (evil / "evil_server.py").write_text(EVIL_SERVER.replace("MARKERS", repr(str(markers))))
    (evil / "fedmusk" / "client").mkdir(parents=True)
    (evil / "fedmusk" / "__init__.py").write_text("")
    (evil / "fedmusk" / "client" / "__init__.py").write_text("")
    (evil / "fedmusk" / "client" / "client_app.py").write_text(SHADOW_CLIENT.replace("MARKERS", repr(str(markers))))
    audits = {site: root / ".fedmusk" / "audit.jsonl" for site, root in world["sites"].items()}
    coordinator = server(world, env, "foreign", "federation.secure_aggregation=false", "federation.rounds=1")
    coordinator.wait_for(r"federation started", 120)
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", str(evil), "fedmusk", "--format", "json"],
        env={**env, "FLWR_HOME": str(world["state"] / "flower")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert '"success": true' in submitted.stdout, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (markers / "server-done.json").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    assert coordinator.wait(RUN_TIMEOUT_S) == 0, coordinator.output()[-3000:]
    answers = json.loads((markers / "server-done.json").read_text())
    assert len(answers) == 3 and all("refused the run's app bundle" in a for a in answers), answers
    assert not list(markers.glob("client-ran-*")), "bundle code ran at a hospital"
    for site, audit in audits.items():
        refusals = [e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == "refused-bundle"]
        assert refusals and "fedmusk/client/client_app.py" in refusals[-1]["reasons"][0], site


def test_a_site_worker_killed_mid_round_is_restarted_and_the_round_completes(first_run, world, env):
    assert first_run["code"] == 0
    victim = world["daemons"]["site-3"]
    before = len(victim.output())
    coordinator = server(
        world, env, "lost", "federation.secure_aggregation=false", "federation.rounds=1",
        "federation.reply_timeout_s=60",
    )  # fmt: skip
    victim.wait_for(r"train message of run \d+ received", RUN_TIMEOUT_S, since=before)
    workers = [pid for pid in child_pids(victim.proc.pid) if b"fedmusk.ops.worker" in _cmdline(pid)]
    assert len(workers) == 1
    kill_group(workers[0], signal.SIGKILL)  # the worker, in the middle of its training
    assert coordinator.wait(RUN_TIMEOUT_S) == 0, coordinator.output()[-3000:]
    (record,) = rounds(world["root"] / "lost")
    assert record["sampled"] == 3 and record["replies"] >= 2, record
    victim.wait_for(r"the site worker stopped \(exit -9\); starting it and the SuperNode again", 30, since=before)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
