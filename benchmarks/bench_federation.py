"""Federation costs: bytes a site sends per round, SecAgg+'s time overhead, and how simulation scales with sites.

1. bytes: the exchanged adapter of MUSK-large (built on the meta device, LoRA applied by fedmusk's own apply_lora,
   counted from the very tensors ``adapter_state`` would send) against the full model's 675,188,737 float32
   parameters, for the default LoRA (rank 8, q/k/v/out, both experts), language-only (configs/demo.yaml) and FFA
   (B only), each with the outcome heads of configs/musk-large.yaml; plus the payload bytes measured in the tiny
   simulations of section 2 (plain and SecAgg+).
2. secagg: tiny-model federations (report-only fusion on a labels-and-reports synthetic cohort) at 3, 5 and 10
   sites, SecAgg+ and plain interleaved, median round seconds after round 1; and Flower's SecAgg+ on its own: a
   minimal Flower simulation (3 sites, NumPyClient returning a fixed random vector) with the vector as long as the
   tiny adapter and as long as the MUSK-large adapter, secure vs plain, so the protocol's cost at MUSK-large's size
   is measured without training MUSK-large.
3. scale: plain (and SecAgg+, under a time cap) federations of 10, 30 and 100 tiny sites, 2 rounds: seconds per
   round, whole run, and peak resident memory of the process tree (the simulation and every Ray process).

Every simulation runs in a child process of this script (its own Ray), sampled for RSS with psutil and killed
with its whole process tree at the time cap; every child process is checked to be gone afterwards.

Usage: python benchmarks/bench_federation.py [--quick] [--sections bytes,secagg,vector,scale]
Results merge into benchmarks/results/bench_federation.json (per section) and bench_federation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _report import cpu_name, write_report  # noqa: E402 - sibling module in benchmarks/

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FULL_PARAMS = 675_188_737
FULL_BYTES = FULL_PARAMS * 4

# Tiny federations: report-only fusion needs no slides, so a labels-and-reports cohort (images=False) is a valid site.
TINY_OVERRIDES = [
    "train.fusion=report", "train.bootstrap=0", "federation.local_epochs=1", "federation.min_replies=2",
    "federation.pretrain_rounds=0",  # outcome rounds only (configs/demo.yaml starts with a pretraining round)
    "federation.wait_for_sites_s=600", "federation.reply_timeout_s=1200",
]  # fmt: skip


# -- 1. bytes ----------------------------------------------------------------------------------------------------------


def adapter_counts(overrides: list[str]) -> dict:
    """Exchanged tensors of MUSK-large with the outcome heads, built on the meta device (no weights)."""
    import torch

    from fedmusk.config import load_config
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.musk_model.lora import _exchanged
    from fedmusk.training.outcome import OutcomeTrainer

    cfg = load_config([REPO / "configs" / "demo.yaml"], ["model.preset=large", "model.ms_aug=true", *overrides])
    with torch.device("meta"):
        base = MuskModel(MuskConfig.large())
    assert sum(p.numel() for p in base.parameters()) == FULL_PARAMS
    trainer = OutcomeTrainer(cfg, base, None, None, "meta")
    sent = _exchanged(trainer.model, trainable_only=True)  # exactly the tensors adapter_state() would copy
    lora = sum(t.numel() for n, t in sent.items() if ".lora_" in n)
    heads = sum(t.numel() for n, t in sent.items() if ".lora_" not in n)
    n = lora + heads
    return {"tensors": len(sent), "lora_params": lora, "head_params": heads, "params": n, "bytes_float32": 4 * n,
            "secure_vector_len": n + 1,  # SecAgg+: [w * delta, w]
            "fraction_of_full": 4 * n / FULL_BYTES}  # fmt: skip


def bench_bytes() -> dict:
    variants = {
        "fedit, LoRA r8 q/k/v/out, both experts (default)": ["train.lora.experts=[A,B]"],
        "fedit, language expert only (configs/demo.yaml)": ["train.lora.experts=[B]"],
        "ffa (B only), both experts": ["train.lora.experts=[A,B]", "train.lora.ffa=true"],
        "ffa (B only), language expert only": ["train.lora.experts=[B]", "train.lora.ffa=true"],
    }
    rows = []
    for name, ov in variants.items():
        r = {"variant": name, **adapter_counts(ov)}
        print(f"bytes: {name}: {r['params']:,} params, {r['bytes_float32'] / 1e6:.2f} MB, "
              f"{100 * r['fraction_of_full']:.3f}% of full", flush=True)  # fmt: skip
        rows.append(r)
    return {"full_params": FULL_PARAMS, "full_bytes_float32": FULL_BYTES, "variants": rows,
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
        "bytes_up_per_client_round": summary["bytes_up_per_client_round"]}  # fmt: skip


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
    """Run one simulation in a child process (own session) and sample the RSS of its whole process tree; kill the
    tree at ``cap_s``. Returns the child's result plus wall seconds, peak RSS and whether it timed out."""
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
    peak, timed_out = 0, False
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
    out = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "timed_out": timed_out, "cap_s": cap_s,
           "returncode": proc.returncode, "leftover_processes": len(leftovers), "processes_seen": len(seen)}  # fmt: skip
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
                      f"{' TIMED OUT' if r['timed_out'] else ''}{' ERROR' if 'error' in r else ''}", flush=True)  # fmt: skip
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
                      f"round {_fmt(r['median_round_s'])} s, peak {r['peak_rss_mb']:.0f} MB"
                      f"{' TIMED OUT' if r['timed_out'] else ''}{' ERROR' if 'error' in r else ''}", flush=True)  # fmt: skip
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
                  f" s, run {r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
                  f"{' TIMED OUT' if r['timed_out'] else ''}{' ERROR' if 'error' in r else ''}", flush=True)  # fmt: skip
            rows.append(r)
    return rows


