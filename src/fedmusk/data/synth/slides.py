"""Render the synthetic cohort's slides and write them in each site's scanner format, in parallel."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmusk.data.slides.dicom_wsi import write_dicom_wsi
from fedmusk.data.synth.outcomes import CaseBiology
from fedmusk.data.synth.sites import SiteProfile
from fedmusk.data.synth.svs import write_svs
from fedmusk.data.synth.tissue import BACKGROUND, TissueBiology, render_section

STORAGE_TILE = 256  # tile side inside the DICOM/SVS files (128 for small slides, so that they still have a pyramid)
MAX_LEVELS = 4


@dataclass(frozen=True)
class SlideJob:
    site: str  # site folder name
    path: str  # slide path relative to the site root
    case_id: str
    biology: CaseBiology
    profile: SiteProfile
    slide_px: int  # nominal side as pixels at 0.5 um/px (see synthesize_cohort)
    seed: tuple[int, ...]


def section_biology(bio: CaseBiology, rng: np.random.Generator) -> TissueBiology:
    """What one section of a case shows: the case's grade, and its necrosis and TILs with section-to-section
    sampling variation; the share of tumour in the section varies freely."""
    return TissueBiology(
        grade=bio.grade,
        necrosis=float(np.clip(bio.necrosis * rng.uniform(0.7, 1.3), 0.0, 0.6)),
        til=float(np.clip(bio.til * np.exp(rng.normal(0, 0.1)), 0.0, 1.0)),
        tumour_fraction=float(rng.uniform(0.35, 0.7)),
    )


def render_slide(out: Path, job: SlideJob) -> tuple[list[int], int]:
    """Render and write one slide; returns the RGB sum over its tissue pixels and their count (exact integers)."""
    rng = np.random.default_rng(np.random.SeedSequence([*job.seed, 6]))
    p = job.profile
    scale = 0.5 / p.mpp
    height = int(round(job.slide_px * scale * rng.uniform(0.75, 1.0) / 16)) * 16
    width = int(round(job.slide_px * scale * rng.uniform(0.75, 1.0) / 16)) * 16
    rgb, labels = render_section(height, width, p.mpp, section_biology(job.biology, rng), p.stain, rng)
    target = out / job.site / job.path
    tile = STORAGE_TILE if max(height, width) > 4 * STORAGE_TILE else STORAGE_TILE // 2
    if p.scanner == "dicom":
        uid_seed = int(np.random.SeedSequence([*job.seed, 7]).generate_state(1)[0])
        write_dicom_wsi(rgb, target, p.mpp, tile_size=tile, levels=MAX_LEVELS, pseudonym=job.case_id,
                        seed=uid_seed)  # fmt: skip
    else:
        write_svs(rgb, target, p.mpp, tile_size=tile, levels=MAX_LEVELS)
    # colour statistics on every 4th pixel each way: plenty for a mean, and far cheaper than all of them
    sample, tissue = rgb[::4, ::4], labels[::4, ::4] != BACKGROUND
    return [int(v) for v in sample[tissue].sum(axis=0, dtype=np.int64)], int(tissue.sum())


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_slide_jobs(out: Path, jobs: list[SlideJob], workers: int | None, progress: bool) -> dict[str, list[float]]:
    """Write every job's slide; returns each site's mean tissue colour (RGB, 0-255) over all its slides."""
    workers = default_workers() if workers is None else max(1, workers)
    if len(jobs) < 4:
        workers = 1
    results: list[tuple[list[int], int]] = []
    bar = _progress(progress, len(jobs))
    if workers == 1:
        for job in jobs:
            results.append(render_slide(out, job))
            bar.advance()
    else:
        # fork keeps start-up cheap (no re-import); rendering uses only numpy/scipy/PIL, no threads of ours
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for result in pool.map(render_slide, [out] * len(jobs), jobs, chunksize=1):
                results.append(result)
                bar.advance()
    bar.close()

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for job, (rgb_sum, n) in zip(jobs, results):
        sums[job.site] = sums.get(job.site, np.zeros(3, np.int64)) + np.asarray(rgb_sum, np.int64)
        counts[job.site] = counts.get(job.site, 0) + n
    return {site: [round(float(v) / max(1, counts[site]), 2) for v in sums[site]] for site in sums}


class _progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self._bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("rendering slides", total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
