"""``fedmusk client``: the hospital daemon.

At start it checks everything the site controls and refuses to run, with one line saying what to fix, when
something is wrong: the site data (as ``fedmusk validate`` does), the site's egress policy, the federation's CA
certificate and the site's private key, the site's own settings (``site-settings.yaml``: model files, device, batch
sizes) and (when the coordinator is up) the SuperLink's TLS certificate. Then it runs two programs and watches them:

- Flower's SuperNode, with TLS and the site key, ``--isolation process``: it exchanges messages with the coordinator
  and runs no app itself. Its runtime port listens on 127.0.0.1 only, and claiming a task there needs a secret
  that the daemon writes afresh at each start (0600, in ``<site>/.fedmusk/runtime``).
- fedmusk's site worker (``fedmusk.ops.worker``): it claims the SuperNode's tasks with that secret and answers
  them with the installed fedmusk, never with code from the network, keeping the site's model between messages.

Either program that stops for a transient reason is started again with back-off (the SuperNode itself retries lost
connections); a SuperNode that the coordinator refuses (key not registered) or cannot trust (wrong CA), or a worker
that cannot run at all, stops the daemon with exit code 2, which the systemd unit does not restart.

Everything the SuperNode and the worker print goes through the site's scrubber (case ids, report
text, the site folder's path) into ``<site>/.fedmusk/logs/client.log`` (0600) and the console; key material is
never printed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedmusk.client.policy import SitePolicy
from fedmusk.client.site_client import SITE_POLICY_FILE
from fedmusk.ops.supervise import (
    LOOPBACK,
    PRIVATE_UMASK,
    Child,
    TLSVerificationError,
    flower_env,
    flower_executable,
    probe_tls,
    split_address,
    write_private,
)
from fedmusk.site_settings import SITE_SETTINGS_FILE, load_site_settings
from fedmusk.wire import NODE_COORDINATOR, NODE_POLICY, NODE_SETTINGS, NODE_SITE_NAME, NODE_SITE_ROOT

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOG_FILE = Path(".fedmusk") / "logs" / "client.log"
RUNTIME_DIR = Path(".fedmusk") / "runtime"  # per daemon (runtime_folder): its SuperNode's secret and node config
BACKOFF_S = (2.0, 5.0, 15.0, 30.0, 60.0)
WORKER_FATAL = 2  # the site worker's exit code for "cannot run at all" (fedmusk.ops.worker.EXIT_FATAL)
STABLE_S = 300.0  # a SuperNode that ran this long before stopping starts again without waiting long

# What Flower's SuperNode prints when the coordinator refuses the site's key (Flower 1.42: exit code 305 with
# "[code: 2004] Failed to activate SuperNode") and when the SuperLink's certificate does not check out.
KEY_REFUSED = ("Failed to activate SuperNode", "code: 2004", "PERMISSION_DENIED", "Unauthenticated")
TLS_REFUSED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


class DaemonError(Exception):
    """A reason the daemon refuses to start or stops for good: the operator must fix something."""


@dataclass
class DaemonSettings:
    site_root: Path
    name: str
    superlink: str
    ca: Path | None = None
    key: Path | None = None
    policy: Path | None = None
    runtime_port: int = 9094
    log_file: Path | None = None
    quick: bool = False
    settings: Path | None = None  # site-settings.yaml (default: the one in the site folder, if any)
    registration_wait_s: float = 180.0  # keep trying this long while the coordinator does not accept the key
    insecure: bool = False  # development only: no TLS, no node authentication, loopback SuperLink only


def run_daemon(settings: DaemonSettings, console: Console) -> int:
    """Check the site, then run its SuperNode and site worker until stopped (SIGTERM/SIGINT: exit code 0).

    Raises DaemonError (and ConfigError/CertError/SiteDataError) for what the operator must fix."""
    # Everything the daemon, the SuperNode and the worker create (logs, runtime files, tile caches, FedSA's local
    # state) is readable by this account only.
    previous = os.umask(PRIVATE_UMASK)
    try:
        return _run_daemon(settings, console)
    finally:
        os.umask(previous)


def _run_daemon(settings: DaemonSettings, console: Console) -> int:
    site_root = settings.site_root.resolve()
    host, port = _check_arguments(settings, site_root)

    policy_path, settings_path = _check_site(settings, site_root, console)
    fingerprint = _check_credentials(settings, host, port, console)

    _check_runtime_port(settings.runtime_port)
    log_file = settings.log_file or site_root / LOG_FILE
    scrub = _line_scrubber(site_root, console)
    node_config = {
        NODE_SITE_ROOT: str(site_root), NODE_SITE_NAME: settings.name, NODE_COORDINATOR: settings.superlink,
        **({NODE_POLICY: str(policy_path)} if policy_path is not None else {}),
        **({NODE_SETTINGS: str(settings_path)} if settings_path is not None else {}),
    }  # fmt: skip
    runtime_dir = runtime_folder(site_root, settings.runtime_port)
    secret, node_config_file = write_runtime_files(runtime_dir, node_config)
    runtime = f"127.0.0.1:{settings.runtime_port}"
    argv = [flower_executable("flower-supernode"), "--superlink", settings.superlink]
    if settings.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(settings.ca), "--auth-supernode-private-key", str(settings.key)]
    argv += [
        "--node-config", str(node_config_file), "--isolation", "process",
        "--superexec-auth-secret-file", str(secret), "--host", "127.0.0.1", "--port", str(settings.runtime_port),
    ]  # fmt: skip
    worker_argv = [sys.executable, "-m", "fedmusk.ops.worker", "--runtime", runtime, "--secret-file", str(secret)]

    stopping = {"now": False}

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stopping["now"] = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    console.print(
        f"site {settings.name}: data and policy checked; connecting to {settings.superlink}"
        + (f" with key {fingerprint}" if fingerprint else " (development mode: no TLS)")
    )
    try:
        return _supervise({"supernode": argv, "worker": worker_argv}, log_file, scrub, console, stopping, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(runtime_dir, ignore_errors=True)  # the secret dies with the SuperNode it was written for


# -- checks at start ---------------------------------------------------------------------------------------------


def _check_arguments(settings: DaemonSettings, site_root: Path) -> tuple[str, int]:
    if not site_root.is_dir():
        raise DaemonError(f"site folder {settings.site_root} does not exist")
    if not SITE_NAME.match(settings.name):
        raise DaemonError(
            f"site name {settings.name!r}: use 1-64 letters, digits, '.', '_' or '-' (the name the coordinator "
            "registered with `fedmusk certs add-site`)"
        )
    try:
        host, port = split_address(settings.superlink)
    except ValueError as err:
        raise DaemonError(str(err)) from None
    if settings.insecure:
        if host not in LOOPBACK:
            raise DaemonError(f"--dev-insecure sends without TLS and is refused for SuperLink {host}: loopback only")
    elif settings.ca is None or settings.key is None:
        raise DaemonError("--ca and --key are required: the federation's ca.crt and this site's site.key")
    return host, port


def _check_site(settings: DaemonSettings, site_root: Path, console: Console) -> Path | None:
    """Validate the site data and load the policy; returns the policy file used (None: the built-in default)."""
    from fedmusk.data.site.validate import run_validate

    if run_validate(site_root, console, check_slides=not settings.quick) != 0:
        raise DaemonError(
            f"the site data in {settings.site_root} has problems (listed above): fix them, check with "
            "`fedmusk validate`, then start the client again"
        )
    return _check_policy(settings, site_root, console), _check_settings(settings, site_root, console)


def _check_policy(settings: DaemonSettings, site_root: Path, console: Console) -> Path | None:
    policy_path = settings.policy
    if policy_path is None and (site_root / SITE_POLICY_FILE).is_file():
        policy_path = site_root / SITE_POLICY_FILE
    if policy_path is None:
        console.print("egress policy: the built-in default (LoRA factors and task heads only)")
        return None
    if not policy_path.is_file():
        raise DaemonError(f"policy file {policy_path} does not exist")
    policy = SitePolicy.load(policy_path, site_root)
    console.print(f"egress policy: {policy_path.name} (site name {policy.site_name!r})")
    return policy_path.resolve()


def _check_settings(settings: DaemonSettings, site_root: Path, console: Console) -> Path | None:
    """The site's own settings (model files, device, batch sizes), checked now: a missing weights file is said at
    start, not at the first round."""
    path = settings.settings
    if path is None and (site_root / SITE_SETTINGS_FILE).is_file():
        path = site_root / SITE_SETTINGS_FILE
    if path is None:
        console.print(f"site settings: the defaults (no {SITE_SETTINGS_FILE}; random initialisation, device auto)")
        return None
    if not path.is_file():
        raise DaemonError(f"site settings file {path} does not exist")
    values = load_site_settings(path)
    for key in ("model.weights", "model.tokenizer", "train.pretrain.visual_tokenizer"):
        if values.get(key) and not Path(values[key]).is_file():
            raise DaemonError(f"{path.name}: {key} names a file that does not exist")
    shown = ", ".join(f"{k} {'set' if 'weights' in k or 'tokenizer' in k else v}" for k, v in values.items() if v)
    console.print(f"site settings: {path.name} ({shown or 'defaults'})")
    return path.resolve()


def _check_credentials(settings: DaemonSettings, host: str, port: int, console: Console) -> str | None:
    """The CA and key files, then the SuperLink's certificate if the SuperLink answers; returns the key's
    fingerprint (safe to log)."""
    if settings.insecure:
        console.print("[bold yellow]warning:[/] development mode: no TLS, no node authentication")
        return None
    from fedmusk.ops.certs import check_site_files

    assert settings.ca is not None and settings.key is not None
    fingerprint = check_site_files(settings.ca, settings.key)
    try:
        reachable = probe_tls(host, port, settings.ca)
    except TLSVerificationError as err:
        raise DaemonError(str(err)) from None
    if not reachable:
        console.print(f"the SuperLink at {host}:{port} does not answer yet; the SuperNode will keep trying")
    return fingerprint


def _check_runtime_port(port: int) -> None:
    """The SuperNode serves its ClientApp processes on 127.0.0.1:``port``; a port in use would make it fail at every
    restart, so say so now (two daemons on one machine need a port each)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DaemonError(
                f"local port {port} is in use (another fedmusk client?): give this site its own --runtime-port"
            ) from None


