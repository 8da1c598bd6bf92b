"""``fedmusk synth``: a synthetic multi-site lung cancer cohort, written as real site folders.

Each site root holds what a hospital would prepare: ``manifest.csv`` (one row per slide), whole-slide images
(DICOM WSI series or Aperio-style SVS files), one pathology report per case and ``pretrain/`` data (tissue tiles,
report sentences, tile-caption pairs). The cohort root also holds ``cohort.json`` (generating parameters and a
per-site summary) and ``ground_truth.csv`` (every case's latent biology, risk and response probability). The ground
truth lies outside every site root on purpose: it is the benchmark's answer key and no site may see it.

What is planted and where it shows is described in :mod:`fedmusk.data.synth.outcomes` (latents, survival and
response models with their coefficients), :mod:`fedmusk.data.synth.tissue` (how biology looks in H&E),
:mod:`fedmusk.data.synth.reports` (report language) and :mod:`fedmusk.data.synth.sites` (site heterogeneity).
The same arguments give byte-identical manifests, reports and ground truth, and identical pixels.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import numpy as np

import fedmusk
from fedmusk.data.synth.outcomes import (
    RESPONSE,
    SURVIVAL,
    CaseBiology,
    CaseOutcome,
    sample_biology,
    simulate_outcomes,
)
from fedmusk.data.synth.pretrain import write_pretrain
from fedmusk.data.synth.reports import write_report
from fedmusk.data.synth.sites import SiteProfile, site_profiles
from fedmusk.data.synth.slides import SlideJob, run_slide_jobs

DEFAULT_CASES = (40, 60, 80)
MANIFEST_COLUMNS = ("case_id", "slide", "report", "time", "event", "response", "split")
SPLIT_SHARES = (0.7, 0.15)  # train, val; the rest is test
STAGES = ("I", "II", "III", "IV")


@dataclass(frozen=True)
class _SiteCases:
    profile: SiteProfile
    case_ids: list[str]
    biology: list[CaseBiology]
    outcomes: list[CaseOutcome]
    splits: list[str]
    n_slides: list[int]


def synthesize_cohort(
    out_dir: str | PathLike[str],
    sites: int = 3,
    cases_per_site: int | tuple[int, ...] | None = None,
    seed: int = 0,
    tile_px: int = 96,
    progress: bool = True,
    *,
    slide_px: int = 1024,
    images: bool = True,
    pretrain_tiles: int = 32,
    pretrain_reports: int = 20,
    multi_slide_rate: float = 0.25,
    fake_identifier_rate: float = 0.0,
    workers: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic cohort of ``sites`` sites under ``out_dir`` and return the site roots.

    ``cases_per_site``: one count for every site, or one per site; default 40, 60, 80 (cycled for more sites).
    ``seed``: everything follows from it; a site's cases depend only on the seed, the site's index and its own
    case count, so adding a site leaves the others as they were.
    ``tile_px``: side of the pretraining tiles (pixels at 0.5 um/px); use the tile size the pipeline cuts.
    ``slide_px``: slide side as pixels at 0.5 um/px, i.e. ``slide_px * 0.5`` um of glass; each side is drawn at
    75-100% of it, and a 0.25 um/px site writes twice as many pixels per side for the same area. The default
    (1024) suits tiles of about 100 px; for 384 px tiles use 2048-3072.
    ``images=False`` skips slides and pretraining tiles (manifests still name the slides): a labels-and-reports
    cohort for statistics, not a valid site. ``multi_slide_rate``: share of cases with more than one slide (a fifth
    of those have three). ``fake_identifier_rate``: share of reports with a planted, clearly fake MRN line (for
    exercising the validator's identifier warnings); 0 by default. ``workers``: processes rendering slides
    (default: as many as there are CPUs, at most 4); the output does not depend on it.

    Raises ValueError for impossible arguments, and FileExistsError when a site root already exists and holds
    files, unless ``overwrite`` is set and ``out_dir`` holds an earlier synthetic cohort (whose sites are removed).
    """
    out = Path(out_dir)
    counts = _case_counts(sites, cases_per_site)
    if tile_px < 16 or slide_px < 2 * tile_px:
        raise ValueError(f"need tile_px >= 16 and slide_px >= 2 * tile_px, got tile_px={tile_px}, slide_px={slide_px}")
    if not 0 <= fake_identifier_rate <= 1 or not 0 <= multi_slide_rate <= 1:
        raise ValueError("fake_identifier_rate and multi_slide_rate must lie in [0, 1]")
    profiles = site_profiles(sites, seed)
    _prepare_out_dir(out, [p.name for p in profiles], overwrite)

    cohort = [_draw_site(p, n, k, seed, multi_slide_rate) for k, (p, n) in enumerate(zip(profiles, counts))]
    jobs: list[SlideJob] = []
    for k, site in enumerate(cohort):
        jobs += _write_site_tables(out, k, site, seed, slide_px, fake_identifier_rate)
    colour = run_slide_jobs(out, jobs, workers, progress) if images else {}
    for k, site in enumerate(cohort):
        root = out / site.profile.name
        write_pretrain(root, site.profile, k, seed, tile_px, pretrain_tiles if images else 0, pretrain_reports)
    _write_ground_truth(out, cohort)
    _write_cohort_json(out, cohort, colour, dict(
        sites=sites, cases_per_site=counts, seed=seed, tile_px=tile_px, slide_px=slide_px, images=images,
        pretrain_tiles=pretrain_tiles, pretrain_reports=pretrain_reports, multi_slide_rate=multi_slide_rate,
        fake_identifier_rate=fake_identifier_rate,
    ))  # fmt: skip
    return [out / p.name for p in profiles]


