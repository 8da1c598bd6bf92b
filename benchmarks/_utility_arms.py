"""The arms of bench_utility.py's study: a baseline trained in this process (centralized on every site pooled, or one
site alone) and a federation simulated in a child process with its own Ray (``_child.py``).

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from _child import log_file, run_child  # noqa: E402 - sibling module in benchmarks/

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "demo.yaml"
SCRIPT = HERE / "bench_utility.py"  # runs the children: --child simulation SPEC


def metric_of(m: dict | None, key: str) -> dict:
    m = m or {}
    return {"value": m.get(key), "ci": m.get(f"{key}_ci"), "n": m.get("n"), "n_events": m.get("n_events"),
            "error": m.get("error")}  # fmt: skip


def train_run(cfg, roots: list[Path], out: Path, key: str, log) -> dict:
    """A centralized (several roots) or local (one root) baseline in this process."""
    from rich.console import Console

    from fedmusk.training.run import run_train

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with contextlib.redirect_stderr(log):  # the MLflow run's "open it with" line
        result = run_train(cfg, roots, out, Console(file=log, width=120))
    return {"wall_s": time.perf_counter() - start, "run_s": result["seconds"], "best_epoch": result["best_epoch"],
            "n_cases": result["n_cases"], "pooled": metric_of(result["test"], key),
            "per_site": {s: metric_of(m, key) for s, m in result["test_per_site"].items()}}  # fmt: skip


def simulation_run(overrides: list[str], roots: list[Path], out: Path, key: str, tmp: Path, cap_s: float) -> dict:
    """A federation in a child process (its own Ray); the results come from its summary.json."""
    shutil.rmtree(out, ignore_errors=True)
    spec = {"overrides": overrides, "roots": [str(r) for r in roots], "out": str(out)}
    child = run_child(SCRIPT, "simulation", spec, cap_s, tmp, cwd=tmp)
    summary_file, log = out / "summary.json", log_file(tmp, "simulation")
    if not summary_file.is_file():
        raise RuntimeError(f"simulation failed ({child}); log: {log}\n" +
                           log.read_text(errors="replace")[-2000:])  # fmt: skip
    summary = json.loads(summary_file.read_text())
    rounds = [{k: r.get(k) for k in ("round", "phase", "seconds", "bytes_up_per_client", "bytes_down", "replies")}
              for r in summary["rounds"]]  # fmt: skip
    return {"wall_s": child["wall_s"], "run_s": summary["seconds"], "rounds": rounds,
            "bytes_up_per_site_round": summary["bytes_up_per_client_round"],
            "bytes_down_per_round": summary["bytes_down_per_round"], "min_replies": min(r["replies"] for r in rounds),
            "leftover_processes": child["leftover_processes"],
            "pooled": metric_of(summary["test"]["pooled"], key),
            "per_site": {s: metric_of(m, key) for s, m in summary["test"]["per_site"].items()}}  # fmt: skip


def child_simulation(spec: dict) -> dict:
    """The child's side of ``simulation_run``: the results are in the run's summary.json."""
    import torch

    torch.set_num_threads(1)
    from fedmusk.config import load_config
    from fedmusk.federation import run_simulation_from_config

    run_simulation_from_config(load_config([CONFIG], spec["overrides"]), spec["roots"], spec["out"])
    return {}

