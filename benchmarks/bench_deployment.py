"""A deployed SecAgg+ round against the same round simulated, in one run on loopback.

The deployment is the real one: ``fedmusk server`` (SuperLink with TLS, node authentication and the public proxy)
and three ``fedmusk client`` daemons (a SuperNode and a long-lived site worker each), every one a separate process
tree, on 127.0.0.1. The simulation is ``fedmusk simulate`` over the same three site folders with the same
configuration. Both run ``--rounds`` SecAgg+ rounds of the tiny model (cached tile features, language-expert LoRA)
on three 8-case synthetic sites.

Reported: seconds per round in each (from each run's ``rounds.json``; the first round, which builds each site's
model and features, apart from the later ones), the deployed/simulated ratio of the later rounds, the site workers'
seconds per message (from their logs), and model builds per site (goal: one per run). Goal: a deployed round in at
most 20 s, i.e. Flower's 3 s polling floor plus compute, with no per-message rebuild.

Usage: python benchmarks/bench_deployment.py [--rounds 4]
Writes benchmarks/results/bench_deployment.json and bench_deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import cpu_name, write_report

from fedmusk.ops.supervise import free_port

RESULTS = Path(__file__).parent / "results"
SITES = ("site-1", "site-2", "site-3")
CONFIG = """\
data: {tile_size: 96, max_tiles_per_slide: 16}
model: {max_text_len: 64}
train: {epochs: 1, bootstrap: 20, lr: 0.002, lora: {experts: [B]}}
federation: {rounds: %d, pretrain_rounds: 0, local_epochs: 1, min_sites: 3, min_replies: 3,
             wait_for_sites_s: 240, reply_timeout_s: 300}
"""
GOAL_ROUND_S = 20.0
MESSAGE = re.compile(r"fedmusk-worker: (train|evaluate) message: completed in ([0-9.]+) s \(([^)]*)\)")
STEP = re.compile(r"(\w+) ([0-9.]+) s")


def fedmusk(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedmusk.cli", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def round_seconds(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in json.loads((out / "rounds.json").read_text())]


def deployed(root: Path, sites: list[Path], config: Path, env: dict[str, str], timeout_s: float) -> dict:
    from fedmusk.ops.certs import add_site, init_ca

    certs = root / "certs"
    init_ca(certs)
    for name in SITES:
        add_site(certs, name)
    port, out = free_port(), root / "deployed"
    server = fedmusk(
        ["server", str(config), "--certs", str(certs), "--state", str(root / "state"), "--out", str(out),
         "--port", str(port)], root / "server.log", env,
    )  # fmt: skip
    clients = []
    try:
        for name, site in zip(SITES, sites, strict=True):
            bundle = certs / "sites" / name
            clients.append(fedmusk(
                ["client", str(site), "--name", name, "--superlink", f"127.0.0.1:{port}", "--ca",
                 str(bundle / "ca.crt"), "--key", str(bundle / "site.key"), "--runtime-port", str(free_port()),
                 "--quick"], root / f"{name}.log", env,
            ))  # fmt: skip
        code = server.wait(timeout_s)
    finally:
        for proc in [server, *clients]:
            stop(proc)
    if code != 0:
        raise RuntimeError(f"the deployed federation failed (exit {code}):\n{(root / 'server.log').read_text()[-3000:]}")
    per_message: dict[str, list[float]] = {"train": [], "evaluate": []}
    steps: dict[str, dict[str, list[float]]] = {"train": {}, "evaluate": {}}
    builds = {}
    for name in SITES:
        text = (root / f"{name}.log").read_text(errors="replace")
        for kind, seconds, laps in MESSAGE.findall(text):
            per_message[kind].append(float(seconds))
            for step, step_s in STEP.findall(laps):
                steps[kind].setdefault(step, []).append(float(step_s))
        builds[name] = text.count("outcome model built")
    return {"rounds_s": round_seconds(out), "per_message_s": per_message, "steps_s": steps, "model_builds": builds}


def simulated(root: Path, sites: list[Path], config: Path, env: dict[str, str], timeout_s: float) -> dict:
    out = root / "simulated"
    site_args = [arg for site in sites for arg in ("--site", str(site))]
    proc = fedmusk(["simulate", str(config), *site_args, "--out", str(out)], root / "sim.log", env)
    try:
        code = proc.wait(timeout_s)
    finally:
        stop(proc)
    if code != 0:
        raise RuntimeError(f"the simulation failed (exit {code}):\n{(root / 'sim.log').read_text()[-3000:]}")
    return {"rounds_s": round_seconds(out)}


def summary(values: list[float]) -> dict:
    return {"first": values[0], "later_median": statistics.median(values[1:]) if len(values) > 1 else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds each federation may take")
    args = parser.parse_args(argv)

    from fedmusk.data.synth.cohort import synthesize_cohort

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
        sites = synthesize_cohort(
            root / "hospitals", sites=3, cases_per_site=8, tile_px=96, slide_px=256, pretrain_tiles=2,
            pretrain_reports=2, progress=False, workers=1,
        )  # fmt: skip
        config = root / "federation.yaml"
        config.write_text(CONFIG % args.rounds)
        started = time.monotonic()
        sim = simulated(root, sites, config, env, args.timeout)
        dep = deployed(root, sites, config, env, args.timeout)
        wall = time.monotonic() - started
    d, s = summary(dep["rounds_s"]), summary(sim["rounds_s"])
    ratio = d["later_median"] / s["later_median"] if d["later_median"] and s["later_median"] else None
    report = {
        "machine": cpu_name(), "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "rounds": args.rounds, "deployed": dep, "simulated": sim, "deployed_round_s": d, "simulated_round_s": s,
        "ratio_later_rounds": ratio, "goal_round_s": GOAL_ROUND_S,
        "goal_met": d["later_median"] is not None and d["later_median"] <= GOAL_ROUND_S,
        "builds_goal_met": all(n == 1 for n in dep["model_builds"].values()), "wall_s": wall,
    }  # fmt: skip
    med = {k: f"{statistics.median(v):.2f} s" if v else "n/a" for k, v in dep["per_message_s"].items()}
    steps = {
        kind: ", ".join(f"{step} {statistics.median(v):.2f} s" for step, v in per_step.items())
        for kind, per_step in dep["steps_s"].items()
    }  # fmt: skip
    table = "\n".join([
        "| | first round (s) | later rounds, median (s) |", "|---|---|---|",
        f"| deployed (TLS, proxy, 3 daemons) | {d['first']:.1f} | {d['later_median']:.1f} |",
        f"| simulated | {s['first']:.1f} | {s['later_median']:.1f} |",
        "",
        f"Deployed / simulated, later rounds: {ratio:.2f}x. Goal: a deployed round in at most {GOAL_ROUND_S:g} s: "
        f"{'met' if report['goal_met'] else 'NOT met'} ({d['later_median']:.1f} s).",
        f"Site worker seconds per message (median): train {med['train']} ({steps['train']}), "
        f"evaluate {med['evaluate']} ({steps['evaluate']}); "
        f"model builds per site: {dep['model_builds']} "
        f"({'one per run: met' if report['builds_goal_met'] else 'NOT one per run'}).",
        f"Load average {load_before[0]:.1f} before, {report['load_after'][0]:.1f} after; {wall / 60:.1f} min in all.",
    ]) + "\n"  # fmt: skip
    print(table)
    write_report(RESULTS, "bench_deployment", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
