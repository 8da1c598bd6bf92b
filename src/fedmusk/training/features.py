"""Tile inputs for outcome models: cached MUSK features from ``fedmusk prepare`` (fast mode) or live tiles read from
the slides for end-to-end LoRA training."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmusk.data.errors import SiteDataError
from fedmusk.data.prepare.pipeline import TilingSettings, is_current, model_fingerprint, prepare_site, read_cache
from fedmusk.data.slides import open_slide
from fedmusk.data.slides.tiles import read_tile
from fedmusk.musk_model.transforms import musk_transform

# Why a slide gives a case nothing to learn from; the keys of the exclusion counts in metrics.
NO_TISSUE = "no_tissue"
UNREADABLE = "unreadable"
EXCLUSION_REASONS = (NO_TISSUE, UNREADABLE)


class FeatureStore:
    """Per-slide tile features of a frozen base MUSK, loaded from the sites' caches (prepared on demand).

    With ``base_model=None`` only the tile grids are prepared (end-to-end training reads pixels live). A slide that
    cannot be read, or on which no tissue tile was found, is not an error here: ``unusable(site_root, slide)``
    gives its reason (``NO_TISSUE`` or ``UNREADABLE``) and a message for the site's own log, and the session
    leaves it out.
    ``precision`` ("float32" or "bfloat16", resolved) is the embedding's compute precision.
    """

    def __init__(
        self, base_model, tiling: TilingSettings, ms_aug: bool, batch_size: int = 32, progress=None,
        precision: str = "float32",
    ):  # fmt: skip
        self.model, self.tiling, self.ms_aug, self.batch_size = base_model, tiling, ms_aug, batch_size
        self.precision = precision if base_model is not None else "float32"
        self.fingerprint = model_fingerprint(base_model, ms_aug, tiling, self.precision)
        self.progress = progress
        self._features: dict[tuple[Path, str], torch.Tensor] = {}
        self._unusable: dict[tuple[Path, str], tuple[str, str]] = {}

    def ensure(self, site_root: Path, slides: list[str]) -> None:
        """Embed every slide whose cache is missing or was made by another model or setting; record the slides that
        cannot be read and those without tissue tiles (see ``unusable``)."""
        embed = self.model is not None
        stale = [s for s in slides if not is_current(read_cache(site_root, s), self.fingerprint, self.tiling, embed)]
        if stale:
            transform = musk_transform(self.model.config.img_size) if self.model is not None else None
            result = prepare_site(
                site_root, stale, self.tiling, self.model, transform, self.batch_size, self.ms_aug,
                progress=self.progress, precision=self.precision,
            )  # fmt: skip
            for slide, reason in result.failed:
                self._unusable[(site_root, slide)] = (UNREADABLE, f"cannot be read: {reason}")
        for slide in slides:
            if (site_root, slide) in self._unusable:
                continue
            cached = read_cache(site_root, slide)
            if cached is not None and cached.coords.shape[0] == 0:
                self._unusable[(site_root, slide)] = (
                    NO_TISSUE, "no tissue tile was found (blank or very pale scan, or data.min_tissue too high)"
                )

    def unusable(self, site_root: Path, slide: str) -> tuple[str, str] | None:
        """``(reason, message)`` for a slide that gives no tiles (after ``ensure``), None for a usable one."""
        return self._unusable.get((site_root, slide))

    def get(self, site_root: Path, slide: str) -> torch.Tensor:
        key = (site_root, slide)
        if key not in self._features:
            cached = read_cache(site_root, slide)
            if not is_current(cached, self.fingerprint, self.tiling, features=True):
                raise SiteDataError("slide has no current tile features; run 'fedmusk prepare'", path=slide)
            if cached.features.shape[0] == 0:
                raise SiteDataError("no tissue tiles were found on this slide", path=slide)
            self._features[key] = cached.features
        return self._features[key]


class TileReader:
    """Live tiles for end-to-end training: coordinates from the cache, pixels from the slide, MUSK preprocessing."""

    def __init__(self, img_size: int, tiling: TilingSettings):
        self.transform = musk_transform(img_size)
        self.tiling = tiling

    def coords(self, site_root: Path, slide: str):
        cached = read_cache(site_root, slide)
        if cached is None:
            raise SiteDataError("slide has not been tiled; run 'fedmusk prepare'", path=slide)
        return cached.tile_coords()

    def pixels(self, site_root: Path, slide: str, index: list[int]) -> torch.Tensor:
        coords = self.coords(site_root, slide)
        with open_slide(Path(site_root) / slide) as s:
            return torch.stack([self.transform(read_tile(s, coords[i])) for i in index])
