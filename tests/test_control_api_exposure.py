"""What a stranger on the network can do against the coordinator's public port: nothing but SuperNode Fleet calls.

Flower 1.42's SuperLink serves its unauthenticated Control API (register node keys, list nodes, start and stop runs,
stream logs), the Runtime API, /docs and /openapi.json beside the Fleet API. `fedmusk server` keeps the SuperLink on
127.0.0.1 and publishes a proxy that forwards only the Fleet routes. The first tests try the proxy alone against a
stand-in upstream (fast); the slow ones attack a real `fedmusk server` (real certificates, node authentication, a run
waiting for its sites) with three kinds of client: one that checks no certificate, one that trusts only ca.crt, and
one that signs its requests with a registered site's key. Every process runs in its own process group and is stopped
by its pid; every wait is bounded.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmusk.ops import fleet_proxy
from fedmusk.ops.certs import CertPaths, add_site, init_ca, site_key_pair
from fedmusk.ops.supervise import Child, flower_env, free_port

CONTROL_ATTACKS = ("register-node", "unregister-node", "list-nodes", "list-runs", "start-run", "stop-run",
                   "stream-logs", "pull-artifacts")  # fmt: skip
ODD_PATHS = (
    "/V1/FLEET/GET-RUN", "/v1/fleet/../control/list-runs", "/v1/control/../fleet/get-run", "//v1/fleet/get-run",
    "/v1//fleet/get-run", "/v1/fleet/get-run/", "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/control/%2E%2E/fleet/get-run",
    "/v1/fleet%2F..%2Fcontrol/list-runs", "/v1/fleet/get-run%00", "/v1/fleet/", "/v1/fleet",
)  # fmt: skip
FEDERATION = """\
device: cpu
data: {tile_size: 96, max_tiles_per_slide: 16}
model: {max_text_len: 64}
train: {epochs: 1, lora: {experts: [B]}}
federation: {rounds: 1, pretrain_rounds: 0, min_sites: 3, min_replies: 3, wait_for_sites_s: 600}
"""


def raw_post(port: int, path: str, headers: dict[str, str] | None = None, ca: Path | None = None) -> tuple[int, bytes]:
    """POST ``path`` exactly as written (no normalisation: http.client sends it byte for byte) over TLS."""
    import http.client

    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()  # noqa: S323
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
    try:
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def signed_headers(private_key_file: Path) -> tuple[dict[str, str], bytes]:
    """The node-authentication headers flower-supernode sends (a signed timestamp), and the PEM public key."""
    key = serialization.load_ssh_private_key(private_key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    headers = {"flwr-public-key": base64.b64encode(public).decode(), "flwr-timestamp": stamp,
               "flwr-signature": base64.b64encode(signature).decode()}  # fmt: skip
    return headers, public


# --- the proxy alone, against a stand-in upstream (fast) -----------------------------------------------------------


class _Echo(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = f"UPSTREAM {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def proxy_alone(tmp_path_factory):
    """A real Caddy with fedmusk's configuration in front of a TLS echo server holding the SuperLink certificate."""
    root = tmp_path_factory.mktemp("proxy")
    paths = init_ca(root / "certs")
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    config = fleet_proxy.caddy_config(
        host="127.0.0.1", port=port, upstream_port=upstream.server_address[1], storage=root / "proxy" / "data",
        cert=paths.server_cert, key=paths.server_key, ca_cert=paths.ca_cert,
    )  # fmt: skip
    proxy = _started(fleet_proxy.start_proxy(config, root / "proxy", root / "proxy.log", flower_env()))
    yield {"port": port, "paths": paths}
    proxy.stop()
    upstream.shutdown()


def _started(proxy: Child) -> Child:
    deadline = time.monotonic() + 30
    while not proxy.saw(fleet_proxy.STARTED) and proxy.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not proxy.saw(fleet_proxy.STARTED):
        proxy.stop()
        pytest.fail(f"the proxy did not start: {fleet_proxy.failure(proxy)}")
    return proxy


def test_the_proxy_forwards_exactly_the_routes_flowers_supernode_calls():
    from flwr.superlink.routers.fleet.router import router

    assert set(fleet_proxy.FLEET_ROUTES) == {route.path for route in router.routes}