def _line_scrubber(site_root: Path, console: Console):
    """Output lines without the site's path, case ids or report text (the scrubber of the site's manifest)."""
    from fedmusk.data.site.scrub import Scrubber, site_line_filter

    try:
        scrubber = Scrubber.from_site(site_root)
    except Exception as err:  # noqa: BLE001 - validation passed; a scrubber that cannot be built falls back
        console.print(f"[yellow]warning:[/] site scrubber unavailable ({type(err).__name__}); masking the path only")
        scrubber = None
    return site_line_filter(site_root, scrubber)


# -- the SuperNode -----------------------------------------------------------------------------------------------


def _echo(console: Console):
    return lambda line: console.print(line, markup=False, highlight=False)


def runtime_folder(site_root: Path, runtime_port: int) -> Path:
    """The folder of the daemon whose SuperNode serves ``runtime_port``: each running daemon has its own (no two
    hold one port), so a second ``fedmusk client`` started on the same site never overwrites the secret that the
    first one's SuperNode and worker share."""
    return site_root / RUNTIME_DIR / str(runtime_port)


def write_runtime_files(folder: Path, node_config: Mapping[str, str]) -> tuple[Path, Path]:
    """A fresh shared secret for the SuperNode's runtime port and the node config as a TOML file, both 0600 in a
    0700 folder; returns their paths. A file keeps values with quotes or spaces intact, where a command line
    ``--node-config`` would split them."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    secret = write_private(folder / "superexec.secret", secrets.token_hex(32).encode())
    lines = [f"{key} = {toml_string(str(value))}" for key, value in node_config.items()]
    return secret, write_private(folder / "node-config.toml", ("\n".join(lines) + "\n").encode("utf-8"))


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class _Restarts:
    """Back-off for one supervised program: short after a long stable run, longer after repeated failures."""

    def __init__(self):
        self.failures = 0
        self.not_before = 0.0

    def stopped(self, ran_s: float) -> float:
        self.failures = 0 if ran_s >= STABLE_S else self.failures + 1
        wait = BACKOFF_S[min(self.failures, len(BACKOFF_S)) - 1] if self.failures else BACKOFF_S[0]
        self.not_before = time.monotonic() + wait
        return wait


def _supervise(argvs, log_file: Path, scrub, console: Console, stopping: dict, settings: DaemonSettings) -> int:
    """Run the SuperNode and the site worker, restarting either when it stops; returns 0 when stopped."""
    children: dict[str, Child | None] = {"supernode": None, "worker": None}
    restarts = {name: _Restarts() for name in children}
    # A coordinator registers the site keys just after its SuperLink starts: a refusal in that window is not final.
    refused_since: float | None = None
    try:
        while not stopping["now"]:
            for name, child in children.items():
                if child is None and time.monotonic() >= restarts[name].not_before:
                    children[name] = Child(
                        name, argvs[name], log_file, env=flower_env(), line_filter=scrub, echo=_echo(console)
                    )
            time.sleep(0.5)
            for name, child in children.items():
                if child is None or child.alive():
                    continue
                code, ran = child.returncode, time.monotonic() - child.started
                child.stop()
                children[name] = None
                if stopping["now"]:
                    break
                if name == "worker":
                    if code == WORKER_FATAL:
                        last = " | ".join(line for line in child.tail(3) if line.strip())
                        raise DaemonError(f"the site worker cannot run: {last}")
                    wait = restarts[name].stopped(ran)
                    # The SuperNode would wait for the lost task's reply before it takes another message: start
                    # both afresh (the coordinator sees this site miss one reply, as after a crash of the machine).
                    node = children["supernode"]
                    if node is not None:
                        node.stop()
                        children["supernode"] = None
                        restarts["supernode"].not_before = time.monotonic() + wait
                    console.print(f"[yellow]the site worker stopped (exit {code}); starting it and the SuperNode "
                                  f"again in {wait:g} s[/]")  # fmt: skip
                    continue
                refused_since = _check_refusals(child, settings, refused_since, console)
                wait = restarts[name].stopped(ran)
                if refused_since is not None:
                    wait = min(wait, max(0.0, settings.registration_wait_s - (time.monotonic() - refused_since)))
                    restarts[name].not_before = time.monotonic() + wait
                console.print(f"[yellow]the SuperNode stopped (exit {code}); starting it again in {wait:g} s[/]")
    finally:
        for child in children.values():
            if child is not None:
                child.stop()
    console.print(f"site {settings.name}: stopped")
    return 0


def _check_refusals(node: Child, settings: DaemonSettings, refused_since: float | None, console: Console):
    """Stop for good (DaemonError) when the coordinator cannot be trusted or keeps refusing the site's key; returns
    since when the key has been refused (None: not refused)."""
    if node.saw(*TLS_REFUSED):
        raise DaemonError(
            f"the SuperLink's certificate does not check out against {settings.ca}: ask your coordinator for "
            "the federation's ca.crt"
        )
    if not node.saw(*KEY_REFUSED):
        return None
    refused_since = refused_since if refused_since is not None else time.monotonic()
    if time.monotonic() - refused_since >= settings.registration_wait_s:
        raise DaemonError(
            f"the coordinator at {settings.superlink} does not accept this site's key: send site.pub (not "
            "site.key) to your coordinator to register it (`fedmusk certs add-site`), then start again"
        )
    console.print("[yellow]the coordinator does not accept this site's key (yet); trying again[/]")
    return refused_since
