"""Flower's executables as child processes of fedmusk's own commands (``fedmusk server``, ``fedmusk client``).

The coordinator and the hospital daemon run Flower's SuperLink, SuperNode and CLI as separate programs, the way
Flower deploys them, and never import them: each child runs in a process group of its own so that stopping it also
stops the ServerApp or ClientApp processes it started, its output goes through a filter (the daemon's scrubber)
into a local log file, and the last lines are kept to explain a failure in the operator's words.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Runtime dependency installation would let a SuperLink or SuperNode download packages (a CUDA torch) at run time:
# fedmusk runs only what the operator installed.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PRIVATE_UMASK = 0o077


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Flower's safety settings and ``extra`` on top. This interpreter's folder
    leads PATH: the SuperLink and SuperNode start Flower's other programs (``flower-superexec``) by name."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        path = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return {**os.environ, **FLOWER_ENV, "PATH": path, **(extra or {})}


def flower_executable(name: str) -> str:
    """The path of one of Flower's programs (``flower-superlink``, ``flwr``...), from this interpreter's environment
    first. Raises FileNotFoundError when Flower is not installed beside fedmusk."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"Flower's {name} program is not installed in this environment; reinstall fedmusk")
    return found


def write_private(path: Path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` with mode 0600, also when the file existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def open_private_log(path: Path):
    """A log file opened for appending, created readable by its owner only (0600), with its folder (0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


class Child:
    """A child process in its own process group whose output lines are filtered, logged and remembered.

    ``line_filter`` rewrites each output line before anything keeps it (the daemon scrubs paths and identifiers
    there); ``echo`` also receives every filtered line (the console). ``tail()`` gives the last lines."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        line_filter: Callable[[str], str] | None = None,
        echo: Callable[[str], None] | None = None,
        cwd: Path | None = None,
        keep_lines: int = 400,
    ):
        self.name = name
        self._filter = line_filter or (lambda line: line)
        self._echo = echo
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._lock = threading.Lock()
        self._log = open_private_log(log_path)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else flower_env(), cwd=cwd, start_new_session=True, text=True,
            encoding="utf-8", errors="replace", bufsize=1,
        )  # fmt: skip
        self._pump = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the child is still running after ``timeout`` seconds."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._pump.join(timeout=5)
        return code

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the child's whole process group, SIGKILL after ``grace_s``; returns the exit code."""
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # The group may outlive its leader (an app process still finishing): make sure nothing is left behind.
        _signal_group(self.proc.pid, signal.SIGKILL)
        self._pump.join(timeout=5)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 20) -> list[str]:
        with self._lock:
            return list(self._lines)[-n:]

    def saw(self, *needles: str) -> bool:
        """Whether any remembered output line contains one of ``needles``."""
        with self._lock:
            return any(needle in line for line in self._lines for needle in needles)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = self._filter(_strip_ansi(raw.rstrip("\n")))
            with self._lock:
                self._lines.append(line)
            if not self._log.closed:
                self._log.write(line + "\n")
            if self._echo is not None:
                self._echo(line)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _strip_ansi(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\x1b" and i + 1 < len(text) and text[i + 1] == "[":
            j = i + 2
            while j < len(text) and not text[j].isalpha():
                j += 1
            i = j + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def write_pid_file(path: Path, pid: int) -> None:
    """Record a child's pid (0600), so that the next start on the same state folder can stop it after a crash."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")


def stop_stale_process(pid_file: Path, *markers: str, grace_s: float = 15.0) -> int | None:
    """Stop the process group recorded in ``pid_file`` by an earlier run that crashed, if that process's command
    line still contains every one of ``markers`` (so a pid reused by another program is left alone); the pid file is
    removed either way. Returns the pid stopped, or None."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    stopped = None
    if all(marker in cmdline for marker in markers):
        stopped = pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and process_running(pid):
                time.sleep(0.2)
    pid_file.unlink(missing_ok=True)
    return stopped


def process_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting for its parent to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def group_running(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still runs (zombies do not count)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_flower_cli(args: Sequence[str], env: Mapping[str, str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """One ``flwr`` command (captured output); raises TimeoutError naming the command when it hangs."""
    argv = [flower_executable("flwr"), *args]
    try:
        return subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as err:
        raise TimeoutError(f"`flwr {args[0]}` did not answer within {timeout_s:g} s") from err


# --- reaching the SuperLink -------------------------------------------------------------------------------------


class TLSVerificationError(Exception):
    """The SuperLink answered, but its certificate does not check out against the federation's CA."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); raises ValueError in the operator's words."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"SuperLink address {address!r} is not HOST:PORT (e.g. coordinator.example.org:9092)")
    return host.strip("[]"), int(port)


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout_s):
            return True
    except OSError:
        return False


def probe_tls(host: str, port: int, ca_file: Path, timeout_s: float = 5.0) -> bool:
    """Try a TLS handshake with the SuperLink, verifying its certificate and host name against ``ca_file``.

    Returns True when the handshake succeeds, False when nothing answers (down, or not reachable yet: the SuperNode
    keeps retrying); raises TLSVerificationError when something answers with a certificate that does not check out."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as err:
        raise TLSVerificationError(
            f"the SuperLink at {host}:{port} presented a certificate that does not check out against {ca_file.name} "
            f"({err.verify_message}): is {ca_file.name} the federation's CA certificate from your coordinator, and "
            f"is {host} a name in the SuperLink's certificate?"
        ) from None
    except ssl.SSLError as err:
        raise TLSVerificationError(
            f"the SuperLink at {host}:{port} did not complete a TLS handshake ({err.reason or err}): "
            "is it started with TLS (not --dev-insecure)?"
        ) from None
    except OSError:
        return False
