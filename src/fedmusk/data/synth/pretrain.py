"""A site's synthetic pretraining data: ``pretrain/images/`` (tissue tiles as PNG), ``pretrain/text/`` (archive
reports, one document each: half as .txt files, half as lines of reports.jsonl with a "text" field) and
``pretrain/pairs.csv`` (image, caption).

The tiles and texts come from extra patients drawn from the site's own case mix, stain and report style (an
archive separate from the cohort's cases), so pretraining shows the site's heterogeneity without reusing labels.
Captions are written from what each tile actually shows (its compartments), not only from the case.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fedmusk.data.synth.outcomes import sample_biology
from fedmusk.data.synth.reports import describe_tile, report_body, write_report
from fedmusk.data.synth.sites import SiteProfile
from fedmusk.data.synth.tissue import LABEL_NAMES, TissueBiology, render_section

PRETRAIN_MPP = 0.5


def write_pretrain(
    site_root: Path, profile: SiteProfile, k: int, seed: int, tile_px: int, n_tiles: int, n_reports: int
) -> None:
    """Write ``n_tiles`` captioned tiles and the sentences of ``n_reports`` reports for site number ``k``."""
    root = site_root / "pretrain"
    (root / "text").mkdir(parents=True, exist_ok=True)
    if n_tiles > 0:
        _write_tiles(root, profile, k, seed, tile_px, n_tiles)
    _write_text(root, profile, k, seed, n_reports)


def _write_tiles(root: Path, profile: SiteProfile, k: int, seed: int, tile_px: int, n_tiles: int) -> None:
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 8]))
    rows = []
    for i, bio in enumerate(sample_biology(n_tiles, profile.case_mix, rng)):
        section = TissueBiology(bio.grade, bio.necrosis, bio.til, tumour_fraction=float(rng.uniform(0.1, 0.9)))
        rgb, labels = render_section(tile_px, tile_px, PRETRAIN_MPP, section, profile.stain, rng, with_background=False)
        name = f"images/tile-{i + 1:04d}.png"
        Image.fromarray(rgb).save(root / name, optimize=False)
        counts = np.bincount(labels.ravel(), minlength=len(LABEL_NAMES)) / labels.size
        fractions = {LABEL_NAMES[j]: float(counts[j]) for j in range(len(LABEL_NAMES))}
        rows.append((name, describe_tile(fractions, bio.grade, section.til, profile.british, rng)))
    with (root / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)


def _write_text(root: Path, profile: SiteProfile, k: int, seed: int, n_reports: int) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 9]))
    bodies = [
        report_body(write_report("X", bio, profile.report_style, profile.british, rng))
        for bio in sample_biology(n_reports, profile.case_mix, rng)
    ]
    # one document each: half as .txt files, half as lines of a .jsonl, so both readers get exercised
    half = (len(bodies) + 1) // 2
    for i, body in enumerate(bodies[:half]):
        (root / "text" / f"report-{i + 1:04d}.txt").write_text(body, encoding="utf-8", newline="\n")
    if bodies[half:]:
        with (root / "text" / "reports.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for body in bodies[half:]:
                f.write(json.dumps({"text": body}) + "\n")
