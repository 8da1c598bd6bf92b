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

The cohorts are made in ``_utility_cohort.py``, the runs in ``_utility_arms.py``, the statistics and goals in
``_utility_summary.py``, the tables and plots in ``_utility_tables.py``; this script runs the study.

Usage: python benchmarks/bench_utility.py [--seeds 0,1,2] [--site DIR ...] [--workdir DIR] [--quick]
Writes benchmarks/results/bench_utility.json, .md, .png and _sites.png (--quick: bench_utility_quick.*).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _child import child_main  # noqa: E402 - sibling modules in benchmarks/
from _report import cpu_name, write_report
from _utility_arms import CONFIG, child_simulation, simulation_run, train_run
from _utility_cohort import cohort_facts, site_profiles, synthetic_cohort
from _utility_summary import STRATEGIES, fmt, goals, summarize
from _utility_tables import markdown, plots

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Defaults: the demo's training (configs/demo.yaml) except the pretraining round; --quick: a smoke run.
DEFAULTS = {"seeds": "0,1,2", "cases": "40,60,80", "test_share": 0.35, "val_share": 0.15, "slide_px": 768,
            "epochs": 10, "rounds": 5, "local_epochs": 2, "pretrain_rounds": 0}  # fmt: skip
QUICK = {"seeds": "0", "cases": "16,20,24", "test_share": 0.35, "val_share": 0.15, "slide_px": 512,
         "epochs": 2, "rounds": 2, "local_epochs": 1, "pretrain_rounds": 0}  # fmt: skip


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
    if argv is None and len(sys.argv) >= 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:], {"simulation": child_simulation})
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
                line += f", test {key} {fmt(record['pooled']['value'])}" + (" (" + ", ".join(
                    f"{site} {fmt(m['value'])}" for site, m in record["per_site"].items()) + ")"
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
