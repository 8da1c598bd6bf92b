"""The hospitals of the synthetic consortium: how each one stains, scans, selects patients, follows them up and
writes reports. Three hand-made profiles; more sites are variations of them drawn from the seed."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedmusk.data.synth.outcomes import CaseMix, FollowUp
from fedmusk.data.synth.tissue import Stain


@dataclass(frozen=True)
class SiteProfile:
    name: str  # also the site root's folder name
    scanner: str  # "svs" (Aperio-style TIFF) or "dicom" (DICOM WSI)
    mpp: float  # level-0 microns per pixel
    stain: Stain
    case_mix: CaseMix
    follow_up: FollowUp
    report_style: str  # see synth_reports.REPORT_STYLES
    british: bool  # report spelling
    case_prefix: str  # how the site writes its pseudonyms


BASE_PROFILES = (
    # An academic centre: 40x Aperio scanner, strong eosin, earlier-stage patients, long follow-up, synoptic reports.
    SiteProfile(
        name="site-1", scanner="svs", mpp=0.25,
        stain=Stain((0.55, 0.74, 0.40), (0.20, 0.82, 0.54), h_strength=1.0, e_strength=1.2),
        case_mix=CaseMix(extent_shift=-0.3, grade_shift=-0.2, til_shift=0.15),
        follow_up=FollowUp(accrual_months=48, study_months=96, dropout_per_year=0.02),
        report_style="synoptic", british=True, case_prefix="A",
    ),
    # A regional hospital: DICOM from a 20x scanner, dark blue nuclei and pale eosin, more advanced disease,
    # short follow-up with more patients lost, narrative reports in American spelling.
    SiteProfile(
        name="site-2", scanner="dicom", mpp=0.5,
        stain=Stain((0.65, 0.70, 0.30), (0.26, 0.78, 0.57), h_strength=1.2, e_strength=0.8),
        case_mix=CaseMix(extent_shift=0.5, grade_shift=0.3, til_shift=-0.2),
        follow_up=FollowUp(accrual_months=24, study_months=48, dropout_per_year=0.08),
        report_style="narrative", british=False, case_prefix="RH",
    ),
    # A community network: DICOM at 20x, faded purple-tinged stain on yellowish glass, average case mix.
    SiteProfile(
        name="site-3", scanner="dicom", mpp=0.5,
        stain=Stain((0.58, 0.73, 0.37), (0.30, 0.75, 0.59), h_strength=0.8, e_strength=0.9, glass=(0.02, 0.03, 0.07)),
        case_mix=CaseMix(),
        follow_up=FollowUp(accrual_months=36, study_months=72, dropout_per_year=0.05),
        report_style="structured", british=True, case_prefix="CN",
    ),
)  # fmt: skip


def site_profiles(n_sites: int, seed: int) -> list[SiteProfile]:
    """Profiles for ``n_sites`` sites: the three base profiles, then seeded variations of them."""
    if n_sites < 1:
        raise ValueError(f"sites must be at least 1, got {n_sites}")
    profiles = list(BASE_PROFILES[:n_sites])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    for k in range(len(profiles), n_sites):
        base = BASE_PROFILES[k % len(BASE_PROFILES)]
        accrual = float(rng.uniform(24, 48))
        profiles.append(
            replace(
                base,
                name=f"site-{k + 1}",
                scanner=("svs", "dicom")[k % 2],
                mpp=(0.25, 0.5)[int(rng.integers(2))],
                stain=Stain(
                    _jitter_vector(base.stain.hematoxylin, rng),
                    _jitter_vector(base.stain.eosin, rng),
                    h_strength=round(float(base.stain.h_strength * rng.uniform(0.85, 1.15)), 3),
                    e_strength=round(float(base.stain.e_strength * rng.uniform(0.85, 1.15)), 3),
                    glass=base.stain.glass,
                ),
                case_mix=CaseMix(*(round(float(v), 3) for v in rng.normal(0, 0.3, 3))),
                follow_up=FollowUp(
                    accrual_months=round(accrual, 1),
                    study_months=round(accrual + float(rng.uniform(24, 60)), 1),
                    dropout_per_year=round(float(rng.uniform(0.02, 0.08)), 3),
                ),
                case_prefix=f"{base.case_prefix}{k + 1}",
            )
        )
    return profiles


def _jitter_vector(v, rng) -> tuple[float, float, float]:
    out = np.clip(np.asarray(v) + rng.normal(0, 0.03, 3), 0.05, None)
    out /= np.linalg.norm(out)
    return tuple(round(float(x), 4) for x in out)
