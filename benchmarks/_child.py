"""Run one measurement in a child process of a benchmark script and watch its whole process tree.

A federation simulation starts its own Ray, whose processes can outlive it; each benchmark therefore runs every
simulation as ``python <script> --child KIND SPEC`` in its own session, samples the resident memory and CPU time of
the child's process tree, kills the tree at a time cap and stops any process of it that is still alive afterwards.
``run_child`` is the parent's side, ``child_main`` the child's.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def child_main(argv: list[str], kinds: dict[str, Callable[[dict], dict]]) -> int:
    """The child's side of ``run_child``: ``argv`` is ``[KIND, SPEC_FILE]``; runs ``kinds[KIND](spec)`` and writes
    what it returns (a JSON-able dict) to the spec's ``result`` file."""
    kind, spec = argv[0], json.loads(Path(argv[1]).read_text())
    result = kinds[kind](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_child(
    script: Path,
    kind: str,
    spec: dict,
    cap_s: float,
    tmp: Path,
    *,
    cwd: Path | None = None,
    partial: Callable[[], dict | None] | None = None,
) -> dict:
    """Run ``python script --child kind SPEC`` in its own session and sample the RSS and CPU time of its whole
    process tree every 0.5 s; kill the tree at ``cap_s``. Returns the child's result plus wall seconds, peak RSS,
    CPU seconds (user + system, summed over every process seen; a process's last 0.5 s may be missed), whether it
    timed out, and how many processes outlived it and had to be stopped. A child killed at the cap without a result
    gets ``partial()`` instead, when given (what it had done by then). The child's output goes to
    ``tmp/child-<kind>.log``; its tail is the ``error`` of a child that ended without a result."""
    import psutil

    spec_file, result_file = tmp / f"spec-{time.monotonic_ns()}.json", tmp / f"result-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": str(tmp / "ray"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_HOME": str(tmp / "flwr")}  # fmt: skip
    (tmp / "ray").mkdir(exist_ok=True)
    log_path = log_file(tmp, kind)
    log = open(log_path, "ab")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script), "--child", kind, str(spec_file)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)  # fmt: skip
    root = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    peak, timed_out, cpu = 0, False, {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        rss = 0
        for p in tree:
            seen.setdefault(p.pid, p)
            try:
                rss += p.memory_info().rss
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system  # the last sample of a process that exits is kept
            except psutil.Error:
                pass
        peak = max(peak, rss)
        if time.monotonic() - start > cap_s:
            timed_out = True
            _kill(proc, seen)
            break
        time.sleep(0.5)
    wall = time.monotonic() - start
    proc.wait()
    leftovers = [p for p in seen.values() if _alive(p)]
    if leftovers:  # Ray processes that outlived the simulation: stop them by PID
        _kill(None, {p.pid: p for p in leftovers})
    log.close()
    result = json.loads(result_file.read_text()) if result_file.exists() else None  # done just before the cap
    if result is not None:
        timed_out = False
    elif timed_out and partial is not None:
        result = partial()
    out = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "cpu_s": sum(cpu.values()), "timed_out": timed_out,
           "cap_s": cap_s, "returncode": proc.returncode, "leftover_processes": len(leftovers),
           "processes_seen": len(seen)}  # fmt: skip
    if result is None and not timed_out:
        out["error"] = log_path.read_text(errors="replace")[-1500:]
    return {**out, **(result or {})}


def log_file(tmp: Path, kind: str) -> Path:
    """Where ``run_child`` appends the output of the children of ``kind``."""
    return tmp / f"child-{kind}.log"


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def _kill(proc, procs: dict) -> None:
    import psutil

    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    time.sleep(3)
    for p in procs.values():
        if _alive(p):
            try:
                p.kill()
            except psutil.Error:
                pass
