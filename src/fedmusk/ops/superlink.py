"""The coordinator's two long-lived processes: Flower's SuperLink on 127.0.0.1 and the public proxy in front of it.

``fedmusk server`` starts both, each in its own process group with a private log, records their pids in the state
folder (so that the next start stops what a crashed coordinator left running), and waits until each serves before
it registers sites or submits the run. The proxy's configuration is ``fleet_proxy``'s.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmusk.ops import fleet_proxy
from fedmusk.ops.supervise import Child, flower_executable, group_running, port_open, stop_stale_process

CONNECTION = "fedmusk"  # the name of the SuperLink connection in the state folder's Flower home
STARTUP_TIMEOUT_S = 90.0
PID_FILE = "superlink.pid"
PROXY_PID_FILE = "proxy.pid"
INTERNAL_HOST = "127.0.0.1"  # where the SuperLink listens: only the proxy, the ServerApp and `flwr` reach it


class CoordinatorError(Exception):
    """Something the coordinator's operator must fix (settings, certificates, a SuperLink that does not start)."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a public port something already listens on. Caddy binds with SO_REUSEPORT, so a second proxy of the
    same user (another coordinator) would share the port silently rather than fail; a plain bind does fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closing in TIME_WAIT are no obstacle
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as err:
            raise CoordinatorError(
                f"--port {port} on {host} is not free ({err.strerror}): is another coordinator running? "
                "Stop it or choose another --port"
            ) from None


def start_superlink(port: int, state: Path, tls: dict[str, Any] | None, env: dict[str, str]) -> Child:
    """``flower-superlink`` on 127.0.0.1:``port`` (TLS and node authentication unless ``tls`` is None), with its
    database in ``state`` and its log in ``state``/logs/superlink.log."""
    argv = [flower_executable("flower-superlink")]
    if tls is None:
        argv.append("--insecure")
    else:
        p = tls["paths"]
        argv += [
            "--ssl-ca-certfile", str(p.ca_cert), "--ssl-certfile", str(p.server_cert),
            "--ssl-keyfile", str(p.server_key), "--enable-supernode-auth",
        ]  # fmt: skip
    argv += [
        "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation",
        "--host", INTERNAL_HOST, "--port", str(port),
    ]  # fmt: skip
    return Child("superlink", argv, state / "logs" / "superlink.log", env=env, cwd=state)


def start_proxy(
    host: str, port: int, superlink_port: int, state: Path, tls: dict[str, Any] | None, env: dict[str, str]
) -> Child:
    """The public proxy on ``host``:``port`` in front of the SuperLink on 127.0.0.1:``superlink_port``; its
    configuration goes to ``state``/proxy/caddy.json, its log to ``state``/logs/proxy.log."""
    files = {}
    if tls is not None:
        p = tls["paths"]
        files = {"cert": p.server_cert, "key": p.server_key, "ca_cert": p.ca_cert}
    config = fleet_proxy.caddy_config(
        host=host, port=port, upstream_port=superlink_port, storage=state / "proxy" / "data",
        **files,
    )  # fmt: skip
    return fleet_proxy.start_proxy(config, state / "proxy", state / "logs" / "proxy.log", env)


def stop_run_processes(superlink_port: int, grace_s: float = 10.0) -> list[int]:
    """Stop the SuperExec and ServerApp processes serving the SuperLink on 127.0.0.1:``superlink_port``.

    The SuperLink starts its SuperExec in a session of its own (which then starts the ServerApp), so stopping the
    SuperLink's process group leaves them behind: they are found by the runtime address on their command line. Only
    this user's processes are touched. Returns the process groups signalled."""
    address = f"{INTERNAL_HOST}:{superlink_port}"
    groups = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = entry.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
            pid = int(entry.name)
        except (OSError, ValueError):
            continue
        programs = {Path(word).name for word in argv[:2]}
        if programs & {"flower-superexec", "flwr-serverapp"} and _after(argv, "--runtime-api-address") == address:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
    groups.discard(os.getpgid(0))  # never this process's own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            if sig == signal.SIGKILL and not group_running(group):
                continue  # gone after SIGTERM: its number may belong to someone else by now
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(group_running(g) for g in groups):
            time.sleep(0.2)
    return sorted(groups)


def _after(argv: list[str], option: str) -> str | None:
    return argv[argv.index(option) + 1] if option in argv[:-1] else None


def stop_stale(state: Path, console: Console) -> None:
    """Stop the proxy, the SuperLink and the SuperExec and ServerApp it started, which a crashed earlier coordinator
    left running on this state folder, so the ports and the database are free; a process that is not theirs is left
    alone."""
    proxy = stop_stale_process(state / PROXY_PID_FILE, "caddy", str(state / "proxy" / fleet_proxy.CONFIG_FILE))
    if proxy is not None:
        console.print(f"[yellow]stopped the proxy (pid {proxy}) left running by an earlier coordinator[/]")
    superlink = stop_stale_process(state / PID_FILE, "flower-superlink", str(state / "superlink.db"))
    if superlink is not None:
        console.print(f"[yellow]stopped the SuperLink (pid {superlink}) left running by an earlier coordinator[/]")
    try:  # the earlier SuperLink's port, from the Flower home the earlier coordinator wrote
        home = tomllib.loads((state / "flower" / "config.toml").read_text())
        port = int(home["superlink"][CONNECTION]["address"].rsplit(":", 1)[1])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return
    if stop_run_processes(port):
        console.print("[yellow]stopped the ServerApp left running by an earlier coordinator[/]")


def wait_until_serving(child: Child, host: str, port: int, what: str, option: str) -> None:
    """Until ``child`` listens on ``port`` and has said it is ready; CoordinatorError (naming ``option``, the setting
    that chose the port) when it stops or does not open the port in time."""
    ready = "Application startup complete" if child.name == "superlink" else fleet_proxy.STARTED
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            reason = fleet_proxy.failure(child) if child.name == "proxy" else _last_lines(child)
            hint = f"; choose another {option}" if "address already in use" in reason else ""
            raise CoordinatorError(f"{what} stopped at start (exit {child.returncode}): {reason}{hint}")
        if child.saw(ready) and port_open(host, port):
            return
        time.sleep(0.3)
    raise CoordinatorError(f"{what} did not open port {port} ({option}) within {STARTUP_TIMEOUT_S:g} s")


def _last_lines(child: Child) -> str:
    return " | ".join(line for line in child.tail(5) if line.strip())
