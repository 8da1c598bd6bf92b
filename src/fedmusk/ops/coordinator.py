"""``fedmusk server``: the coordinator's one command for a real federation.

It checks the configuration and the certificate folder, starts Flower's SuperLink with TLS, SuperNode
authentication and a persistent state database on 127.0.0.1 only, publishes its Fleet API (and nothing else) on
``--host``/``--port`` through a reverse proxy (``superlink`` runs both, ``fleet_proxy`` configures the proxy),
registers every site key of the certificate folder, launches the federation (fedmusk's ServerApp, configured by the
YAML) as a Flower run, shows round progress from the run's own ``rounds.json`` and stops the proxy and the SuperLink
when the run ends. ``--resume`` starts the same federation again from its last checkpoint in the output folder
(after a crash or a stop); the SuperLink database keeps the registered sites.

The state folder (``--state``, 0700) holds ``superlink.db``, ``logs/superlink.log`` and ``logs/proxy.log``, the
proxy's configuration (``proxy/caddy.json``), Flower's CLI home (``flower/``) and ``run-config.toml``. The run is
submitted from a fresh temporary folder holding only a ``pyproject.toml`` (no code: the components are the installed
fedmusk's, so a coordinator and a hospital run exactly the fedmusk they installed). Everything the coordinator and
its children write is private to its user (umask 077). Nothing in it is patient data: sites send only scrubbed
metrics and masked adapter updates, and the coordinator never learns the sites' paths.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmusk.config import ConfigError, FedMuskConfig, load_config
from fedmusk.ops.superlink import (
    CONNECTION,
    INTERNAL_HOST,
    PID_FILE,
    PROXY_PID_FILE,
    CoordinatorError,
    check_port_free,
    start_proxy,
    start_superlink,
    stop_run_processes,
    stop_stale,
    wait_until_serving,
)
from fedmusk.ops.supervise import (
    LOOPBACK,
    PRIVATE_UMASK,
    Child,
    flower_env,
    free_port,
    run_flower_cli,
    write_pid_file,
    write_private,
)
from fedmusk.server.checkpoint import CHECKPOINT_DIR, load_latest, resume_point
from fedmusk.server.rounds import ROUNDS_FILE, RoundFailed
from fedmusk.wire import wire_run_config

STATUS_POLL_S = 10.0  # seconds between `flwr list` checks of the run's status while rounds remain


@dataclass
class CoordinatorSettings:
    config_files: list[Path]
    overrides: list[str] = field(default_factory=list)
    certs: Path | None = None
    state: Path = Path("fedmusk-coordinator")
    out: Path | None = None  # default: <state>/federation
    host: str = "127.0.0.1"  # the public proxy's address
    port: int = 9092  # the public proxy's port: the only one hospitals reach
    superlink_port: int | None = None  # the SuperLink's own port on 127.0.0.1; None: a free one
    resume: bool = False
    insecure: bool = False  # development only: no TLS, no node authentication, loopback only
    poll_s: float = 2.0

    @property
    def out_dir(self) -> Path:
        return (self.out if self.out is not None else self.state / "federation").resolve()


def run_coordinator(settings: CoordinatorSettings, console: Console) -> dict[str, Any]:
    """Run one federation (or resume it) on a SuperLink started here; returns the run's summary.

    Raises CoordinatorError / ConfigError / CertError for what the operator must fix, RoundFailed when the
    federation itself failed (too few sites, a halted round), KeyboardInterrupt when stopped (SIGINT or SIGTERM)."""
    cfg = load_config(settings.config_files, settings.overrides)  # check_config refuses what cannot work together
    if settings.superlink_port is not None and settings.superlink_port == settings.port:
        raise CoordinatorError(f"--superlink-port and --port are both {settings.port}: give the SuperLink another port")
    tls = _check_security(settings, console)
    out_dir = settings.out_dir
    resume_point(out_dir, settings.resume, cfg.federation.pretrain_rounds + cfg.federation.rounds)

    # Files the coordinator, the SuperLink, the ServerApp and the proxy create are its user's alone: the database
    # (site keys, run records), checkpoints, rounds.json, the MLflow store, logs.
    previous_umask = os.umask(PRIVATE_UMASK)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    children: list[Child] = []
    superlink_port = None
    state = settings.state.resolve()
    try:
        for folder in (state, out_dir):
            _private_folder(folder, console)
        _tighten_existing(state)
        stop_stale(state, console)
        check_port_free(settings.host, settings.port)
        superlink_port = settings.superlink_port or free_port(INTERNAL_HOST)
        env = flower_env({"FLWR_HOME": str(state / "flower")})
        _write_flower_home(state / "flower", superlink_port, tls)
        run_config = _write_run_config(state / "run-config.toml", cfg, out_dir, settings.resume)

        superlink = start_superlink(superlink_port, state, tls, env)
        children.append(superlink)
        write_pid_file(state / PID_FILE, superlink.pid)
        wait_until_serving(superlink, INTERNAL_HOST, superlink_port, "the SuperLink", "--superlink-port")
        proxy = start_proxy(settings.host, settings.port, superlink_port, state, tls, env)
        children.append(proxy)
        write_pid_file(state / PROXY_PID_FILE, proxy.pid)
        wait_until_serving(proxy, settings.host, settings.port, "the public proxy", "--port")
        if tls is not None:
            _register_sites(tls["sites"], env, console)
        run_id = _launch(run_config, env)
        write_private(
            out_dir / "deployment.json",
            json.dumps({"flower_run_id": run_id, "resumed": settings.resume, "started": time.time()}, indent=1)
        )
        console.print(
            f"federation {'resumed' if settings.resume else 'started'}: Flower run {run_id}, "
            f"{cfg.federation.pretrain_rounds + cfg.federation.rounds} rounds, strategy {cfg.federation.strategy}, "
            f"secure aggregation {'on' if cfg.federation.secure_aggregation else 'off'}; results in {out_dir}"
        )
        status = _follow(run_id, children, cfg, out_dir, env, settings.poll_s, console)
        if status != "finished:completed":
            hint = (
                "after fixing the cause, continue with --resume"
                if load_latest(out_dir / CHECKPOINT_DIR) is not None
                else "no round completed: after fixing the cause, start again without --resume"
            )
            raise RoundFailed(f"{_failure_reason(run_id, status, env)}; {hint}")
        return _summary(out_dir, run_id)
    finally:
        for child in reversed(children):  # the proxy first: no new Fleet calls reach a SuperLink that is stopping
            child.stop()
        if children:
            stop_run_processes(superlink_port)  # the ServerApp runs in a session of its own
        for name in (PROXY_PID_FILE, PID_FILE):
            (state / name).unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
        os.umask(previous_umask)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


# -- before starting ---------------------------------------------------------------------------------------------


def _check_security(settings: CoordinatorSettings, console: Console) -> dict[str, Any] | None:
    """The TLS files and registered site keys, checked; None in development mode (which only loopback allows)."""
    if settings.insecure:
        if settings.host not in LOOPBACK:
            raise CoordinatorError(
                f"--dev-insecure serves without TLS or node authentication and is refused on --host {settings.host}: "
                "use it on 127.0.0.1 only"
            )
        console.print("[bold yellow]warning:[/] development mode: no TLS, no node authentication (loopback only)")
        return None
    from fedmusk.ops.certs import check_server_files, site_public_keys

    if settings.certs is None:
        raise CoordinatorError("--certs is required: the folder made by `fedmusk certs init` (or use --dev-insecure)")
    certs = settings.certs.resolve()  # the SuperLink runs in the state folder
    paths = check_server_files(certs, host=settings.host)
    check_server_files(certs, host=INTERNAL_HOST)  # the proxy and `flwr` dial the SuperLink there
    if paths.ca_key.exists():
        console.print(
            f"[bold yellow]warning:[/] {paths.ca_key} is on this server: the coordinator does not need the CA key; "
            "keep it offline", highlight=False,
        )  # fmt: skip
    sites = site_public_keys(certs)
    if not sites:
        raise CoordinatorError(
            f"no site is registered in {settings.certs / 'sites'}: run `fedmusk certs add-site` for each hospital"
        )
    return {"paths": paths, "sites": sites}


def _private_folder(folder: Path, console: Console) -> None:
    """Create ``folder`` readable by this user only; an existing one is tightened to 0700 where this user may."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(folder.stat().st_mode) & 0o077:
        try:
            folder.chmod(0o700)
        except OSError:  # a mount point owned by someone else: say so, the files in it are still 0600
            console.print(f"[yellow]warning:[/] {folder} is readable by other users and could not be made private")


