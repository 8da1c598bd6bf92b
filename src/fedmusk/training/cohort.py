"""The cases a site trains and evaluates on: manifest rows grouped into cases, with reports, labels and a split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedmusk.data.site.manifest import read_manifest
from fedmusk.data.site.reports import REPORT_MAX_BYTES, read_report

SPLITS = ("train", "val", "test")


@dataclass
class CaseRecord:
    """One patient case of one site. ``site`` is the operator's name for the site (its folder name)."""

    site: str
    site_root: Path
    case_id: str
    slides: list[str]  # relative to site_root
    report: str  # "" when the case has no report
    time: float
    event: int
    response: int | None
    split: str


def assign_split(case_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A deterministic split for a case whose manifest gives none: the same case lands in the same split on every
    run with the same seed, whatever the row order."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def load_site_cases(site_root: str | Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2):
    """Every usable case of a site (strict: a manifest error raises SiteDataError naming row and field)."""
    site_root = Path(site_root)
    manifest = read_manifest(site_root, strict=True)
    cases = []
    for case in manifest.cases():
        text = "\n".join(read_report(site_root / r, REPORT_MAX_BYTES) for r in case.reports)
        split = case.split or assign_split(case.case_id, seed, val_fraction, test_fraction)
        cases.append(
            CaseRecord(
                site=site_root.name,
                site_root=site_root,
                case_id=case.case_id,
                slides=list(case.slides),
                report=text,
                time=float(case.time),
                event=int(case.event),
                response=case.response,
                split=split,
            )
        )
    return cases


def split_cases(cases: list[CaseRecord]) -> dict[str, list[CaseRecord]]:
    return {s: [c for c in cases if c.split == s] for s in SPLITS}
