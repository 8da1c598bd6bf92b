"""bench_utility.py's cohorts: a seeded synthetic non-IID cohort per seed, its redrawn splits and its facts.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path


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