@pytest.mark.parametrize("route", fleet_proxy.FLEET_ROUTES)
def test_each_fleet_route_is_forwarded_unchanged(proxy_alone, route):
    status, body = raw_post(proxy_alone["port"], route, ca=proxy_alone["paths"].ca_cert)
    assert (status, body) == (200, f"UPSTREAM POST {route}".encode())


@pytest.mark.parametrize("path", ODD_PATHS)
def test_paths_that_only_resemble_a_fleet_route_are_not_forwarded(proxy_alone, path):
    status, body = raw_post(proxy_alone["port"], path)
    assert status == 404 and not body.startswith(b"UPSTREAM"), (path, status, body)


def test_only_post_reaches_a_fleet_route(proxy_alone):
    for method in ("GET", "PUT", "DELETE", "OPTIONS"):
        response = httpx.request(method, f"https://127.0.0.1:{proxy_alone['port']}/v1/fleet/get-run", verify=False)
        assert response.status_code == 404, method


def test_the_proxy_keeps_node_signatures_out_of_its_log(tmp_path):
    paths = init_ca(tmp_path / "certs")
    port, log = free_port(), tmp_path / "proxy.log"
    config = fleet_proxy.caddy_config(
        host="127.0.0.1", port=port, upstream_port=free_port(), storage=tmp_path / "data", cert=paths.server_cert,
        key=paths.server_key, ca_cert=paths.ca_cert,
    )  # fmt: skip
    proxy = _started(fleet_proxy.start_proxy(config, tmp_path / "proxy", log, flower_env()))
    try:
        headers, _ = signed_headers(site_key_pair(tmp_path, "site-x").private_key)
        # nothing listens upstream: Caddy logs the failed request with its headers
        status, _ = raw_post(port, "/v1/fleet/pull-messages", headers, ca=paths.ca_cert)
        assert status == 502
        deadline = time.monotonic() + 5
        while "/v1/fleet/pull-messages" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proxy.stop()
    text = log.read_text()
    assert "/v1/fleet/pull-messages" in text and "Flwr-Public-Key" in text  # the entry is there, with its headers
    assert headers["flwr-signature"] not in text and headers["flwr-timestamp"] not in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_coordinator_refuses_a_public_port_that_is_taken(tmp_path):
    from typer.testing import CliRunner

    from fedmusk.cli import app

    certs = tmp_path / "certs"
    init_ca(certs)
    add_site(certs, "site-1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["server", "configs/demo.yaml", "--certs", str(certs), "--state",
                                          str(tmp_path / "state"), "--port", str(port)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--port {port} on 127.0.0.1 is not free" in " ".join(result.output.split())
    assert not list((tmp_path / "state").glob("*.pid")), "nothing was started"


# --- a real `fedmusk server` ---------------------------------------------------------------------------------------


class Server:
    """`fedmusk server` in its own process group, output to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedmusk.cli", "server", *args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"fedmusk server exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            time.sleep(0.3)
        self.stop(signal.SIGKILL)
        pytest.fail(f"fedmusk server never printed {pattern!r}:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            _kill_group(self.proc.pid, sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_processes(superlink_port: int) -> list[int]:
    """The SuperExec and ServerApp processes serving the SuperLink on that port."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = entry.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(Path(w).name in ("flwr-serverapp", "flower-superexec") for w in argv[:2]) and \
                f"127.0.0.1:{superlink_port}" in argv and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _serverapp(superlink_port: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (found := _run_processes(superlink_port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """`fedmusk server` with real certificates and one registered site, its run waiting for three sites."""
    root = tmp_path_factory.mktemp("exposure")
    certs = root / "certs"
    init_ca(certs)
    hospital = site_key_pair(root / "hospital", "site-1")  # the hospital's own key; only site.pub was sent
    add_site(certs, "site-1", public_key=hospital.public_key)
    second = site_key_pair(root / "hospital-2", "site-2")
    add_site(certs, "site-2", public_key=second.public_key)
    stranger = site_key_pair(root / "stranger", "stranger")
    (root / "federation.yaml").write_text(FEDERATION)
    (root / "tmp").mkdir()
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "TMPDIR": str(root / "tmp")}  # fmt: skip
    port, state = free_port(), root / "state"
    args = [str(root / "federation.yaml"), "--certs", str(certs), "--state", str(state), "--port", str(port)]
    server = Server(args, root / "server.log", env)
    started = time.monotonic()
    try:
        server.wait_for(r"federation started", 150)
        superlink = int((state / "superlink.pid").read_text())
        proxy = int((state / "proxy.pid").read_text())
        address = tomllib.loads((state / "flower" / "config.toml").read_text())["superlink"]["fedmusk"]["address"]
        yield {
            "root": root, "certs": CertPaths(certs), "state": state, "port": port, "server": server, "env": env,
            "args": args, "internal_port": int(address.rsplit(":", 1)[1]), "superlink": superlink, "proxy": proxy,
            "site_key": hospital.private_key, "second_key": second.private_key, "stranger_key": stranger.private_key,
            "startup_s": time.monotonic() - started,
        }  # fmt: skip
    finally:
        server.stop()
        for name in ("superlink.pid", "proxy.pid"):
            if (state / name).exists():
                _kill_group(int((state / name).read_text()), signal.SIGKILL)


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _clients(coordinator):
    """(name, headers, ca) for each kind of attacker."""
    site_headers, _ = signed_headers(coordinator["site_key"])
    return [("no certificate check", {}, None), ("trusting ca.crt", {}, coordinator["certs"].ca_cert),
            ("signed by a registered site", site_headers, coordinator["certs"].ca_cert)]  # fmt: skip


@pytest.mark.slow
def test_nobody_reaches_the_control_api_on_the_public_port(coordinator):
    # The same request on the SuperLink's own port works: this is what the proxy keeps from the network.
    assert raw_post(coordinator["internal_port"], "/v1/control/list-nodes", ca=coordinator["certs"].ca_cert)[0] == 200
    for name, headers, ca in _clients(coordinator):
        for route in CONTROL_ATTACKS:
            status, body = raw_post(coordinator["port"], f"/v1/control/{route}", headers, ca)
            assert (status, body) == (404, b""), (name, route, status, body[:200])


@pytest.mark.slow
def test_the_public_port_answers_404_to_every_superlink_route_but_the_fleet_api(coordinator):
    schema = httpx.get(f"https://127.0.0.1:{coordinator['internal_port']}/openapi.json",
                       verify=_trusting(coordinator["certs"].ca_cert)).json()  # fmt: skip
    assert "/v1/control/register-node" in schema["paths"] and "/v1/fleet/pull-messages" in schema["paths"]
    hidden = [path for path in schema["paths"] if path not in fleet_proxy.FLEET_ROUTES]
    assert any(p.startswith("/v1/runtime/") for p in hidden) and len(hidden) > 40
    for name, headers, ca in _clients(coordinator):
        with httpx.Client(verify=_trusting(ca) if ca else False, headers=headers, timeout=15) as client:
            for path in [*hidden, "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/"]:
                for method in ("GET", "POST"):
                    response = client.request(method, f"https://127.0.0.1:{coordinator['port']}{path}")
                    assert response.status_code == 404 and not response.content, (name, method, path)


@pytest.mark.slow
def test_a_registered_site_reaches_the_fleet_api_through_the_proxy_and_a_stranger_is_refused(coordinator):
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, ActivateNodeResponse

    url = f"https://127.0.0.1:{coordinator['port']}/v1/fleet/activate-node"
    ca = _trusting(coordinator["certs"].ca_cert)
    for key, expect_ok in ((coordinator["site_key"], True), (coordinator["stranger_key"], False)):
        headers, public = signed_headers(key)
        body = ActivateNodeRequest(public_key=public, heartbeat_interval=30).SerializeToString()
        response = httpx.post(url, content=body, verify=ca, timeout=15,
                              headers={**headers, "content-type": "application/protobuf"})  # fmt: skip
        if expect_ok:
            assert response.status_code == 200, response.text
            assert ActivateNodeResponse.FromString(response.content).node_id != 0
        else:  # the SuperLink's own refusal (a JSON error), not the proxy's empty 404
            assert response.status_code != 200 and response.json().get("detail"), response.text


@pytest.mark.slow
def test_a_real_supernode_connects_through_the_proxy_and_comes_online(coordinator, tmp_path):
    env = {**flower_env(), "FLWR_HOME": str(tmp_path / "flwr")}
    supernode = Child(
        "supernode",
        ["flower-supernode", "--superlink", f"127.0.0.1:{coordinator['port']}", "--root-certificates",
         str(coordinator["certs"].ca_cert), "--auth-supernode-private-key", str(coordinator["second_key"]),
         "--port", str(free_port())],
        tmp_path / "supernode.log", env=env, cwd=tmp_path,
    )  # fmt: skip
    cli_env = {**env, "FLWR_HOME": str(coordinator["state"] / "flower")}  # the coordinator's loopback connection
    try:
        deadline, node, status = time.monotonic() + 60, None, {}
        while time.monotonic() < deadline and supernode.alive():
            if node is None and (m := re.search(r"SuperNode ID: (\d+)", "\n".join(supernode.tail(50)))):
                node = m.group(1)
            if node is not None:
                listed = subprocess.run(["flwr", "supernode", "list", "fedmusk", "--format", "json"], env=cli_env,
                                        capture_output=True, text=True, timeout=60).stdout  # fmt: skip
                status = {n["node-id"]: n["status"] for n in json.loads(listed[listed.find("{"):])["nodes"]}
                if status.get(node) == "online":
                    break
            time.sleep(1)
        assert node is not None and status.get(node) == "online", (status, supernode.tail(20))
    finally:
        supernode.stop()


@pytest.mark.slow
def test_the_superlink_listens_on_loopback_only_and_the_proxy_serves_the_public_port(coordinator):
    cmdline = Path(f"/proc/{coordinator['superlink']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--host") + 1] == b"127.0.0.1"
    assert cmdline[cmdline.index(b"--port") + 1] == str(coordinator["internal_port"]).encode()
    assert b"caddy" in Path(f"/proc/{coordinator['proxy']}/cmdline").read_bytes()
    assert coordinator["internal_port"] != coordinator["port"]


@pytest.mark.slow
def test_the_coordinators_folders_and_files_are_private(coordinator):
    state = coordinator["state"]
    for name in ("superlink.db", "run-config.toml", "logs/superlink.log", "logs/proxy.log", "proxy/caddy.json",
                 "flower/config.toml", "superlink.pid", "proxy.pid"):  # fmt: skip
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    for folder in (state, state / "federation"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in state.rglob("*"):  # the database's -wal/-shm, anything the ServerApp wrote by now
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path
    # What the ServerApp writes later (checkpoints, rounds.json, the MLflow store) is private too: every process of
    # the coordinator runs with umask 077.
    run = _serverapp(coordinator["internal_port"])
    assert run, "no ServerApp runs for the federation"
    for pid in [coordinator["superlink"], coordinator["proxy"], *run]:
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Umask:\s+0077$", status, re.M), (pid, status[:300])
    # The run was submitted from a temporary folder holding only the app description, removed since.
    assert not (state / "app").exists()
    assert not list((coordinator["root"] / "tmp").glob("fedmusk-app-*"))


@pytest.mark.slow
def test_a_crashed_coordinators_proxy_and_superlink_are_stopped_at_the_next_start(coordinator):
    """Runs last: it replaces the module's coordinator."""
    server, state = coordinator["server"], coordinator["state"]
    left = [coordinator["superlink"], coordinator["proxy"], *_serverapp(coordinator["internal_port"])]
    assert len(left) > 2, "no ServerApp runs for the federation"
    server.stop(signal.SIGKILL)  # the command dies; its proxy, SuperLink and ServerApp keep running
    assert all(_alive(p) for p in left)
    again = Server(coordinator["args"], coordinator["root"] / "again.log", coordinator["env"])
    coordinator["server"] = again
    again.wait_for(r"federation started", 150)
    assert not _wait_gone(left, 5), "the earlier proxy, SuperLink or ServerApp still run"
    output = again.output()
    assert "stopped the proxy" in output and "stopped the SuperLink" in output
    port = int(tomllib.loads((state / "flower" / "config.toml").read_text())["superlink"]["fedmusk"]["address"]
               .rsplit(":", 1)[1])  # fmt: skip
    now = [int((state / "superlink.pid").read_text()), int((state / "proxy.pid").read_text()), *_serverapp(port)]
    assert len(now) > 2, "no ServerApp runs for the resumed federation"
    assert again.stop() == 130
    assert not _wait_gone(now), "fedmusk server left its proxy, SuperLink or ServerApp running"
    assert not (state / "superlink.pid").exists() and not (state / "proxy.pid").exists()
