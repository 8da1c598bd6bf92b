"""Federation costs: bytes a site exchanges per round, SecAgg+'s time overhead, and how simulation scales with sites.

1. bytes: what one site sends up and receives down per round with MUSK-large (built on the meta device; LoRA applied
   by fedmusk's own apply_lora; the layout counted is fedmusk's ``AdapterLayout`` of the very tensors
   ``adapter_state`` would send, and its ``update_layout`` for each strategy), for configs/musk-large.yaml as it is
   and for FedIT, FFA-LoRA, FedSA-LoRA and RoLoRA, both experts (end-to-end tiles: the vision expert can learn only
   there) or the language expert only, plain and under SecAgg+, against full-model fine-tuning (the
   675,188,737 float32 parameters up and down every round). The tiny demo adapter is counted the same way and
   checked against the payloads measured in section 2's simulations.
2. secagg: tiny-model federations (report-only fusion on a labels-and-reports synthetic cohort) at 3, 5 and 10
   sites, SecAgg+ and plain interleaved in one invocation, median round seconds after round 1; and Flower's SecAgg+
   on its own: a minimal Flower simulation (3 sites, NumPyClient returning a fixed random vector) with the vector
   as long as the tiny adapter and as MUSK-large's adapters, so the protocol's cost at MUSK-large's size is measured
   without training MUSK-large.
3. scale: federations of 10, 30 and 100 tiny sites, 2 rounds (plain by default; SecAgg+ with --scale-modes):
   seconds of the first round (which includes every site's start-up) and of the next, the whole run, peak resident
   memory of the process tree (the simulation and every Ray process), and a straight-line fit of each against the
   number of sites.

Every simulation runs in a child process of this script (its own Ray), sampled for RSS with psutil and killed
with its whole process tree at the time cap; every child process is checked to be gone afterwards.

Usage: python benchmarks/bench_federation.py [--quick] [--fresh] [--sections bytes,secagg,vector,scale]
Results merge into benchmarks/results/bench_federation.json (per section; --fresh drops the earlier rows of the
sections it runs), bench_federation.md and the plots federation_{bytes,secagg,scale}.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from _report import cpu_name, write_report  # noqa: E402 - sibling module in benchmarks/

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FULL_PARAMS = 675_188_737
FULL_BYTES = FULL_PARAMS * 4  # float32; full-model fine-tuning sends this up and receives it down every round
GOAL_UP_FRACTION = 0.005  # issue: bytes up <= 0.5% of the full model
GOAL_SECAGG_OVERHEAD = 0.15  # issue: SecAgg+ <= ~15% more time per round (Flower reports about 13%)

# Tiny federations: report-only fusion needs no slides, so a labels-and-reports cohort (images=False) is a valid site.
TINY_OVERRIDES = [
    "train.fusion=report", "train.bootstrap=0", "federation.local_epochs=1", "federation.min_replies=2",
    "federation.pretrain_rounds=0",  # outcome rounds only (configs/demo.yaml starts with a pretraining round)
    "federation.wait_for_sites_s=600", "federation.reply_timeout_s=1200",
]  # fmt: skip

# MUSK-large configurations whose exchange is counted (on configs/musk-large.yaml): key -> (label, strategy, overrides).
# The vision expert's LoRA can learn only from tiles run through MUSK: the "both experts" rows train end to end.
BOTH = ["train.lora.experts=[A,B]", "train.features=end2end"]
VARIANTS = {
    "defaults": ("configs/musk-large.yaml defaults (FedIT, LoRA r8 q/k/v/out, language expert, cached tiles)",
                 "fedit", []),
    "fedit-both": ("FedIT, both experts (end-to-end tiles)", "fedit", BOTH),
    "fedit-language": ("FedIT, language expert only", "fedit", ["train.lora.experts=[B]"]),
    "ffa-both": ("FFA-LoRA (B only), both experts (end-to-end tiles)", "ffa", [*BOTH, "train.lora.ffa=true"]),
    "ffa-language": ("FFA-LoRA (B only), language expert only", "ffa",
                     ["train.lora.experts=[B]", "train.lora.ffa=true"]),
    "fedsa-both": ("FedSA-LoRA (A only), both experts (end-to-end tiles)", "fedsa", BOTH),
    "fedsa-language": ("FedSA-LoRA (A only), language expert only", "fedsa", ["train.lora.experts=[B]"]),
    "rolora-both": ("RoLoRA (B or A each round), both experts (end-to-end tiles)", "rolora", BOTH),
    "rolora-language": ("RoLoRA (B or A each round), language expert only", "rolora", ["train.lora.experts=[B]"]),
}  # fmt: skip


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- 1. bytes ----------------------------------------------------------------------------------------------------------


def npy_bytes(shape, dtype) -> int:
    """Bytes of one array as Flower ships it: numpy's .npy serialisation (header + data)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": tuple(shape)})  # fmt: skip
    return len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def exchange(layout, strategy: str) -> dict:
    """Bytes one site exchanges per round for a global adapter ``layout`` (fedmusk's AdapterLayout).

    Up, plain: the float32 arrays of ``update_layout(strategy)``. Up, SecAgg+: the same values plus fedmusk's weight,
    quantised and masked by Flower, plus Flower's own weight factor (one more array), as uint32 (fedmusk packs
    Flower's int64, ``up_secure_int64``); the keys and shares of the protocol (a few kB) come on top. RoLoRA: a
    round-1 (B) round; its A rounds send as many values where every LoRA layer is square (q/k/v/out). Down: the
    float32 global adapter, twice (the fit and the evaluate instructions both carry it), in both modes and in
    every strategy."""
    from fedmusk.strategies.aggregation import tensor_role

    rnd = 1 if strategy == "rolora" else None
    plain, secure = layout.update_layout(strategy, False, rnd), layout.update_layout(strategy, True, rnd)
    values = lambda lay: sum(int(np.prod(s)) for s in lay.shapes)  # noqa: E731
    return {
        "strategy": strategy, "tensors_global": len(layout.names), "tensors_up": len(plain.names),
        "values_global": values(layout), "values_up": values(plain), "secure_vector_len": values(secure),
        "lora_params_up": sum(int(np.prod(s)) for n, s in zip(plain.names, plain.shapes) if tensor_role(n) != "head"),
        "head_params_up": sum(int(np.prod(s)) for n, s in zip(plain.names, plain.shapes) if tensor_role(n) == "head"),
        "up_plain": sum(npy_bytes(s, np.float32) for s in plain.shapes),
        "up_secure": sum(npy_bytes(s, np.uint32) for s in secure.shapes) + npy_bytes((1,), np.uint32),
        "up_secure_int64": sum(npy_bytes(s, np.int64) for s in secure.shapes) + npy_bytes((1,), np.int64),
        "down": 2 * sum(npy_bytes(s, np.float32) for s in layout.shapes),
    }  # fmt: skip


