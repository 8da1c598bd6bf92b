"""Utility of federated training: test C-index (survival) or AUROC (response) of the federation against the pooled
(centralized) baseline and against each site alone, over several seeds.

Per seed: a synthetic non-IID cohort (``synthesize_cohort``, seeded; or the sites given with ``--site``, the same for
every seed), prepared once (``fedmusk prepare``: tiles and frozen-MUSK tile features cached in each site), then on
configs/demo.yaml (tiny MUSK, cached features, SecAgg+):

- centralized: ``run_train`` on every site's training cases pooled;
- federated: ``run_simulation_from_config`` with FedIT, FFA-LoRA, FedSA-LoRA and RoLoRA (each simulation in a child
  process with its own Ray, its process tree stopped afterwards);
- each site alone: ``run_train`` on one site, tested on its own test cases.

Every model is tested on the pooled test cases and on each site's test cases. Across seeds: mean and 95% t-interval,
and the per-seed differences (paired by seed: same cohort, same test cases). Goals: (1) each federated strategy
within 1% (relative) of centralized, (2) every site better in the federation than alone, (3) FFA-LoRA at least as
good as FedIT, (4) no site below its local model (federation >= alone on its own test cases).

Usage: python benchmarks/bench_utility.py [--seeds 0,1,2] [--site DIR ...] [--workdir DIR] [--quick]
Writes benchmarks/results/bench_utility.json, .md, .png and _sites.png (--quick: bench_utility_quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import cpu_name, write_report  # noqa: E402 - sibling module in benchmarks/

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "demo.yaml"
STRATEGIES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA", "rolora": "RoLoRA"}
# Defaults: the demo's training (configs/demo.yaml) except the pretraining round; --quick: a smoke run.
DEFAULTS = {"seeds": "0,1,2", "cases": "40,60,80", "test_share": 0.35, "val_share": 0.15, "slide_px": 768,
            "epochs": 10, "rounds": 5, "local_epochs": 2, "pretrain_rounds": 0}  # fmt: skip
QUICK = {"seeds": "0", "cases": "16,20,24", "test_share": 0.35, "val_share": 0.15, "slide_px": 512,
         "epochs": 2, "rounds": 2, "local_epochs": 1, "pretrain_rounds": 0}  # fmt: skip


# -- cohorts -----------------------------------------------------------------------------------------------------------


def synthetic_cohort(out: Path, seed: int, s: argparse.Namespace, tile_px: int) -> tuple[list[Path], bool]:
    """The seed's synthetic cohort under ``out`` (made once; reused while its parameters stay the same), with the
    splits redrawn to ``s.test_share`` / ``s.val_share`` when given. Returns the site roots and whether reused."""
    from fedmusk.data.synth.cohort import synthesize_cohort

    params = {"layout": 2, "seed": seed, "cases": s.cases, "slide_px": s.slide_px, "tile_px": tile_px, "task": s.task,
              "test_share": s.test_share, "val_share": s.val_share, "pretrain": s.pretrain_rounds > 0}  # fmt: skip
    marker = out / "bench_utility.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return sorted(p for p in out.iterdir() if (p / "manifest.csv").is_file()), True
    shutil.rmtree(out, ignore_errors=True)  # ours: a cohort of other parameters or one left half-written
    roots = synthesize_cohort(out, sites=len(s.cases), cases_per_site=tuple(s.cases), seed=seed, tile_px=tile_px,
                              progress=False, slide_px=s.slide_px, pretrain_tiles=32 if s.pretrain_rounds else 0,
                              pretrain_reports=20 if s.pretrain_rounds else 2)  # fmt: skip
    if s.test_share is not None:
        for k, root in enumerate(roots):
            redraw_splits(root, seed, k, s.test_share, s.val_share, "event" if s.task == "survival" else "response")
    marker.write_text(json.dumps(params))
    return roots, False


def redraw_splits(root: Path, seed: int, k: int, test_share: float, val_share: float, label: str) -> None:
    """Rewrite the split column of a synthetic site's manifest: per case, stratified by ``label`` (so that each
    site's test cases hold events), ``test_share`` test, ``val_share`` validation, the rest training."""
    import numpy as np

    path = root / "manifest.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cases = {r["case_id"]: r[label] for r in rows}  # one label per case
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 2718]))
    split: dict[str, str] = {}
    for value in sorted(set(cases.values())):
        ids = [c for c, v in cases.items() if v == value]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_test = max(1 if len(ids) >= 2 else 0, round(test_share * len(ids)))  # an event in every test set
        n_val = round(val_share * len(ids))
        for rank, cid in enumerate(ids):
            split[cid] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    for r in rows:
        r["split"] = split[r["case_id"]]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def cohort_facts(roots: list[Path], task: str) -> dict:
    """Per site: cases per split and events (or responders) among the test cases, from the manifests."""
    facts = {}
    for root in roots:
        with (root / "manifest.csv").open(newline="", encoding="utf-8") as f:
            cases = {r["case_id"]: r for r in csv.DictReader(f)}
        label = "event" if task == "survival" else "response"
        counts = {s: sum(r["split"] == s for r in cases.values()) for s in ("train", "val", "test")}
        positives = sum(r["split"] == "test" and r[label] == "1" for r in cases.values())
        facts[root.name] = {**counts, f"test_{label}s": positives}
    return facts


