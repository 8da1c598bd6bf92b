"""CPU training throughput of the outcome model at the tiny configuration, in both feature modes.

- cached: tile features of the frozen base MUSK come from ``fedmusk prepare``'s cache; a step runs the report text
  through MUSK (LoRA), the gated-attention MIL over the cached tile features, fusion and the survival head.
- end2end (``train.features=end2end``): a step reads a bag of tiles per slide from the slide files and runs them
  through MUSK's vision expert with LoRA (activation checkpointing on), as well as the report text.

On a small synthetic cohort (2 sites, SVS and DICOM WSI) with configs/demo.yaml (tiny MUSK, 96 px tiles, bag of
``train.bag_size`` tiles per slide, ``train.batch_cases`` cases per step). The one-off preparation (tiling and, for
cached mode, embedding every tile; each mode starts from an empty cache) is timed separately; then one untimed
warm-up epoch, then at least ``--epochs`` timed epochs over the training cases, more until ``--min-seconds`` passed.
Throughput counts what an epoch consumes: cases, their slides, and the tiles drawn from them (min(bag_size, tiles on
the slide) per slide).

Usage: python benchmarks/bench_train.py [--cases 12] [--epochs 3] [--threads 1]
Writes benchmarks/results/bench_train.json and bench_train.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import cpu_name, write_report  # noqa: E402 - sibling module in benchmarks/

from fedmusk.config import load_config
from fedmusk.data.prepare.pipeline import cache_dir, read_cache
from fedmusk.data.synth.cohort import synthesize_cohort
from fedmusk.training.session import TrainingSession

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODES = {
    "cached": ["train.features=cached"],
    # the vision expert needs LoRA when tiles go through MUSK (demo.yaml adapts the language expert only)
    "end2end": ["train.features=end2end", "train.lora.experts=[A,B]"],
}


def epoch_load(session: TrainingSession) -> dict:
    """Cases, slides and tiles one training epoch consumes."""
    cases = session.trainer.usable_cases(session.splits["train"])
    bag = session.cfg.train.bag_size
    tiles = sum(min(bag, read_cache(c.site_root, s).coords.shape[0]) for c in cases for s in c.slides)
    return {"cases": len(cases), "slides": sum(len(c.slides) for c in cases), "tiles": tiles}


def bench_mode(mode: str, roots: list[Path], min_epochs: int, min_seconds: float, base_overrides: list[str]) -> dict:
    cfg = load_config([REPO / "configs" / "demo.yaml"], [*base_overrides, *MODES[mode]])
    for root in roots:  # each mode prepares from nothing
        shutil.rmtree(cache_dir(root), ignore_errors=True)
    start = time.perf_counter()
    session = TrainingSession(cfg, roots, device="cpu")
    setup_s = time.perf_counter() - start
    load = epoch_load(session)
    session.train(1)  # warm-up: fills the feature cache in memory, first allocations
    epochs, start = 0, time.perf_counter()
    while epochs < min_epochs or time.perf_counter() - start < min_seconds:
        session.train(1)
        epochs += 1
    seconds = time.perf_counter() - start
    per_s = {k: v * epochs / seconds for k, v in load.items()}
    print(f"{mode}: {per_s['cases']:.2f} cases/s, {per_s['slides']:.2f} slides/s, {per_s['tiles']:.1f} tiles/s "
          f"(setup {setup_s:.1f} s)", flush=True)  # fmt: skip
    return {"mode": mode, "setup_s": setup_s, "epochs": epochs, "seconds": seconds, "per_epoch": load,
            "per_s": per_s, "bag_size": cfg.train.bag_size, "batch_cases": cfg.train.batch_cases,
            "tile_size": cfg.data.tile_size}  # fmt: skip


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Outcome training on CPU, tiny MUSK (configs/demo.yaml), {env['threads']} torch thread(s), torch "
        f"{env['torch']}, {env['cpu']} ({env['cores']} cores); load average before/after {env['load_before']} / "
        f"{env['load_after']} (shared machine). Cohort: {report['cohort']['sites']} synthetic sites x "
        f"{report['cohort']['cases_per_site']} cases, slides of ~{report['cohort']['slide_px']} px at 0.5 um/px.",
        "",
        "| mode | setup s (prepare) | train cases / slides / tiles per epoch | bag | timed epochs | cases/s | slides/s "
        "| tiles/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        e, p = r["per_epoch"], r["per_s"]
        lines.append(f"| {r['mode']} | {r['setup_s']:.1f} | {e['cases']} / {e['slides']} / {e['tiles']} "
                     f"| {r['bag_size']} | {r['epochs']} | {p['cases']:.2f} | {p['slides']:.2f} "
                     f"| {p['tiles']:.1f} |")  # fmt: skip
    lines += ["", "Setup: TrainingSession start-up, including `fedmusk prepare`'s work (tiling; for cached mode also "
              "embedding every tile with the frozen model). Rates: timed epochs after one warm-up epoch.", ""]
    return "\n".join(lines)




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--cases", type=int, default=12, help="cases per site")
    parser.add_argument("--slide-px", type=int, default=768, help="slide side at 0.5 um/px (synthesize_cohort)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode, at least (after a warm-up)")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="time each mode for at least this long")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is usually fastest)")
    parser.add_argument("--modes", default="cached,end2end")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    overrides = ["train.bootstrap=0", "train.epochs=1"]
    with tempfile.TemporaryDirectory(prefix="fedmusk-bench-train-") as tmp:
        roots = synthesize_cohort(Path(tmp), sites=args.sites, cases_per_site=args.cases, seed=0, tile_px=32,
                                  progress=False, slide_px=args.slide_px, pretrain_tiles=0, pretrain_reports=2)
        results = [bench_mode(m, roots, args.epochs, args.min_seconds, overrides) for m in args.modes.split(",")]
    report = {
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "threads": args.threads, "load_before": load_before,
                        "load_after": [round(v, 2) for v in os.getloadavg()]},
        "cohort": {"sites": args.sites, "cases_per_site": args.cases, "slide_px": args.slide_px},
        "results": results,
    }  # fmt: skip
    table = markdown(report)
    print(table)
    write_report(args.out_dir, "bench_train", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
