"""bench_federation.py, sections 2 and 3: the simulations it measures, each in a child process (``_child.py``).

2. SecAgg+ against plain: tiny-model fedmusk federations at several site counts, and Flower's SecAgg+ on its own (a
   minimal simulation whose sites return a fixed random vector of a given length).
3. Scale: tiny-model federations of many sites, and straight-line fits of their costs against the number of sites.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from _child import run_child  # noqa: E402 - sibling modules in benchmarks/
from _federation_bytes import REPO, TINY_OVERRIDES
from _federation_tables import fmt

SCRIPT = Path(__file__).resolve().parent / "bench_federation.py"  # runs the children: --child fedmusk|vector SPEC


# -- child processes ---------------------------------------------------------------------------------------------------


def child_fedmusk(spec: dict) -> dict:
    """One fedmusk simulation (in a child process)."""
    import torch

    torch.set_num_threads(1)
    from fedmusk.config import load_config
    from fedmusk.federation import run_simulation_from_config

    cfg = load_config([REPO / "configs" / "demo.yaml"], spec["overrides"])
    summary = run_simulation_from_config(cfg, spec["roots"], spec["out"])
    return {"seconds": summary["seconds"], "rounds": [
        {k: r.get(k) for k in ("round", "seconds", "bytes_up", "bytes_down", "bytes_up_per_client", "replies")}
        for r in summary["rounds"]],
        "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
        "secagg_wire": "uint32" if cfg.federation.secagg_packed else "int64"}  # fmt: skip


def child_vector(spec: dict) -> dict:
    """A minimal Flower simulation: every site returns the same-length random vector; secure or plain."""
    import numpy as np
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    length, sites, rounds, secure = spec["length"], spec["sites"], spec["rounds"], spec["secure"]
    timings: list[dict] = []

    class Client(NumPyClient):
        def __init__(self, seed: int):
            self.vector = np.random.default_rng(seed).uniform(-0.01, 0.01, length).astype(np.float32)

        def fit(self, parameters, config):
            return [self.vector], 1, {}

    def client_fn(context):
        return Client(int(context.node_config.get("partition-id", 0))).to_client()

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            timings.append({"round": server_round, "start": time.monotonic()})
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            timings[-1].update(end=time.monotonic(), replies=len(results), failures=len(failures))
            return out

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                     initial_parameters=ndarrays_to_parameters([np.zeros(length, np.float32)]))  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid, context):
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, clipping_range=1.0, timeout=1200) \
            if secure else None  # fmt: skip
        workflow = DefaultWorkflow(fit_workflow=fit) if secure else DefaultWorkflow()
        workflow(grid, legacy)

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    start = time.monotonic()
    run_simulation(server_app=server, client_app=client, num_supernodes=sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}})  # fmt: skip
    seconds = time.monotonic() - start
    rounds_out = [{"round": t["round"], "seconds": t["end"] - t["start"], "replies": t.get("replies")}
                  for t in timings if "end" in t]  # fmt: skip
    return {"seconds": seconds, "rounds": rounds_out}


def fedmusk_child(spec: dict, cap_s: float, tmp: Path) -> dict:
    """``child_fedmusk`` in a child process; killed at the cap, it reports the rounds it had finished."""
    return run_child(SCRIPT, "fedmusk", spec, cap_s, tmp, partial=lambda: _rounds_done(Path(spec["out"])))


def _rounds_done(out: Path) -> dict | None:
    if not (out / "rounds.json").exists():
        return None
    result = {"rounds": json.loads((out / "rounds.json").read_text()), "partial": True}
    result["rounds"] = [{k: r.get(k) for k in ("round", "seconds", "bytes_up", "bytes_down",
                         "bytes_up_per_client", "replies")} for r in result["rounds"]]  # fmt: skip
    return result


def median_round_s(rounds: list[dict]) -> float | None:
    later = [r["seconds"] for r in rounds if r["round"] > 1] or [r["seconds"] for r in rounds]
    return statistics.median(later) if later else None


def _status(r: dict) -> str:
    return f"{' TIMED OUT' if r['timed_out'] else ''}{' ERROR' if 'error' in r else ''}"


# -- 2. SecAgg+ overhead -----------------------------------------------------------------------------------------------


def fedmusk_spec(roots, n, secure, rounds, out) -> dict:
    return {"roots": [str(r) for r in roots[:n]], "out": str(out), "overrides": [
        *TINY_OVERRIDES, f"federation.rounds={rounds}", f"federation.min_sites={n}",
        f"federation.secure_aggregation={'true' if secure else 'false'}"]}  # fmt: skip


def bench_secagg(roots, site_counts, rounds, repeats, cap_s, tmp) -> list[dict]:
    rows = []
    for n in site_counts:
        for rep in range(repeats):
            order = (True, False) if rep % 2 == 0 else (False, True)  # interleave, alternate who goes first
            for secure in order:
                out = tmp / f"secagg-{n}-{rep}-{'s' if secure else 'p'}"
                r = fedmusk_child(fedmusk_spec(roots, n, secure, rounds, out), cap_s, tmp)
                r.update(sites=n, secure=secure, repeat=rep, median_round_s=median_round_s(r.get("rounds", [])))
                print(f"secagg: {n} sites, {'SecAgg+' if secure else 'plain'}, rep {rep}: median round "
                      f"{fmt(r['median_round_s'])} s, run {r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
                      f"{_status(r)}", flush=True)  # fmt: skip
                rows.append(r)
    return rows


def bench_vector(lengths: dict, sites, rounds, repeats, cap_s, tmp) -> list[dict]:
    rows = []
    for name, length in lengths.items():
        for rep in range(repeats):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for secure in order:
                spec = {"length": length, "sites": sites, "rounds": rounds, "secure": secure}
                r = run_child(SCRIPT, "vector", spec, cap_s, tmp)
                r.update(vector=name, length=length, sites=sites, secure=secure, repeat=rep,
                         median_round_s=median_round_s(r.get("rounds", [])))  # fmt: skip
                print(f"vector: {name} ({length:,}), {'SecAgg+' if secure else 'plain'}, rep {rep}: median fit "
                      f"round {fmt(r['median_round_s'])} s, peak {r['peak_rss_mb']:.0f} MB{_status(r)}", flush=True)
                rows.append(r)
    return rows


# -- 3. scale ----------------------------------------------------------------------------------------------------------


def bench_scale(roots, site_counts, modes, rounds, cap_s, tmp) -> list[dict]:
    rows = []
    for n in site_counts:
        for secure in modes:
            out = tmp / f"scale-{n}-{'s' if secure else 'p'}"
            r = fedmusk_child(fedmusk_spec(roots, n, secure, rounds, out), cap_s, tmp)
            r.update(sites=n, secure=secure, round_s=[x["seconds"] for x in r.get("rounds", [])])
            print(f"scale: {n} sites, {'SecAgg+' if secure else 'plain'}: rounds {[round(s, 1) for s in r['round_s']]}"
                  f" s, run {r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB{_status(r)}", flush=True)  # fmt: skip
            rows.append(r)
    return rows


def growth(runs: list[dict]) -> dict:
    """Least-squares lines against the number of sites, per mode: first round (with the sites' start-up), later
    rounds (median), peak RSS, CPU seconds of the whole run; slope per site, intercept, and the measured ratio
    between the largest and smallest federation (with the ratio of their site counts for comparison)."""
    fits = {}
    for secure in sorted({r["secure"] for r in runs}):
        ok = sorted((r for r in runs if r["secure"] == secure and r.get("round_s") and not r.get("partial")),
                    key=lambda r: r["sites"])  # fmt: skip
        if len(ok) < 2:
            continue
        x = np.array([r["sites"] for r in ok], float)
        series = {"first_round_s": [r["round_s"][0] for r in ok],
                  "round_s": [statistics.median(r["round_s"][1:] or r["round_s"]) for r in ok],
                  "peak_rss_mb": [r["peak_rss_mb"] for r in ok]}  # fmt: skip
        if all(r.get("cpu_s") for r in ok):
            series["cpu_s"] = [r["cpu_s"] for r in ok]  # the whole run's CPU seconds: less sensitive to the load
        fit = {"sites": x.astype(int).tolist(), "site_ratio": x[-1] / x[0]}
        for name, ys in series.items():
            y = np.array(ys, float)
            slope, intercept = np.polyfit(x, y, 1)
            fit[name] = {"values": ys, "per_site": float(slope), "intercept": float(intercept),
                         "ratio": float(y[-1] / y[0]) if y[0] else None}  # fmt: skip
        fits["secure" if secure else "plain"] = fit
    return fits