def _tighten_existing(state: Path) -> None:
    """Files an earlier version of the coordinator left readable by others become private now (new files are private
    from creation: umask 077)."""
    for name in ("superlink.db", "superlink.db-wal", "superlink.db-shm", "run-config.toml", "flower/config.toml"):
        if (state / name).is_file():
            (state / name).chmod(0o600)


def _write_flower_home(home: Path, superlink_port: int, tls: dict[str, Any] | None) -> None:
    """The Flower CLI's configuration: one connection, to the SuperLink on loopback (never through the proxy)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "{INTERNAL_HOST}:{superlink_port}"')
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(tls["paths"].ca_cert).resolve()}"')
    write_private(home / "config.toml", "\n".join(lines) + "\n")


def _write_app(app_dir: Path) -> Path:
    """The Flower app description for ``flwr run``: fedmusk's installed ServerApp and ClientApp, no code."""
    from fedmusk import __version__

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        f"""# Written by `fedmusk server`: Flower packages this folder for each run. It holds no code: the components
# below resolve to the fedmusk installed on the coordinator and on each hospital's machine.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmusk-federation"
version = "{__version__}"
description = "fedmusk federation"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmusk"

[tool.flwr.app.components]
serverapp = "fedmusk.server.server_app:app"
clientapp = "fedmusk.client.client_app:app"

[tool.flwr.app.config]
fedmusk-config = ""
base-model = ""
out-dir = "fedmusk-out"
resume = false
"""
    )
    return app_dir