def site_profiles(cohort: Path) -> list[dict]:
    meta = json.loads((cohort / "cohort.json").read_text())
    keep = ("name", "scanner", "mpp", "stain", "case_mix", "follow_up", "report_style", "cases", "event_rate",
            "median_time_months", "response_rate", "stage_counts")  # fmt: skip
    return [{k: site.get(k) for k in keep} for site in meta["sites"]]


# -- runs --------------------------------------------------------------------------------------------------------------


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
    child = run_child(spec, tmp, cap_s)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"simulation failed ({child}); log: {tmp / 'child.log'}\n" +
                           (tmp / "child.log").read_text(errors="replace")[-2000:])  # fmt: skip
    summary = json.loads(summary_file.read_text())
    rounds = [{k: r.get(k) for k in ("round", "phase", "seconds", "bytes_up_per_client", "bytes_down", "replies")}
              for r in summary["rounds"]]  # fmt: skip
    return {"wall_s": child["wall_s"], "run_s": summary["seconds"], "rounds": rounds,
            "bytes_up_per_site_round": summary["bytes_up_per_client_round"],
            "bytes_down_per_round": summary["bytes_down_per_round"], "min_replies": min(r["replies"] for r in rounds),
            "leftover_processes": child["leftover_processes"],
            "pooled": metric_of(summary["test"]["pooled"], key),
            "per_site": {s: metric_of(m, key) for s, m in summary["test"]["per_site"].items()}}  # fmt: skip


def child_simulation(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from fedmusk.config import load_config
    from fedmusk.federation import run_simulation_from_config

    run_simulation_from_config(load_config([CONFIG], spec["overrides"]), spec["roots"], spec["out"])


def run_child(spec: dict, tmp: Path, cap_s: float) -> dict:
    """Run ``child_simulation`` in its own session; stop its whole process tree at ``cap_s`` and any process of the
    tree (Ray's) that outlives it. Returns wall seconds, the exit code and how many processes had to be stopped."""
    import psutil

    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": str(tmp / "ray"),
           "FLWR_HOME": str(tmp / "flwr"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    (tmp / "ray").mkdir(exist_ok=True)
    start = time.monotonic()
    with open(tmp / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)  # fmt: skip
        root, seen = psutil.Process(proc.pid), {}
        while proc.poll() is None:
            try:
                seen.update({p.pid: p for p in root.children(recursive=True)})
            except psutil.Error:
                pass
            if time.monotonic() - start > cap_s:
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(1.0)
        proc.wait()
    leftovers = [p for p in seen.values() if _alive(p)]
    for p in leftovers:  # Ray workers that outlived the simulation: stop them by PID
        try:
            p.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=5)
    for p in leftovers:
        if _alive(p):
            p.kill()
    return {"wall_s": time.monotonic() - start, "returncode": proc.returncode, "leftover_processes": len(leftovers)}


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


# -- statistics --------------------------------------------------------------------------------------------------------


def t_interval(values: list[float]) -> dict:
    """Mean, standard deviation and the 95% t-interval of the mean (None below two values)."""
    from scipy import stats

    vals = [v for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "sd": None, "ci": None, "n": 0, "values": values}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "sd": None, "ci": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "n": n, "values": values}