def _case_counts(sites: int, cases_per_site) -> list[int]:
    if cases_per_site is None:
        counts = [DEFAULT_CASES[k % len(DEFAULT_CASES)] for k in range(sites)]
    elif isinstance(cases_per_site, int):
        counts = [cases_per_site] * sites
    else:
        counts = [int(n) for n in cases_per_site]
        if len(counts) != sites:
            raise ValueError(f"cases_per_site has {len(counts)} counts for {sites} sites")
    if min(counts) < 1:
        raise ValueError(f"every site needs at least one case, got {counts}")
    return counts


def _prepare_out_dir(out: Path, names: list[str], overwrite: bool) -> None:
    taken = [out / n for n in names if (out / n).exists() and any((out / n).iterdir())]
    if taken and not overwrite:
        raise FileExistsError(f"{taken[0]} already exists and is not empty (pass overwrite to replace it)")
    if taken and not (out / "cohort.json").is_file():
        raise FileExistsError(f"{out} does not hold an earlier synthetic cohort (no cohort.json); not overwriting")
    if overwrite and (out / "cohort.json").is_file():
        # the earlier cohort's own sites go too, so a smaller cohort leaves no stale site behind
        earlier = json.loads((out / "cohort.json").read_text(encoding="utf-8")).get("sites", [])
        taken += [out / s["name"] for s in earlier if re.fullmatch(r"site-\d+", str(s.get("name", "")))]
        for path in dict.fromkeys(taken):
            if path.is_dir():
                shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _draw_site(profile: SiteProfile, n: int, k: int, seed: int, multi_slide_rate: float) -> _SiteCases:
    biology = sample_biology(n, profile.case_mix, _rng(seed, k, 1))
    outcomes = simulate_outcomes(biology, profile.follow_up, _rng(seed, k, 2))
    rng = _rng(seed, k, 3)
    ids: list[str] = []
    while len(ids) < n:  # random pseudonyms, unique within the site
        cid = f"{profile.case_prefix}-{int(rng.integers(16**6)):06X}"
        if cid not in ids:
            ids.append(cid)
    order = rng.permutation(n)
    n_train = max(1, round(SPLIT_SHARES[0] * n)) if n >= 3 else n
    n_val = max(1, round(SPLIT_SHARES[1] * n)) if n >= 3 else 0
    if n >= 3 and n_train + n_val >= n:
        n_train = n - n_val - 1
    splits = [""] * n
    for rank, i in enumerate(order):
        splits[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    draws = rng.random(n)
    n_slides = [3 if d < 0.2 * multi_slide_rate else 2 if d < multi_slide_rate else 1 for d in draws]
    return _SiteCases(profile, ids, biology, outcomes, splits, n_slides)


def _write_site_tables(out: Path, k: int, site: _SiteCases, seed: int, slide_px: int, fake_rate: float):
    """Reports and manifest of one site; returns the slide jobs that will fill in the slide files."""
    p = site.profile
    root = out / p.name
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "slides").mkdir(exist_ok=True)
    rng = _rng(seed, k, 4)
    rows, jobs = [], []
    for i, (cid, bio, outc) in enumerate(zip(site.case_ids, site.biology, site.outcomes)):
        fake = bool(rng.random() < fake_rate)
        report = write_report(cid, bio, p.report_style, p.british, _rng(seed, k, 5, i), fake_identifier=fake)
        (root / "reports" / f"{cid}.txt").write_text(report, encoding="utf-8", newline="\n")
        for j in range(site.n_slides[i]):
            slide = f"slides/{cid}-{j + 1}" + (".svs" if p.scanner == "svs" else "")
            rows.append((cid, slide, f"reports/{cid}.txt", f"{outc.time:.1f}", outc.event, outc.response,
                         site.splits[i]))  # fmt: skip
            jobs.append(SlideJob(site=p.name, path=slide, case_id=cid, biology=bio, profile=p, slide_px=slide_px,
                                 seed=(seed, k, i, j)))  # fmt: skip
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return jobs