def _write_run_config(path: Path, cfg: FedMuskConfig, out_dir: Path, resume: bool) -> Path:
    """The run's configuration as a TOML file for ``flwr run --run-config`` (JSON strings are valid TOML)."""
    text = "\n".join([
        *(f"{key} = {json.dumps(value)}" for key, value in wire_run_config(cfg).items()),
        f"out-dir = {json.dumps(str(out_dir))}",
        f"resume = {'true' if resume else 'false'}",
    ])  # fmt: skip
    path.write_text(text + "\n")
    return path


# -- sites and the run --------------------------------------------------------------------------------------------


def _register_sites(sites: dict[str, Path], env: dict[str, str], console: Console) -> None:
    """Register every site key with the SuperLink's node authentication; keys already known are fine."""
    for name, public_key in sites.items():
        done = run_flower_cli(
            ["supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json"], env
        )
        answer = _json_answer(done.stdout)
        if answer.get("success"):
            console.print(f"site {name}: key registered")
        elif "already" in str(answer.get("error-message", "")).lower():
            console.print(f"site {name}: key already registered")
        else:
            reason = answer.get("error-message") or (done.stderr or done.stdout).strip()[-300:]
            raise CoordinatorError(f"could not register site {name}'s key with the SuperLink: {reason}")


def _launch(run_config: Path, env: dict[str, str]) -> str:
    """Submit the federation as a Flower run. The bundle is packed from a fresh private folder holding only the app
    description, so nothing else (stray files, code) can travel in it; the folder is removed afterwards."""
    app_dir = Path(tempfile.mkdtemp(prefix="fedmusk-app-"))  # 0700
    try:
        _write_app(app_dir)
        done = run_flower_cli(
            ["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"], env
        )
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
    answer = _json_answer(done.stdout)
    if not answer.get("success") or "run-id" not in answer:
        reason = answer.get("error-message") or (done.stderr or done.stdout).strip()[-300:]
        raise CoordinatorError(f"the SuperLink did not accept the federation run: {reason}")
    return str(answer["run-id"])