def summarize(runs: list[dict], seeds: list[int], sites: list[str], strategies: list[str]) -> dict:
    """Across seeds: pooled score per configuration, each site's score per configuration, paired differences."""

    def pick(config: str, seed: int, site: str | None = None, local_site: str | None = None):
        for r in runs:
            if r["config"] == config and r["seed"] == seed and r.get("site") == local_site:
                m = r["pooled"] if site is None else r["per_site"].get(site)
                return None if m is None else m["value"]
        return None

    configs = ["centralized", *strategies]
    pooled = {c: t_interval([pick(c, s) for s in seeds]) for c in configs}
    per_site = {site: {"alone": t_interval([pick("local", s, site, site) for s in seeds]),
                       **{c: t_interval([pick(c, s, site) for s in seeds]) for c in configs}}
                for site in sites}  # fmt: skip

    def diff(a: list, b: list) -> dict:
        return t_interval([None if x is None or y is None else x - y for x, y in zip(a, b)])

    vs_central = {c: diff(pooled[c]["values"], pooled["centralized"]["values"]) for c in strategies}
    vs_alone = {site: {c: diff(per_site[site][c]["values"], per_site[site]["alone"]["values"]) for c in configs}
                for site in sites}  # fmt: skip
    out = {"pooled": pooled, "per_site": per_site, "diff_vs_centralized": vs_central, "diff_vs_alone": vs_alone}
    if "ffa" in strategies and "fedit" in strategies:
        out["diff_ffa_vs_fedit"] = diff(pooled["ffa"]["values"], pooled["fedit"]["values"])
    return out


def goals(summary: dict, sites: list[str], strategies: list[str]) -> list[dict]:
    pooled, per_site = summary["pooled"], summary["per_site"]
    central = pooled["centralized"]["mean"]
    out = []
    for c in strategies:
        fed = pooled[c]["mean"]
        rel = None if fed is None or not central else (fed - central) / central
        out.append({"goal": 1, "what": f"{STRATEGIES[c]} within 1% of centralized (pooled test, mean over seeds)",
                    "met": rel is not None and rel >= -0.01,
                    "numbers": f"{_f(fed)} vs {_f(central)}: {_pct(rel)}; paired difference "
                               f"{_ci(summary['diff_vs_centralized'][c])}"})  # fmt: skip
    for c in strategies:
        rows = [(site, per_site[site][c]["mean"], per_site[site]["alone"]["mean"]) for site in sites]
        met = all(f is not None and a is not None and f > a for _, f, a in rows)
        out.append({"goal": 2, "what": f"every site better with {STRATEGIES[c]} than alone (own test cases)",
                    "met": met, "primary": c == "fedit",
                    "numbers": "; ".join(f"{s}: {_f(f)} vs {_f(a)}" for s, f, a in rows)})  # fmt: skip
    for c in strategies:
        rows = [(site, per_site[site][c]["mean"], per_site[site]["alone"]["mean"]) for site in sites]
        below = [s for s, f, a in rows if f is None or a is None or f < a]
        out.append({"goal": 4, "what": f"no site below its local model with {STRATEGIES[c]} (own test cases)",
                    "met": not below,
                    "numbers": "; ".join(f"{s}: {_f(f)} vs {_f(a)}" for s, f, a in rows)
                               + (f" (below: {', '.join(below)})" if below else "")})  # fmt: skip
    if "ffa" in strategies and "fedit" in strategies:
        ffa, fedit = pooled["ffa"]["mean"], pooled["fedit"]["mean"]
        out.append({"goal": 3, "what": "FFA-LoRA at least as good as FedIT (pooled test, mean over seeds)",
                    "met": ffa is not None and fedit is not None and ffa >= fedit,
                    "numbers": f"{_f(ffa)} vs {_f(fedit)}; paired difference "
                               f"{_ci(summary['diff_ffa_vs_fedit'])}"})  # fmt: skip
    return out