# -- report ------------------------------------------------------------------------------------------------------------


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pair_medians(rows, key_fields) -> dict:
    """(key..., secure) -> median of median_round_s over repeats."""
    groups: dict = {}
    for r in rows:
        if r.get("median_round_s") is not None:
            groups.setdefault(tuple(r[k] for k in key_fields) + (r["secure"],), []).append(r["median_round_s"])
    return {k: statistics.median(v) for k, v in groups.items()}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Federation benchmarks on {env['cpu']} ({env['cores']} cores, shared; load average before/after "
             f"{env.get('load_before')} / {env.get('load_after')}), flwr {env.get('flwr')}, torch {env.get('torch')}, "
             "sections may come from separate runs (see each section's settings in the JSON).", ""]  # fmt: skip
    b = report.get("bytes")
    if b:
        lines += ["### 1. Bytes up per site per round (MUSK-large)", "",
                  f"Full model: {b['full_params']:,} parameters = {b['full_bytes_float32'] / 1e6:,.1f} MB. "
                  f"Heads: {b['heads_config']}. Goal: <= 0.5% of the full model.", "",
                  "| variant | LoRA params | head params | float32 bytes up (MB) | % of full | goal | SecAgg+ masked "
                  "vector (MB, int64) | % of full | goal |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for v in b["variants"]:
            ok = "met" if v["fraction_of_full"] <= 0.005 else "NOT met"
            secure = 8 * v["secure_vector_len"]  # Flower's SecAgg+ masks with int64: 8 bytes per value
            ok_s = "met" if secure <= 0.005 * FULL_BYTES else "NOT met"
            lines.append(f"| {v['variant']} | {v['lora_params']:,} | {v['head_params']:,} | "
                         f"{v['bytes_float32'] / 1e6:.2f} | {100 * v['fraction_of_full']:.3f} | {ok} | "
                         f"{secure / 1e6:.2f} | {100 * secure / FULL_BYTES:.3f} | {ok_s} |")  # fmt: skip
        lines += ["", "Plain aggregation sends the float32 update; under SecAgg+ (fedmusk's default) Flower sends the "
                  "masked, quantised vector as int64 (8 bytes per value, plus one value for the weight and a few "
                  "kB of keys and shares): the SecAgg+ column is that size, computed; section 2a's measured tiny "
                  "payloads (SecAgg+ about 2x plain) confirm the factor. The heads (ms_aug: 2048-wide tile "
                  "features into 128-wide MIL attention and 64-wide projections) are 721,925 of the values.", ""]
    sec = report.get("secagg")
    if sec:
        lines += ["### 2a. SecAgg+ vs plain, tiny model (report-only fusion, labels-and-reports cohort)", "",
                  f"{sec['cases_per_site']} cases per site, {sec['rounds']} rounds, 1 local epoch; median round "
                  "seconds over rounds 2.. (training + SecAgg+ or plain fit + evaluation), median over repeats; "
                  "runs interleaved. Measured payload: bytes up per site per round (fedmusk's meter).", "",
                  "| sites | plain s/round | SecAgg+ s/round | overhead s | overhead % | bytes up/site plain | "
                  "bytes up/site SecAgg+ | run s plain / SecAgg+ |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        med = _pair_medians(sec["runs"], ["sites"])
        for n in sorted({r["sites"] for r in sec["runs"]}):
            p, s = med.get((n, False)), med.get((n, True))
            bp = [r["bytes_up_per_client_round"] for r in sec["runs"] if r["sites"] == n and not r["secure"]
                  and "bytes_up_per_client_round" in r]  # fmt: skip
            bs = [r["bytes_up_per_client_round"] for r in sec["runs"] if r["sites"] == n and r["secure"]
                  and "bytes_up_per_client_round" in r]  # fmt: skip
            wp = [r["wall_s"] for r in sec["runs"] if r["sites"] == n and not r["secure"]]
            ws = [r["wall_s"] for r in sec["runs"] if r["sites"] == n and r["secure"]]
            over = None if p is None or s is None else s - p
            pct = None if over is None else 100 * over / p
            lines.append(f"| {n} | {_fmt(p)} | {_fmt(s)} | {_fmt(over)} | {_fmt(pct, 0)} | "
                         f"{_fmt(bp[0] if bp else None, 0)} | {_fmt(bs[0] if bs else None, 0)} | "
                         f"{_fmt(statistics.median(wp) if wp else None, 0)} / "
                         f"{_fmt(statistics.median(ws) if ws else None, 0)} |")  # fmt: skip
        lines.append("")
    vec = report.get("vector")
    if vec:
        lines += ["### 2b. SecAgg+ protocol cost by vector length (minimal Flower simulation, no training)", "",
                  f"{vec['sites']} sites, NumPyClient returning a fixed float32 vector, {vec['rounds']} rounds, fit "
                  "only; median fit-round seconds over rounds 2.., median over repeats. Ratio: SecAgg+'s extra "
                  "seconds against an assumed local workload per round (see below).", "",
                  "| vector | length | plain s/round | SecAgg+ s/round | SecAgg+ extra s | " +
                  " | ".join(f"extra / {a['local_s']:.0f} s local" for a in vec["assumptions"]) + " |",
                  "|---|---|---|---|---|" + "---|" * len(vec["assumptions"])]  # fmt: skip
        med = _pair_medians(vec["runs"], ["vector"])
        for name in dict.fromkeys(r["vector"] for r in vec["runs"]):
            p, s = med.get((name, False)), med.get((name, True))
            length = next(r["length"] for r in vec["runs"] if r["vector"] == name)
            extra = None if p is None or s is None else s - p
            ratios = [_fmt(None if extra is None else 100 * extra / (a["local_s"] + (p or 0)), 1) + " %"
                      for a in vec["assumptions"]]  # fmt: skip
            lines.append(f"| {name} | {length:,} | {_fmt(p)} | {_fmt(s)} | {_fmt(extra)} | {' | '.join(ratios)} |")
        lines += ["", "Assumed local workloads (assumptions, not measurements): " +
                  "; ".join(f"{a['local_s']:.0f} s = {a['what']}" for a in vec["assumptions"]) +
                  ". Overhead % = SecAgg+ extra / (local time + plain round time).", ""]  # fmt: skip
    sc = report.get("scale")
    if sc:
        lines += ["### 3. Scale: tiny model, report-only fusion, many simulated sites", "",
                  f"{sc['cases_per_site']} cases per site, {sc['rounds']} rounds, 1 local epoch; round seconds "
                  "(training + fit + evaluation of every site), the whole run (Ray start, sites' start-up, final "
                  "test), and peak RSS of the process tree (simulation + Ray workers), sampled every 0.5 s.", "",
                  "| sites | mode | round s | run s | peak RSS (MB) | note |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in sc["runs"]:
            note = (f"killed at the {r['cap_s']:.0f} s cap" + (" (rounds done by then)" if r.get("partial") else "")
                    if r["timed_out"] else
                    ("error: " + r["error"].strip().splitlines()[-1][:120] if "error" in r else ""))  # fmt: skip
            lines.append(f"| {r['sites']} | {'SecAgg+' if r['secure'] else 'plain'} | "
                         f"{', '.join(f'{s:.1f}' for s in r.get('round_s', [])) or '-'} | {r['wall_s']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {note} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)




def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) >= 2 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
        result = (child_fedmusk if kind == "fedmusk" else child_vector)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run: fewer sites, rounds and repeats")
    parser.add_argument("--sections", default="bytes,secagg,vector,scale")
    parser.add_argument("--secagg-sites", type=ints, default=None, help="default 3,5,10 (quick: 3,5)")
    parser.add_argument("--scale-sites", type=ints, default=None, help="default 10,30,100 (quick: 10,30)")
    parser.add_argument("--scale-modes", default=None, help="plain,secure (quick: plain)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the SecAgg+ runs (default 4, quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="secure/plain pairs (default 2, quick 1)")
    parser.add_argument("--cases", type=int, default=8, help="cases per site")
    parser.add_argument("--cap-s", type=float, default=None, help="time cap per simulation (default 900, quick 300)")
    parser.add_argument("--local-s", type=float, nargs="*", default=None,
                        help="assumed local training seconds per round for MUSK-large on a GPU")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    q = args.quick
    secagg_sites = args.secagg_sites or ([3, 5] if q else [3, 5, 10])
    scale_sites = args.scale_sites or ([10, 30] if q else [10, 30, 100])
    scale_modes = [m == "secure" for m in (args.scale_modes or ("plain" if q else "plain,secure")).split(",")]
    rounds = args.rounds or (3 if q else 4)
    repeats = args.repeats or (1 if q else 2)
    cap_s = args.cap_s or (300.0 if q else 900.0)
    sections = args.sections.split(",")

    import flwr
    import torch

    torch.set_num_threads(1)
    json_path = args.out_dir / "bench_federation.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {}  # sections merge across runs
    report["environment"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                             "flwr": flwr.__version__, "load_before": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    if "bytes" in sections or "vector" in sections:
        report["bytes"] = bench_bytes()
    with tempfile.TemporaryDirectory(prefix="fmb-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        need = max([*(secagg_sites if "secagg" in sections else []), *(scale_sites if "scale" in sections else []), 0])
        roots = []
        if need:
            from fedmusk.data.synth import synthesize_cohort

            roots = synthesize_cohort(tmp / "cohort", sites=need, cases_per_site=args.cases, seed=0, progress=False,
                                      images=False, pretrain_tiles=0, pretrain_reports=2)  # fmt: skip
        if "secagg" in sections:
            runs = bench_secagg(roots, secagg_sites, rounds, repeats, cap_s, tmp)
            runs = _merge(report.get("secagg"), runs, ("sites",))
            report["secagg"] = {"cases_per_site": args.cases, "rounds": rounds, "repeats": repeats, "quick": q,
                                "runs": runs}  # fmt: skip
        if "vector" in sections:
            variants = report["bytes"]["variants"]
            from fedmusk.config import load_config

            tiny_len = tiny_adapter_len(load_config([REPO / "configs" / "demo.yaml"], TINY_OVERRIDES))
            lengths = {"tiny demo adapter (report fusion)": tiny_len + 1,
                       "MUSK-large, language only": variants[1]["secure_vector_len"],
                       "MUSK-large, both experts (default)": variants[0]["secure_vector_len"]}  # fmt: skip
            if q:
                lengths.pop("MUSK-large, language only")
            local = args.local_s or [30.0, 120.0]
            assumptions = [{"local_s": s, "what": _assumption_text(s)} for s in local]
            runs = bench_vector(lengths, 3, rounds, repeats, cap_s, tmp)
            report["vector"] = {"sites": 3, "rounds": rounds, "repeats": repeats, "quick": q, "runs": runs,
                                "assumptions": assumptions}  # fmt: skip
        if "scale" in sections:
            runs = bench_scale(roots, scale_sites, scale_modes, 2, cap_s, tmp)
            runs = _merge(report.get("scale"), runs, ("sites", "secure"))
            report["scale"] = {"cases_per_site": args.cases, "rounds": 2, "quick": q, "runs": runs}
    report["environment"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
    table = markdown(report)
    print(table)
    write_report(args.out_dir, "bench_federation", report, table, indent=1)
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


def tiny_adapter_len(cfg) -> int:
    """Exchanged values of the tiny demo model (built for real on the CPU, counted from adapter_state)."""
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.training.outcome import OutcomeTrainer

    trainer = OutcomeTrainer(cfg, MuskModel(MuskConfig.tiny()), None, None, "cpu")
    return sum(t.numel() for t in trainer.adapter_state().values())


if __name__ == "__main__":
    sys.exit(main())