def _write_ground_truth(out: Path, cohort: list[_SiteCases]) -> None:
    bio_fields = list(asdict(cohort[0].biology[0]).keys())
    out_fields = list(asdict(cohort[0].outcomes[0]).keys())
    with (out / "ground_truth.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["site", "case_id", "split", "n_slides", *bio_fields, *out_fields])
        for site in cohort:
            cases = zip(site.case_ids, site.splits, site.n_slides, site.biology, site.outcomes)
            for cid, split, n_slides, bio, outc in cases:
                writer.writerow([site.profile.name, cid, split, n_slides, *_cells(asdict(bio)), *_cells(asdict(outc))])


def _cells(record: dict) -> list:
    return [int(v) if isinstance(v, bool) else v for v in record.values()]


def _write_cohort_json(out: Path, cohort: list[_SiteCases], colour: dict, parameters: dict) -> None:
    summaries = []
    for site in cohort:
        p = site.profile
        times = np.array([o.time for o in site.outcomes])
        events = np.array([o.event for o in site.outcomes])
        summaries.append({
            "name": p.name,
            "scanner": p.scanner,
            "mpp": p.mpp,
            "stain": asdict(p.stain),
            "case_mix": asdict(p.case_mix),
            "follow_up": asdict(p.follow_up),
            "report_style": p.report_style,
            "cases": len(site.case_ids),
            "slides": int(sum(site.n_slides)),
            "splits": {s: site.splits.count(s) for s in ("train", "val", "test")},
            "event_rate": round(float(events.mean()), 3),
            "median_time_months": round(float(np.median(times)), 1),
            "response_rate": round(float(np.mean([o.response for o in site.outcomes])), 3),
            "grade_counts": {str(g): sum(b.grade == g for b in site.biology) for g in (1, 2, 3)},
            "stage_counts": {s: sum(b.stage == i for b in site.biology) for i, s in enumerate(STAGES, 1)},
            "mean_tissue_rgb": colour.get(p.name),
        })  # fmt: skip
    doc = {
        "generator": "fedmusk.data.synth.cohort",
        "fedmusk_version": fedmusk.__version__,
        "parameters": parameters,
        "signal": {"survival": SURVIVAL, "response": RESPONSE},
        "ground_truth": "ground_truth.csv",
        "sites": summaries,
    }
    (out / "cohort.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