# -- report ------------------------------------------------------------------------------------------------------------


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _ci(t: dict, digits=3) -> str:
    if t["mean"] is None:
        return "-"
    return _f(t["mean"], digits) + (f" [{_f(t['ci'][0], digits)}, {_f(t['ci'][1], digits)}]" if t["ci"] else "")


def _run_cell(r: dict | None) -> str:
    if r is None or r["value"] is None:
        return "-"
    ci = r.get("ci")
    return _f(r["value"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "")


def markdown(report: dict) -> str:
    env, st, s = report["environment"], report["settings"], report["summary"]
    metric = "C-index" if st["task"] == "survival" else "AUROC"
    seeds, sites, strategies = st["seeds"], report["sites"], st["strategies"]
    configs = ["centralized", *strategies]
    label = {"centralized": "centralized (pooled)", **STRATEGIES}
    runs = report["runs"]

    def run(config, seed, local=None):
        return next((r for r in runs if r["config"] == config and r["seed"] == seed and r.get("site") == local), None)

    cohort = ("synthetic (`synthesize_cohort`, one cohort per seed, seeded like the run)" if report["synthetic"] else
              "user-given sites (the same for every seed; the seed changes the training only)")  # fmt: skip
    lines = [
        f"Test {metric} ({st['task']} task) of federated training against the pooled baseline and each site alone. "
        f"configs/demo.yaml (tiny MUSK, random weights, cached tile features, LoRA on the language expert, concat "
        f"fusion), overrides: `{' '.join(st['overrides'])}`. Cohort: {cohort}. Seeds {', '.join(map(str, seeds))}. "
        f"{env['cpu']} ({env['cores']} cores, shared), torch {env['torch']}, flwr {env['flwr']}, one torch thread; "
        f"load average before/after {env['load_before']} / {env['load_after']}. Whole run: "
        f"{report['wall_s'] / 60:.1f} min.", "",
        f"Centralized and local: {st['epochs']} epochs, the epoch with the best validation {metric} is tested. "
        f"Federated: SecAgg+, {st['pretrain_rounds']} pretraining rounds, {st['rounds']} outcome rounds x "
        f"{st['local_epochs']} local epochs ({st['rounds'] * st['local_epochs']} passes over each site's training "
        "cases, every site in every round), the final round's adapter is tested "
        "(FedSA-LoRA: each site with its own B and heads; its pooled number joins the sites' personal predictions).",
        "",
        f"### Pooled test {metric} (all sites' test cases)", "",
        f"Mean over seeds [95% t-interval, n = {len(seeds)}]; per seed: the run's value [95% bootstrap CI over the "
        f"test cases]. Difference: per seed against centralized (same test cases), mean [95% t-interval].", "",
        "| model | mean [95% t-CI] | " + " | ".join(f"seed {x}" for x in seeds) +
        " | diff vs centralized | run s (mean) | bytes up / site / round |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]  # fmt: skip
    for c in configs:
        cells = [_run_cell(run(c, x)["pooled"] if run(c, x) else None) for x in seeds]
        walls = [run(c, x)["wall_s"] for x in seeds if run(c, x)]
        up = [run(c, x).get("bytes_up_per_site_round") for x in seeds if run(c, x)]
        up = [u for u in up if u is not None]
        d = s["diff_vs_centralized"].get(c)
        lines.append(f"| {label[c]} | {_ci(s['pooled'][c])} | {' | '.join(cells)} | "
                     f"{_ci(d) if d else ''} | {_f(sum(walls) / len(walls), 0) if walls else '-'} | "
                     f"{f'{sum(up) / len(up):,.0f}' if up else ''} |")  # fmt: skip
    lines += ["", f"### Each site's own test cases ({metric}, mean over seeds [95% t-interval])", "",
              "| site | test cases / positives per seed | alone | " + " | ".join(label[c] for c in configs) +
              " | " + " | ".join(f"{label[c]} - alone" for c in configs) + " | alone run s |",
              "|---|---|---|" + "---|" * (2 * len(configs)) + "---|"]  # fmt: skip
    for site in sites:
        ps = s["per_site"][site]
        facts = [report["cohorts"][str(x)]["splits"].get(site, {}) for x in seeds]
        pos_key = "test_events" if st["task"] == "survival" else "test_responses"
        sizes = ", ".join(f"{f.get('test', '?')}/{f.get(pos_key, '?')}" for f in facts)
        walls = [run("local", x, site)["wall_s"] for x in seeds if run("local", x, site)]
        lines.append(f"| {site} | {sizes} | {_ci(ps['alone'])} | " + " | ".join(_ci(ps[c]) for c in configs) +
                     " | " + " | ".join(_ci(s["diff_vs_alone"][site][c]) for c in configs) +
                     f" | {_f(sum(walls) / len(walls), 0) if walls else '-'} |")  # fmt: skip
    lines += ["", "### Goals", "", "| goal | met | numbers (mean over seeds) |", "|---|---|---|"]
    for g in report["goals"]:
        lines.append(f"| ({g['goal']}) {g['what']} | {'met' if g['met'] else 'NOT met'} | {g['numbers']} |")
    lines += ["", "Goal (1) counts as met when the federated mean is at most 1% below the centralized mean (higher is "
              "fine); goal (2) when every site's mean is higher. Paired difference: per seed, mean [95% t-interval]. "
              "With test sets this small the seed-to-seed spread is several times 1%: an interval that holds 0 says "
              "the seeds cannot tell the two apart, whatever met / NOT met says. t-intervals are not clipped to "
              "[0, 1].", ""]  # fmt: skip
    if report["synthetic"]:
        lines += ["### The sites (non-IID)", "",
                  "| site | scanner, um/px | stain (H, E strength) | case mix (extent, grade, TIL shift) | follow-up "
                  "(accrual / study months, loss per year) | report style | events | median time (months) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in report["site_profiles"]:
            cm, fu, stn = p["case_mix"], p["follow_up"], p["stain"]
            lines.append(f"| {p['name']} | {p['scanner']}, {p['mpp']} | {stn['h_strength']}, {stn['e_strength']} | "
                         f"{cm['extent_shift']:+}, {cm['grade_shift']:+}, {cm['til_shift']:+} | "
                         f"{fu['accrual_months']} / {fu['study_months']}, {fu['dropout_per_year']} | "
                         f"{p['report_style']} | {_f(p['event_rate'], 2)} | {p['median_time_months']} |")  # fmt: skip
        split = (f"splits redrawn per site, stratified by the label: {st['test_share']} test, {st['val_share']} "
                 "validation, the rest training" if st["test_share"] is not None else
                 "synthesize_cohort's splits (70% training, 15% validation, 15% test)")  # fmt: skip
        lines += ["", f"Events: share of the site's cases (seed {seeds[0]}'s cohort; the profiles are the same for "
                  f"every seed, the cases are drawn anew). Cases per site {', '.join(map(str, st['cases']))}, "
                  f"slides {st['slide_px']} px across at 0.5 um/px; {split}.", ""]  # fmt: skip
    t = report["timing"]
    lines += ["### Time", "",
              f"Per seed (mean): cohort {_f(t['cohort_s'], 0)} s, prepare {_f(t['prepare_s'], 0)} s, centralized "
              f"{_f(t['centralized_s'], 0)} s, "
              + ", ".join(f"{STRATEGIES[c]} {_f(t[c + '_s'], 0)} s" for c in strategies)
              + f", all sites alone {_f(t['local_s'], 0)} s. Simulation seconds include Ray's start and the final "
              "test of every site. Each seed: " + ", ".join(
                  f"seed {x}: {v['wall_s'] / 60:.1f} min (1-min load average at its start {v['load_start']})"
                  for x, v in report["per_seed"].items()) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, s, sites = report["settings"], report["summary"], report["sites"]
    metric = "C-index" if st["task"] == "survival" else "AUROC"
    configs = ["centralized", *st["strategies"]]
    names = {"centralized": "centralized", **STRATEGIES}
    colours = {"centralized": "#444444", "fedit": "#1f77b4", "ffa": "#2ca02c", "fedsa": "#9467bd", "rolora": "#ff7f0e",
               "alone": "#d62728"}  # fmt: skip

    def point(ax, x, t, colour, dx=0.12):
        if t["mean"] is None:
            return
        err = None if t["ci"] is None else [[t["mean"] - t["ci"][0]], [t["ci"][1] - t["mean"]]]
        ax.errorbar([x], [t["mean"]], yerr=err, fmt="o", color=colour, capsize=4, ms=7)
        vals = [v for v in t["values"] if v is not None]
        ax.scatter([x + dx] * len(vals), vals, color=colour, alpha=0.45, s=14, marker="x")

    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = []
    for i, c in enumerate(configs):
        point(ax, i, s["pooled"][c], colours[c])
        labels.append(f"{names[c]}\n(all test cases)")
    for j, site in enumerate(sites):
        point(ax, len(configs) + j, s["per_site"][site]["alone"], colours["alone"])
        labels.append(f"{site} alone\n(own test cases)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"Test {metric}: mean over {len(st['seeds'])} seed(s), 95% t-interval; x = each seed")
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    groups = ["alone", *configs]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(groups)
    for j, site in enumerate(sites):
        for g, name in enumerate(groups):
            x = j + (g - (len(groups) - 1) / 2) * width
            point(ax, x, s["per_site"][site][name], colours[name], dx=0.35 * width)
    for name in groups:
        ax.plot([], [], "o", color=colours[name], label="alone" if name == "alone" else names[name])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylabel(f"test {metric} on the site's own test cases")
    ax.set_title(f"Each site: alone vs pooled vs federated (mean over {len(st['seeds'])} seed(s), 95% t-interval)")
    ax.legend(fontsize=8, ncol=len(groups), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}_sites.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return [p.name for p in paths]


# -- main --------------------------------------------------------------------------------------------------------------


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, small cohort, 2 rounds: checks that the script works")
    p.add_argument("--seeds", help=f"comma-separated (default {DEFAULTS['seeds']}, quick {QUICK['seeds']})")
    p.add_argument("--site", type=Path, action="append", default=[], help="a prepared or raw site root (repeat); "
                   "then no synthetic cohort")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench" / "utility",
                   help="cohorts, run outputs and the MLflow store")  # fmt: skip
    p.add_argument("--task", choices=["survival", "response"], default="survival")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--cases", help="synthetic cases per site, comma-separated (default 40,60,80 as the demo)")
    p.add_argument("--test-share", type=float, help="synthetic cohorts: share of each site's cases redrawn as test "
                   "cases (default 0.35; negative: keep synthesize_cohort's 70/15/15 split)")  # fmt: skip
    p.add_argument("--val-share", type=float)
    p.add_argument("--slide-px", type=int, help="synthetic slide side at 0.5 um/px (default 768; the demo: 1024)")
    p.add_argument("--epochs", type=int, help="centralized and local epochs (default 10 as the demo)")
    p.add_argument("--rounds", type=int, help="federated outcome rounds (default 5 as the demo)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2 as the demo)")
    p.add_argument("--pretrain-rounds", type=int, help="federated pretraining rounds (default 0; the demo runs 1)")
    p.add_argument("--override", action="append", default=[], help="a config override key=value (repeat)")
    p.add_argument("--cap-s", type=float, default=900.0, help="time cap per simulation")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x]
    args.cases = [int(x) for x in str(args.cases).split(",") if x]
    args.strategies = [x for x in args.strategies.split(",") if x]
    if args.test_share is not None and args.test_share < 0:
        args.test_share = None
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}")
    if args.site and len(args.site) < 2:
        p.error("a federation needs at least two --site folders")
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_simulation(json.loads(Path(sys.argv[2]).read_text()))
        return 0
    args = parse_args(argv)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
                       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})  # fmt: skip
    import flwr
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fedmusk.config import load_config
    from fedmusk.data.prepare.cli import run_prepare
    from fedmusk.tracking import Tracker

    torch.set_num_threads(1)  # the tiny model: one thread is fastest on a shared machine
    started, load_before = time.monotonic(), [round(v, 2) for v in os.getloadavg()]
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # One MLflow store for every run; creating the experiment here puts its artifacts under the workdir (an
    # experiment first created through a tracking.uri would put them under ./mlruns of the working directory).
    try:
        store = Tracker(work / "mlflow", announce=False)
    except Exception:  # a store left half-migrated by a killed run: it holds only earlier benchmark runs
        shutil.rmtree(work / "mlflow")
        store = Tracker(work / "mlflow", announce=False)
    store.finish()
    key = "c_index" if args.task == "survival" else "auc"
    user_sites = [p.resolve() for p in args.site]
    n_sites = len(user_sites) or len(args.cases)
    training = [f"train.task={args.task}", f"train.epochs={args.epochs}", f"federation.rounds={args.rounds}",
                f"federation.local_epochs={args.local_epochs}", f"federation.pretrain_rounds={args.pretrain_rounds}",
                f"federation.min_sites={n_sites}", f"federation.min_replies={n_sites}", *args.override]  # fmt: skip
    tile_px = load_config([CONFIG], training).data.tile_size
    console = Console(file=sys.stderr)  # bound now: train_run redirects sys.stderr while it runs
    steps_per_seed = 2 + len(args.strategies) + n_sites  # cohort + prepare, centralized, federations, alone
    runs: list[dict] = []
    cohorts: dict[str, dict] = {}
    timing: dict[str, list[float]] = {}
    per_seed: dict[str, dict] = {}
    profiles, site_names = [], [p.name for p in user_sites]
    log_path = work / "bench_utility.log"
    with tempfile.TemporaryDirectory(prefix="fmu-", dir="/tmp") as tmp_name, open(log_path, "w") as log, Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as bar:  # fmt: skip
        tmp = Path(tmp_name)  # short: Ray's socket paths must fit
        job = bar.add_task("starting", total=steps_per_seed * len(args.seeds))

        def step(seed: int, what: str) -> None:
            bar.update(job, description=f"seed {seed}: {what}")
            print(f"== seed {seed}: {what}", file=log, flush=True)

        def done(seconds: float, what: str, record: dict | None = None) -> None:
            bar.advance(job)
            line = f"{what}: {seconds:.0f} s"
            if record is not None:
                line += f", test {key} {_f(record['pooled']['value'])}" + (" (" + ", ".join(
                    f"{site} {_f(m['value'])}" for site, m in record["per_site"].items()) + ")"
                    if len(record["per_site"]) > 1 else "")  # fmt: skip
            bar.console.print(line)

        for seed in args.seeds:
            per_seed[str(seed)] = {"load_start": round(os.getloadavg()[0], 2), "started": time.monotonic()}
            cfg_overrides = [f"seed={seed}", f"tracking.uri={store.tracking_uri}", *training]
            cfg = load_config([CONFIG], cfg_overrides)
            out = work / f"seed-{seed}"
            step(seed, "synthetic cohort" if not user_sites else "sites")
            t0 = time.perf_counter()
            if user_sites:
                roots, reused = user_sites, True
            else:
                roots, reused = synthetic_cohort(out / "cohort", seed, args, tile_px)
                profiles = profiles or site_profiles(out / "cohort")
            site_names = [r.name for r in roots]
            timing.setdefault("cohort_s", []).append(time.perf_counter() - t0)
            step(seed, "prepare (tiles and frozen-MUSK features, every site)")
            t0 = time.perf_counter()
            for root in roots:
                if run_prepare(root, cfg, Console(file=log, width=120), check_slides=False) != 0:
                    raise RuntimeError(f"fedmusk prepare failed for {root}; see {log_path}")
            timing.setdefault("prepare_s", []).append(time.perf_counter() - t0)
            cohorts[str(seed)] = {"roots": [str(r) for r in roots], "reused": reused,
                                  "splits": cohort_facts(roots, args.task)}  # fmt: skip
            done(timing["cohort_s"][-1] + timing["prepare_s"][-1],
                 f"seed {seed}: {'sites' if user_sites else 'cohort (reused)' if reused else 'cohort'} and prepare")

            step(seed, "centralized (all sites pooled)")
            r = {"seed": seed, "config": "centralized", **train_run(cfg, roots, out / "centralized", key, log)}
            runs.append(r)
            timing.setdefault("centralized_s", []).append(r["wall_s"])
            done(r["wall_s"], f"seed {seed}: centralized", r)
            for strategy in args.strategies:
                step(seed, f"federation, {STRATEGIES[strategy]}, SecAgg+")
                ov = [*cfg_overrides, f"federation.strategy={strategy}", "federation.secure_aggregation=true",
                      *(["train.lora.ffa=true"] if strategy == "ffa" else [])]  # FFA: A frozen, B exchanged
                r = {"seed": seed, "config": strategy, **simulation_run(ov, roots, out / strategy, key, tmp,
                                                                          args.cap_s)}  # fmt: skip
                runs.append(r)
                timing.setdefault(f"{strategy}_s", []).append(r["wall_s"])
                done(r["wall_s"], f"seed {seed}: {STRATEGIES[strategy]}", r)
            local_s = 0.0
            for root in roots:
                step(seed, f"{root.name} alone")
                r = {"seed": seed, "config": "local", "site": root.name,
                     **train_run(cfg, [root], out / f"local-{root.name}", key, log)}  # fmt: skip
                runs.append(r)
                local_s += r["wall_s"]
                done(r["wall_s"], f"seed {seed}: {root.name} alone", r)
            timing.setdefault("local_s", []).append(local_s)
            per_seed[str(seed)]["wall_s"] = time.monotonic() - per_seed[str(seed)].pop("started")

    summary = summarize(runs, args.seeds, site_names, args.strategies)
    report = {
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "flwr": flwr.__version__, "threads": 1, "load_before": load_before,
                        "load_after": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"quick": args.quick, "task": args.task, "metric": key, "seeds": args.seeds,
                     "strategies": args.strategies, "cases": args.cases if not user_sites else None,
                     "test_share": args.test_share if not user_sites else None, "val_share": args.val_share,
                     "slide_px": args.slide_px, "epochs": args.epochs, "rounds": args.rounds,
                     "local_epochs": args.local_epochs, "pretrain_rounds": args.pretrain_rounds,
                     "config": "configs/demo.yaml", "overrides": training, "secure_aggregation": True},
        "synthetic": not user_sites,
        "sites": site_names,
        "site_profiles": profiles,
        "cohorts": cohorts,
        "workdir": str(work),
        "mlflow": store.tracking_uri,
        "wall_s": time.monotonic() - started,
        "timing": {k: sum(v) / len(v) for k, v in timing.items()},
        "per_seed": per_seed,
        "runs": runs,
        "summary": summary,
        "goals": goals(summary, site_names, args.strategies),
    }  # fmt: skip
    stem = "bench_utility_quick" if args.quick else "bench_utility"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, args.out_dir, stem)
    table = markdown(report)
    print(table)
    write_report(args.out_dir, stem, report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