def large_layout(overrides: list[str]):
    """fedmusk's AdapterLayout of MUSK-large under configs/musk-large.yaml (and ``overrides``), built on the meta
    device (no weights), from exactly the tensors ``adapter_state`` would copy."""
    import torch

    from fedmusk.config import load_config
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.musk_model.lora import _exchanged
    from fedmusk.training.outcome import OutcomeTrainer
    from fedmusk.wire import AdapterLayout

    cfg = load_config([REPO / "configs" / "musk-large.yaml"], overrides)
    with torch.device("meta"):
        base = MuskModel(MuskConfig.large())
    assert sum(p.numel() for p in base.parameters()) == FULL_PARAMS
    trainer = OutcomeTrainer(cfg, base, None, None, "meta")
    return AdapterLayout.of(_exchanged(trainer.model, trainable_only=True))  # meta tensors: shapes only


def tiny_layout():
    """fedmusk's AdapterLayout of the tiny demo adapter of section 2's federations (built for real on the CPU)."""
    from fedmusk.config import load_config
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.training.outcome import OutcomeTrainer
    from fedmusk.wire import AdapterLayout

    cfg = load_config([REPO / "configs" / "demo.yaml"], TINY_OVERRIDES)
    return AdapterLayout.of(OutcomeTrainer(cfg, MuskModel(MuskConfig.tiny()), None, None, "cpu").adapter_state())


def with_fractions(row: dict) -> dict:
    """Shares of full-model fine-tuning: up alone against the full model up, and up + down against its up + down."""
    for mode in ("plain", "secure"):
        row[f"up_{mode}_of_full"] = row[f"up_{mode}"] / FULL_BYTES
        row[f"total_{mode}_of_full"] = (row[f"up_{mode}"] + row["down"]) / (2 * FULL_BYTES)
        row[f"less_{mode}"] = 1 - row[f"total_{mode}_of_full"]
    return row


