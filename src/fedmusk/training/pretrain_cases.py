"""Pretraining data from what a site already has, for a site without a ``pretrain/`` folder.

A hospital's natural pretraining corpus is its own cases: the tissue tiles of its slides (masked image modelling),
its reports (masked language modelling) and the pairs of a case's slide and report (contrastive alignment; the
slide is seen whole, as a thumbnail, the way ``pairs.csv`` sees a slide).

Only the **training** cases are used. Pretraining learns nothing about outcomes, but it does learn a case's slides
and report text (and reports state the stage, which predicts survival): pretraining on validation or test cases
would let the later evaluation score cases the model has already seen. A slide that cannot be read or holds no
tissue tile gives no tiles and no pair; the case's report is still used for MLM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmusk.config import FedMuskConfig
from fedmusk.data.errors import SiteDataError
from fedmusk.data.prepare.pipeline import (
    CacheWriteError,
    TilingSettings,
    is_current,
    model_fingerprint,
    prepare_slide,
    read_cache,
)
from fedmusk.data.slides.tiles import TileCoord, read_tile, sample_tiles, tile_grid
from fedmusk.training.cohort import load_site_cases
from fedmusk.training.pretrain_data import PretrainData, PretrainImage, PretrainPair, split_document

log = logging.getLogger(__name__)
_OPEN_SLIDES = 4  # slides kept open between tile reads


@dataclass(frozen=True)
class SlideTile(PretrainImage):
    """One tissue tile of a manifest slide, read from the slide when a batch needs it."""

    coord: TileCoord | None = None

    def read(self) -> np.ndarray:
        return read_tile(_open(self.path), self.coord)


_slides: OrderedDict = OrderedDict()


def _open(path: Path):
    from fedmusk.data.slides import open_slide

    key = str(path)
    if key not in _slides:
        _slides[key] = open_slide(path)
        while len(_slides) > _OPEN_SLIDES:
            _slides.popitem(last=False)[1].close()
    _slides.move_to_end(key)
    return _slides[key]


def case_pretrain_data(
    site_root: str | Path, cfg: FedMuskConfig, max_words: int, warn: Callable[[str], None] | None = None
) -> PretrainData:
    """Tiles, report segments and slide-report pairs of the site's training cases (see the module docstring).

    Tiles are those ``fedmusk prepare`` cut (or would cut) with ``cfg.data``'s tiling, at most
    ``data.max_tiles_per_slide`` per slide. ``warn`` gets a message naming the case and slide for each slide left
    out (for the site's own log). Raises SiteDataError when the manifest itself cannot be used.
    """
    site_root = Path(site_root)
    warn = warn or log.warning
    tiling = TilingSettings.from_config(cfg.data)
    data = PretrainData()
    cases = load_site_cases(site_root, cfg.seed, cfg.train.val_fraction, cfg.train.test_fraction)
    for case in (c for c in cases if c.split == "train"):
        if case.report.strip():
            data.texts += split_document(case.report, max_words)
        for slide in case.slides:
            try:
                coords = _tile_coords(site_root, slide, tiling)
            except SiteDataError as err:
                warn(f"case {case.case_id}, slide {slide}: cannot be read ({err.message}); not used for pretraining")
                continue
            if not coords:
                warn(f"case {case.case_id}, slide {slide}: no tissue tile; not used for pretraining")
                continue
            path = site_root / slide
            for coord in sample_tiles(coords, cfg.data.max_tiles_per_slide, cfg.seed):
                name = f"{slide}#{coord.level}:{coord.x}:{coord.y}"
                data.images.append(SlideTile(path, name, coord))
            if case.report.strip():
                data.pairs.append(PretrainPair(PretrainImage(path, slide), case.report))
    return data


def _tile_coords(site_root: Path, slide: str, tiling: TilingSettings) -> list[TileCoord]:
    """The slide's tissue tiles: from the prepare cache when it was cut with this tiling, else cut now and recorded
    in the cache (tiles only), where the outcome phase finds them again."""
    cached = read_cache(site_root, slide)
    if not is_current(cached, "", tiling, features=False):
        try:
            prepare_slide(site_root, slide, tiling, model_fingerprint(None, False, tiling))
        except CacheWriteError:  # a read-only site: cut the tiles without recording them
            return tile_grid(_open(site_root / slide), tiling.target_mpp, tiling.tile_size, tiling.min_tissue)
        cached = read_cache(site_root, slide)
    return cached.tile_coords()