def _json_answer(stdout: str) -> dict[str, Any]:
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


# -- while it runs -----------------------------------------------------------------------------------------------


def _follow(
    run_id: str, children: list[Child], cfg: FedMuskConfig, out_dir: Path, env: dict[str, str], poll_s: float,
    console: Console,
) -> str:
    """Show the rounds as ``rounds.json`` records them until the run finishes; returns Flower's final status."""
    total = cfg.federation.pretrain_rounds + cfg.federation.rounds
    columns = [TextColumn("[bold]federation"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn()]  # fmt: skip
    shown = 0
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("rounds", total=total, last="")
        last_status_check = 0.0
        while True:
            for child in children:
                if not child.alive():
                    raise CoordinatorError(
                        f"the {'SuperLink' if child.name == 'superlink' else 'public proxy'} stopped during the run "
                        f"(exit {child.returncode}); see logs/{child.name}.log in the state folder, then --resume"
                    )
            records = _read_rounds(out_dir)
            for record in records[shown:]:
                line = _round_line(record)
                progress.update(task, completed=record.get("round", shown + 1), last=line)
                if not console.is_terminal:
                    console.print(f"round {record.get('round')}/{total}: {line}")
            shown = max(shown, len(records))
            # Each status check is a `flwr` process; while rounds remain, rounds.json shows progress and failures
            # surface within STATUS_POLL_S. After the last round only publishing is left: look more often.
            every = poll_s if shown >= total else STATUS_POLL_S
            if time.monotonic() - last_status_check >= every:
                last_status_check = time.monotonic()
                status = _run_status(run_id, env)
                if status.startswith("finished"):
                    return status
            time.sleep(poll_s)


def _read_rounds(out_dir: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads((out_dir / ROUNDS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being replaced
        return []
    return records if isinstance(records, list) else []


def _round_line(record: dict[str, Any]) -> str:
    parts = [f"{record.get('replies', '?')}/{record.get('sampled', '?')} sites replied"]
    agg = record.get("aggregated") or {}
    for key in ("val_c_index", "val_auc"):
        if isinstance(agg.get(key), (int, float)):
            parts.append(f"{key} {agg[key]:.3f}")
    if isinstance(record.get("seconds"), (int, float)):
        parts.append(f"{record['seconds']:.0f} s")
    return ", ".join(parts)


def _run_status(run_id: str, env: dict[str, str]) -> str:
    done = run_flower_cli(["list", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    for run in _json_answer(done.stdout).get("runs", []):
        if str(run.get("run-id")) == run_id:
            return str(run.get("status", ""))
    return ""


def _failure_reason(run_id: str, status: str, env: dict[str, str]) -> str:
    """Why the ServerApp stopped, from the end of its log on the SuperLink (errors the sites sent are scrubbed)."""
    done = run_flower_cli(["log", run_id, CONNECTION, "--show"], env, timeout_s=30)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    for marker in ("RoundFailed:", "ConfigError:", "Error:"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[-1].split(marker, 1)[1].strip() or hits[-1]
    return f"the federation run ended as {status or 'unknown'}; `flwr log` shows no reason"


def _summary(out_dir: Path, run_id: str) -> dict[str, Any]:
    records = _read_rounds(out_dir)
    summary = {
        "flower_run_id": run_id,
        "rounds_completed": len(records),
        "last_round": records[-1] if records else None,
        "adapter": str(out_dir / "adapter"),
        "out_dir": str(out_dir),
    }
    write_private(out_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


__all__ = ["ConfigError", "CoordinatorError", "CoordinatorSettings", "RoundFailed", "run_coordinator"]