def bench_bytes() -> dict:
    rows = []
    for key, (label, strategy, overrides) in VARIANTS.items():
        r = with_fractions({"key": key, "variant": label, **exchange(large_layout(overrides), strategy)})
        print(f"bytes: {label}: up {r['up_plain'] / 1e6:.2f} MB plain ({100 * r['up_plain_of_full']:.3f}% of full), "
              f"{r['up_secure'] / 1e6:.2f} MB SecAgg+; down {r['down'] / 1e6:.2f} MB; "
              f"{100 * r['less_secure']:.2f}% less than full fine-tuning under SecAgg+", flush=True)  # fmt: skip
        rows.append(r)
    defaults = rows[0]
    print(f"bytes: GOAL defaults under SecAgg+ <= {100 * GOAL_UP_FRACTION:.1f}% of the full model: "
          f"{100 * defaults['up_secure_of_full']:.3f}% "
          f"({'met' if defaults['up_secure_of_full'] <= GOAL_UP_FRACTION else 'NOT met'})", flush=True)
    return {"full_params": FULL_PARAMS, "full_bytes_float32": FULL_BYTES, "variants": rows,
            "tiny": {"variant": "tiny demo adapter (report fusion), FedIT", **exchange(tiny_layout(), "fedit")},
            "heads_config": "configs/musk-large.yaml (ms_aug, concat fusion, survival head)"}  # fmt: skip


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


def run_child(kind: str, spec: dict, cap_s: float, tmp: Path) -> dict:
    """Run one simulation in a child process (own session) and sample the RSS and CPU time of its whole process tree
    every 0.5 s; kill the tree at ``cap_s``. Returns the child's result plus wall seconds, peak RSS, CPU seconds
    (user + system, summed over every process seen; a process's last 0.5 s may be missed) and whether it timed
    out."""
    import psutil

    spec_file, result_file = tmp / f"spec-{time.monotonic_ns()}.json", tmp / f"result-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": str(tmp / "ray"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_HOME": str(tmp / "flwr")}  # fmt: skip
    (tmp / "ray").mkdir(exist_ok=True)
    log = open(tmp / f"child-{kind}.log", "ab")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(spec_file)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
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
    elif timed_out and spec.get("out") and (Path(spec["out"]) / "rounds.json").exists():
        result = {"rounds": json.loads((Path(spec["out"]) / "rounds.json").read_text()), "partial": True}
        result["rounds"] = [{k: r.get(k) for k in ("round", "seconds", "bytes_up", "bytes_down",
                             "bytes_up_per_client", "replies")} for r in result["rounds"]]  # fmt: skip
    out = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "cpu_s": sum(cpu.values()), "timed_out": timed_out,
           "cap_s": cap_s, "returncode": proc.returncode, "leftover_processes": len(leftovers),
           "processes_seen": len(seen)}  # fmt: skip
    if result is None and not timed_out:
        out["error"] = (tmp / f"child-{kind}.log").read_text(errors="replace")[-1500:]
    return {**out, **(result or {})}


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
                r = run_child("fedmusk", fedmusk_spec(roots, n, secure, rounds, out), cap_s, tmp)
                r.update(sites=n, secure=secure, repeat=rep, median_round_s=median_round_s(r.get("rounds", [])))
                print(f"secagg: {n} sites, {'SecAgg+' if secure else 'plain'}, rep {rep}: median round "
                      f"{_fmt(r['median_round_s'])} s, run {r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
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
                r = run_child("vector", spec, cap_s, tmp)
                r.update(vector=name, length=length, sites=sites, secure=secure, repeat=rep,
                         median_round_s=median_round_s(r.get("rounds", [])))  # fmt: skip
                print(f"vector: {name} ({length:,}), {'SecAgg+' if secure else 'plain'}, rep {rep}: median fit "
                      f"round {_fmt(r['median_round_s'])} s, peak {r['peak_rss_mb']:.0f} MB{_status(r)}", flush=True)
                rows.append(r)
    return rows


# -- 3. scale ----------------------------------------------------------------------------------------------------------


def bench_scale(roots, site_counts, modes, rounds, cap_s, tmp) -> list[dict]:
    rows = []
    for n in site_counts:
        for secure in modes:
            out = tmp / f"scale-{n}-{'s' if secure else 'p'}"
            r = run_child("fedmusk", fedmusk_spec(roots, n, secure, rounds, out), cap_s, tmp)
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


# -- report ------------------------------------------------------------------------------------------------------------


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _mb(v) -> str:
    return f"{v / 1e6:.2f}"


def _pair_medians(rows, key_fields) -> dict:
    """(key..., secure) -> median of median_round_s over repeats."""
    groups: dict = {}
    for r in rows:
        if r.get("median_round_s") is not None:
            groups.setdefault(tuple(r[k] for k in key_fields) + (r["secure"],), []).append(r["median_round_s"])
    return {k: statistics.median(v) for k, v in groups.items()}


def secagg_overheads(sec: dict) -> list[dict]:
    """Per site count: median plain and SecAgg+ round seconds, overhead, and measured bytes per site per round."""
    med = _pair_medians(sec["runs"], ["sites"])
    out = []
    for n in sorted({r["sites"] for r in sec["runs"]}):
        p, s = med.get((n, False)), med.get((n, True))
        row = {"sites": n, "plain_s": p, "secure_s": s, "overhead_s": None if p is None or s is None else s - p}
        row["overhead"] = None if row["overhead_s"] is None else row["overhead_s"] / p
        for secure, mode in ((False, "plain"), (True, "secure")):
            later = [x for r in sec["runs"] if r["sites"] == n and r["secure"] == secure
                     for x in r.get("rounds", []) if x["round"] > 1]  # fmt: skip
            row[f"up_{mode}"] = statistics.median(x["bytes_up_per_client"] for x in later) if later else None
            row[f"down_{mode}"] = statistics.median(x["bytes_down"] / n for x in later) if later else None
            if secure:  # runs before fedmusk packed the masked vector carry no wire field: Flower's int64
                wires = {r.get("secagg_wire", "int64") for r in sec["runs"] if r["sites"] == n and r["secure"]}
                row["secagg_wire"] = "uint32" if wires == {"uint32"} else "int64"
            walls = [r["wall_s"] for r in sec["runs"] if r["sites"] == n and r["secure"] == secure]
            row[f"run_{mode}_s"] = statistics.median(walls) if walls else None
        out.append(row)
    return out


def _measured(section: dict) -> str:
    m = section.get("measured") or {}
    return (f"Measured {m.get('date', '?')}, load average before/after {m.get('load_before')} / "
            f"{m.get('load_after')}.") if m else ""  # fmt: skip


def md_bytes(b: dict, sec: dict | None) -> list[str]:
    lines = ["### 1. Communication per site per round (MUSK-large)", "",
             f"Full-model fine-tuning exchanges the {b['full_params']:,} float32 parameters "
             f"({b['full_bytes_float32'] / 1e6:,.1f} MB) up and down every round: "
             f"{2 * b['full_bytes_float32'] / 1e6:,.1f} MB per site per round. fedmusk's heads: "
             f"{b['heads_config']}. Down: the float32 global adapter, sent with the fit and again with the evaluate "
             "instruction (every strategy; FedSA's sites then keep their own B and heads). Up under SecAgg+: the "
             "masked vector as fedmusk packs it, uint32 (+ a few kB of keys and shares; Flower's own int64 in the "
             "last column). Goal: bytes up <= 0.5% of the full model, at configs/musk-large.yaml's defaults under "
             "SecAgg+.", "",
             "| configuration | values up | up MB plain / SecAgg+ | down MB | up % of full model plain / SecAgg+ "
             "| goal (<= 0.5%) plain / SecAgg+ | up + down % of full fine-tuning plain / SecAgg+ | less communication "
             "plain / SecAgg+ | SecAgg+ up MB as Flower's int64 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    verdict = lambda f: "met" if f <= GOAL_UP_FRACTION else "NOT met"  # noqa: E731
    for v in b["variants"]:
        lines.append(f"| {v['variant']} | {v['values_up']:,} | {_mb(v['up_plain'])} / {_mb(v['up_secure'])} | "
                     f"{_mb(v['down'])} | {100 * v['up_plain_of_full']:.3f} / {100 * v['up_secure_of_full']:.3f} | "
                     f"{verdict(v['up_plain_of_full'])} / {verdict(v['up_secure_of_full'])} | "
                     f"{100 * v['total_plain_of_full']:.3f} / {100 * v['total_secure_of_full']:.3f} | "
                     f"{100 * v['less_plain']:.2f}% / {100 * v['less_secure']:.2f}% | "
                     f"{_mb(v['up_secure_int64']) if 'up_secure_int64' in v else '-'} |")  # fmt: skip
    lines += ["", "FedIT sends every LoRA factor and the heads; FFA-LoRA leaves A (frozen at the shared seed) out; "
              "FedSA-LoRA sends only the A factors (B and heads stay at the site); RoLoRA sends B in odd rounds and A "
              "in even ones, with the heads. With cached tile features (configs/musk-large.yaml) the vision expert "
              "never runs in training, so fedmusk neither trains nor sends its LoRA (the log says so): the "
              "both-experts rows train end to end. SecAgg+ masks values below 2^32: fedmusk ships them as uint32, "
              "the bytes of float32 (Flower's own int64 is twice that).", ""]  # fmt: skip
    t = b.get("tiny")
    rows = secagg_overheads(sec) if sec else []
    if t and rows:
        lines += ["Cross-check with section 2a: the same count for the tiny demo adapter "
                  f"({t['values_global']:,} values, {t['tensors_global']} tensors, FedIT) against fedmusk's byte meter "
                  "in the simulations (median over rounds 2..; the rest is metrics, configs, SecAgg+ keys and shares):",
                  "", "| sites | up plain: computed / measured | up SecAgg+: computed / measured | down: computed / "
                  "measured plain / measured SecAgg+ | largest gap |", "|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            int64 = r.get("secagg_wire") == "int64" and "up_secure_int64" in t  # measured before the packing
            up_secure = t["up_secure_int64"] if int64 else t["up_secure"]
            got = [(t["up_plain"], r["up_plain"]), (up_secure, r["up_secure"]), (t["down"], r["down_plain"]),
                   (t["down"], r["down_secure"])]  # fmt: skip
            gaps = [abs(m - c) / c for c, m in got if m is not None]
            lines.append(f"| {r['sites']} | {t['up_plain']:,} / {_fmt(r['up_plain'], 0)} | {up_secure:,} / "
                         f"{_fmt(r['up_secure'], 0)}{' (int64, earlier run)' if int64 else ''} | "
                         f"{t['down']:,} / {_fmt(r['down_plain'], 0)} / "
                         f"{_fmt(r['down_secure'], 0)} | {_fmt(100 * max(gaps) if gaps else None, 1)}% |")  # fmt: skip
        lines.append("")
    return lines + ["![bytes](federation_bytes.png)", ""]


def md_secagg(sec: dict) -> list[str]:
    lines = ["### 2a. SecAgg+ vs plain, tiny model (report-only fusion, labels-and-reports cohort)", "",
             f"{sec['cases_per_site']} cases per site, {sec['rounds']} rounds, 1 local epoch; median round seconds "
             "over rounds 2.. (training + SecAgg+ or plain fit + evaluation), median over repeats "
             f"({sec['repeats']}); SecAgg+ and plain interleaved in one invocation. Bytes per site per round from "
             f"fedmusk's meter. {_measured(sec)}", "",
             "| sites | plain s/round | SecAgg+ s/round | overhead s | overhead % | up bytes/site plain / SecAgg+ | "
             "down bytes/site plain / SecAgg+ | run s plain / SecAgg+ |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in secagg_overheads(sec):
        lines.append(f"| {r['sites']} | {_fmt(r['plain_s'])} | {_fmt(r['secure_s'])} | {_fmt(r['overhead_s'])} | "
                     f"{_fmt(None if r['overhead'] is None else 100 * r['overhead'], 0)} | {_fmt(r['up_plain'], 0)} / "
                     f"{_fmt(r['up_secure'], 0)} | {_fmt(r['down_plain'], 0)} / {_fmt(r['down_secure'], 0)} | "
                     f"{_fmt(r['run_plain_s'], 0)} / {_fmt(r['run_secure_s'], 0)} |")  # fmt: skip
    return lines + ["", "![SecAgg+](federation_secagg.png)", ""]


def vector_overheads(vec: dict) -> list[dict]:
    med = _pair_medians(vec["runs"], ["vector"])
    out = []
    for name in dict.fromkeys(r["vector"] for r in vec["runs"]):
        p, s = med.get((name, False)), med.get((name, True))
        extra = None if p is None or s is None else s - p
        out.append({"vector": name, "length": next(r["length"] for r in vec["runs"] if r["vector"] == name),
                    "plain_s": p, "secure_s": s, "extra_s": extra,
                    "overhead": {f"{a['local_s']:.0f}": None if extra is None else extra / (a["local_s"] + p)
                                 for a in vec["assumptions"]}})  # fmt: skip
    return out


def md_vector(vec: dict) -> list[str]:
    lines = ["### 2b. SecAgg+ protocol cost by vector length (minimal Flower simulation, no training)", "",
             f"{vec['sites']} sites, NumPyClient returning a fixed float32 vector, {vec['rounds']} rounds, fit "
             f"only; median fit-round seconds over rounds 2.., median over repeats ({vec['repeats']}). Ratio: "
             f"SecAgg+'s extra seconds against an assumed local workload per round (see below). {_measured(vec)}", "",
             "| vector | length | plain s/round | SecAgg+ s/round | SecAgg+ extra s | " +
             " | ".join(f"extra / {a['local_s']:.0f} s local" for a in vec["assumptions"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(vec["assumptions"])]  # fmt: skip
    for r in vector_overheads(vec):
        ratios = [_fmt(None if v is None else 100 * v, 1) + " %" for v in r["overhead"].values()]
        lines.append(f"| {r['vector']} | {r['length']:,} | {_fmt(r['plain_s'])} | {_fmt(r['secure_s'])} | "
                     f"{_fmt(r['extra_s'])} | {' | '.join(ratios)} |")  # fmt: skip
    return lines + ["", "Assumed local workloads (assumptions, not measurements): " +
                    "; ".join(f"{a['local_s']:.0f} s = {a['what']}" for a in vec["assumptions"]) +
                    ". Overhead % = SecAgg+ extra / (local time + plain round time).", ""]  # fmt: skip


def md_scale(sc: dict) -> list[str]:
    lines = ["### 3. Scale: tiny model, report-only fusion, many simulated sites", "",
             f"{sc['cases_per_site']} cases per site, {sc['rounds']} rounds, 1 local epoch; seconds of each round "
             "(training + fit + evaluation of every site; the first also starts every site), the whole run (Ray "
             "start, final test) with the CPU seconds of its process tree (less sensitive to other jobs than wall "
             "time), and peak RSS of the process tree (simulation + Ray workers), sampled every 0.5 s. "
             f"{_measured(sc)}", "", "| sites | mode | round s (1st, ...) | run s | run CPU s | peak RSS (MB) | note |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sc["runs"]:
        note = (f"killed at the {r['cap_s']:.0f} s cap" + (" (rounds done by then)" if r.get("partial") else "")
                if r["timed_out"] else ("error: " + r["error"].strip().splitlines()[-1][:120] if "error" in r else ""))
        lines.append(f"| {r['sites']} | {'SecAgg+' if r['secure'] else 'plain'} | "
                     f"{', '.join(f'{s:.1f}' for s in r.get('round_s', [])) or '-'} | {r['wall_s']:.0f} | "
                     f"{_fmt(r.get('cpu_s'), 0)} | {r['peak_rss_mb']:.0f} | {note} |")  # fmt: skip
    for mode, fit in (sc.get("growth") or {}).items():
        lines += ["", f"Growth ({mode}, {fit['sites'][0]} to {fit['sites'][-1]} sites, {fit['site_ratio']:.0f}x the "
                  "sites; straight-line fit): " + "; ".join(
                      f"{label} {_fmt(fit[k]['per_site'], 3 if k != 'peak_rss_mb' else 1)} {unit} per site "
                      f"(x{_fmt(fit[k]['ratio'], 1)})" for k, label, unit in (
                          ("round_s", "later rounds", "s"), ("first_round_s", "first round", "s"),
                          ("cpu_s", "CPU time of the run", "s"), ("peak_rss_mb", "peak RSS", "MB")) if k in fit)]
    return lines + ["", "![scale](federation_scale.png)", ""]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Federation benchmarks on {env['cpu']} ({env['cores']} cores, shared), flwr {env.get('flwr')}, torch "
             f"{env.get('torch')}. Each section says when it was measured and under what load.", ""]  # fmt: skip
    if report.get("bytes"):
        lines += md_bytes(report["bytes"], report.get("secagg"))
    if report.get("secagg"):
        lines += md_secagg(report["secagg"])
    if report.get("vector"):
        lines += md_vector(report["vector"])
    if report.get("scale"):
        lines += md_scale(report["scale"])
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------------------


def plot(report: dict, out_dir: Path) -> list[Path]:
    """federation_bytes.png, federation_secagg.png, federation_scale.png from the merged report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    b = report.get("bytes")
    if b:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        names = ["full-model\nfine-tuning"] + [v["key"].replace("-", "\n") for v in b["variants"]]
        up_p = [b["full_bytes_float32"]] + [v["up_plain"] for v in b["variants"]]
        up_s = [None] + [v["up_secure"] for v in b["variants"]]
        down = [b["full_bytes_float32"]] + [v["down"] for v in b["variants"]]
        x = np.arange(len(names))
        ax.bar(x - 0.27, np.array(up_p) / 1e6, 0.27, label="up, plain (float32)")
        ax.bar(x[1:], np.array(up_s[1:]) / 1e6, 0.27, label="up, SecAgg+ (int64)")
        ax.bar(x + 0.27, np.array(down) / 1e6, 0.27, label="down (fit + evaluate)")
        ax.axhline(GOAL_UP_FRACTION * FULL_BYTES / 1e6, color="k", ls="--", lw=1, label="goal: up <= 0.5% of full")
        ax.set_yscale("log")
        ax.set_xticks(x, names, fontsize=7)
        ax.set_ylabel("MB per site per round")
        ax.set_title("MUSK-large: bytes per site per round")
        ax.legend(fontsize=7)
        save(fig, "federation_bytes.png")
    sec, vec = report.get("secagg"), report.get("vector")
    if sec or vec:
        fig, axes = plt.subplots(1, 2 if sec and vec else 1, figsize=(10 if sec and vec else 5.5, 4), squeeze=False)
        i = 0
        if sec:
            ax, rows = axes[0][i], secagg_overheads(sec)
            i += 1
            x = np.arange(len(rows))
            plain = [r["plain_s"] or 0 for r in rows]
            secure = [r["secure_s"] or 0 for r in rows]
            ax.bar(x - 0.2, plain, 0.4, label="plain")
            ax.bar(x + 0.2, secure, 0.4, label="SecAgg+")
            for xi, r in zip(x, rows):
                if r["overhead"] is not None:
                    ax.annotate(f"{100 * r['overhead']:+.0f}%", (xi + 0.2, r["secure_s"]), ha="center",
                                va="bottom", fontsize=8)  # fmt: skip
            ax.set_xticks(x, [f"{r['sites']} sites" for r in rows])
            ax.set_ylabel("median round s (rounds 2..)")
            ax.set_title("tiny model: round time, plain vs SecAgg+")
            ax.legend(fontsize=8)
        if vec:
            ax, rows = axes[0][i], vector_overheads(vec)
            x = np.arange(len(rows))
            ax.bar(x - 0.2, [r["plain_s"] or 0 for r in rows], 0.4, label="plain")
            ax.bar(x + 0.2, [r["secure_s"] or 0 for r in rows], 0.4, label="SecAgg+")
            ax.set_xticks(x, [f"{r['length']:,} values" for r in rows], fontsize=8)
            ax.set_ylabel("median fit round s")
            ax.set_title("protocol alone (3 sites), by vector length")
            ax.legend(fontsize=8)
        save(fig, "federation_secagg.png")
    sc = report.get("scale")
    if sc and sc.get("growth"):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for mode, fit in sc["growth"].items():
            xs = np.array(fit["sites"], float)
            line = np.linspace(0, xs.max(), 50)
            for key, label, marker in (("round_s", "later rounds", "o"), ("first_round_s", "first round", "s")):
                f = fit[key]
                pts = axes[0].plot(xs, f["values"], marker, label=f"{mode}, {label}: {f['per_site']:.3f} s/site")
                axes[0].plot(line, f["intercept"] + f["per_site"] * line, "-", color=pts[0].get_color(), lw=1)
            for ax, key, unit in ((axes[1], "cpu_s", "s"), (axes[2], "peak_rss_mb", "MB")):
                if key in fit:
                    f = fit[key]
                    pts = ax.plot(xs, f["values"], "o", label=f"{mode}: {f['per_site']:.2f} {unit}/site")
                    ax.plot(line, f["intercept"] + f["per_site"] * line, "-", color=pts[0].get_color(), lw=1)
        axes[0].set(xlabel="simulated sites", ylabel="round s", title="round time vs sites (tiny)")
        axes[1].set(xlabel="simulated sites", ylabel="CPU s", title="CPU time of the whole run (process tree)")
        axes[2].set(xlabel="simulated sites", ylabel="peak RSS, MB", title="peak memory vs sites (process tree)")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.set_xlim(left=0)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        save(fig, "federation_scale.png")
    return written


# -- main --------------------------------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) >= 2 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
        result = (child_fedmusk if kind == "fedmusk" else child_vector)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run: fewer sites, rounds and vectors")
    parser.add_argument("--sections", default="bytes,secagg,vector,scale")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the sections this run measures")
    parser.add_argument("--secagg-sites", type=ints, default=None, help="default 3,5,10 (quick: 3,5)")
    parser.add_argument("--scale-sites", type=ints, default=None, help="default 10,30,100 (quick: 10,30)")
    parser.add_argument("--scale-modes", default="plain", help="plain, or plain,secure (both modes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the SecAgg+ runs (default 6, quick 3)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved SecAgg+/plain pairs per setting")
    parser.add_argument("--vectors", default=None,
                        help="section 2b's lengths: tiny and VARIANTS keys (default tiny,fedit-language,fedit-both; "
                             "quick: tiny,fedit-both)")  # fmt: skip
    parser.add_argument("--cases", type=int, default=8, help="cases per site")
    parser.add_argument("--cap-s", type=float, default=None, help="time cap per simulation (default 600, quick 300)")
    parser.add_argument("--local-s", type=float, nargs="*", default=None,
                        help="assumed local training seconds per round for MUSK-large on a GPU")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    q = args.quick
    secagg_sites = args.secagg_sites or ([3, 5] if q else [3, 5, 10])
    scale_sites = args.scale_sites or ([10, 30] if q else [10, 30, 100])
    scale_modes = [m == "secure" for m in args.scale_modes.split(",")]
    rounds = args.rounds or (3 if q else 6)
    vectors = (args.vectors or ("tiny,fedit-both" if q else "tiny,fedit-language,fedit-both")).split(",")
    cap_s = args.cap_s or (300.0 if q else 600.0)
    sections = args.sections.split(",")

    import flwr
    import torch

    torch.set_num_threads(1)
    json_path = args.out_dir / "bench_federation.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {}  # sections merge across runs
    for key in ("quick", "rounds_note"):
        report.pop(key, None)  # fields of the format before each section carried its own settings
    report["environment"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                             "flwr": flwr.__version__}  # fmt: skip
    earlier = (lambda name: None) if args.fresh else report.get  # noqa: E731
    if "bytes" in sections or "vector" in sections:
        report["bytes"] = {**bench_bytes(), "measured": {"date": _now()}}
    with tempfile.TemporaryDirectory(prefix="fmb-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        need = max([*(secagg_sites if "secagg" in sections else []), *(scale_sites if "scale" in sections else []), 0])
        roots = []
        if need:
            from fedmusk.data.synth.cohort import synthesize_cohort

            roots = synthesize_cohort(tmp / "cohort", sites=need, cases_per_site=args.cases, seed=0, progress=False,
                                      images=False, pretrain_tiles=0, pretrain_reports=2)  # fmt: skip
        if "secagg" in sections:
            before = _load()
            runs = _merge(earlier("secagg"), bench_secagg(roots, secagg_sites, rounds, args.repeats, cap_s, tmp),
                          ("sites",))  # fmt: skip
            report["secagg"] = {"cases_per_site": args.cases, "rounds": rounds, "repeats": args.repeats, "runs": runs,
                                "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
        if "vector" in sections:
            before = _load()
            by_key = {v["key"]: v for v in report["bytes"]["variants"]}
            lengths = {("tiny demo adapter (report fusion)" if k == "tiny" else f"MUSK-large, {VARIANTS[k][0]}"):
                       (report["bytes"]["tiny"] if k == "tiny" else by_key[k])["secure_vector_len"] for k in vectors}
            local = args.local_s or [30.0, 120.0]
            runs = bench_vector(lengths, 3, rounds, args.repeats, cap_s, tmp)
            report["vector"] = {"sites": 3, "rounds": rounds, "repeats": args.repeats, "runs": runs,
                                "assumptions": [{"local_s": s, "what": _assumption_text(s)} for s in local],
                                "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
        if "scale" in sections:
            before = _load()
            runs = _merge(earlier("scale"), bench_scale(roots, scale_sites, scale_modes, 2, cap_s, tmp),
                          ("sites", "secure"))  # fmt: skip
            report["scale"] = {"cases_per_site": args.cases, "rounds": 2, "runs": runs,
                               "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
    if report.get("scale"):
        report["scale"]["growth"] = growth(report["scale"]["runs"])  # over every row kept, whichever run made it
    table = markdown(report)
    print(table)
    write_report(args.out_dir, "bench_federation", report, table, indent=1)
    for path in plot(report, args.out_dir):
        print(f"wrote {path}")
    return 0


def _merge(old: dict | None, new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Earlier runs of a section whose key this run did not measure, then this run's (sorted by the key)."""
    done = {tuple(r[k] for k in key) for r in new}
    kept = [r for r in (old or {}).get("runs", []) if tuple(r.get(k) for k in key) not in done]
    return sorted(kept + new, key=lambda r: (r["sites"], r["secure"]))


def _assumption_text(seconds: float) -> str:
    if seconds == 30.0:
        return ("one local epoch of 100 cases x a bag of 16 tiles (1,600 tiles) at ~100 tiles/s of MUSK-large LoRA "
                "training on one GPU (bf16, checkpointing), plus ~15 s of evaluation and loading")
    if seconds == 120.0:
        return "2 local epochs of 400 cases x 16 tiles at ~120 tiles/s, plus evaluation"
    return "user-given local training time per round"


if __name__ == "__main__":
    sys.exit(main())
