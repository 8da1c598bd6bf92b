"""Cut a slide into fixed-size tiles at a chosen resolution, keeping only tiles that show tissue.

A :class:`TileCoord` says where a tile comes from: ``level`` of the slide, top-left ``x, y`` in that level's pixels,
and the tile's output side ``size`` in pixels at ``mpp`` microns per pixel. The region read from the level is
``size * mpp / level_mpp`` pixels wide (see :func:`region_extent`) and is resampled to ``size`` pixels.

Level choice: tiles are read from the coarsest level that is still at least as fine as the target (a 2% slack
lets a 0.499 or 0.502 µm/px level count as 0.5), then downsampled with an area filter. Reading from a finer level
and shrinking keeps detail; reading a coarser level and enlarging would invent it. When even level 0 is coarser
than the target, level 0 is enlarged: there is nothing finer to read.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fedmusk.data.slides import Slide
from fedmusk.data.slides.tissue import tissue_mask

LEVEL_MPP_SLACK = 0.02  # a level up to 2% coarser than the target still counts as "at" the target
_MASK_MIN_SIDE = 1024  # thumbnail size for the tissue mask: at least this, ...
_MASK_PIXELS_PER_TILE = 16  # ... and at least this many mask pixels across one tile, ...
_MASK_MAX_SIDE = 4096  # ... but never more than this (memory and time on gigapixel slides)


@dataclass(frozen=True)
class TileCoord:
    """One tile: ``level`` of the slide, top-left ``(x, y)`` in that level's pixels, output side ``size`` in pixels
    and output resolution ``mpp`` (microns per pixel)."""

    level: int
    x: int
    y: int
    size: int
    mpp: float


def level_for_mpp(slide: Slide, target_mpp: float) -> int:
    """The index of the level tiles at ``target_mpp`` are read from (see the module docstring for the rule)."""
    if not target_mpp > 0:
        raise ValueError(f"target_mpp must be positive, got {target_mpp}")
    best = 0
    for i, lv in enumerate(slide.levels):
        if lv.mpp <= target_mpp * (1 + LEVEL_MPP_SLACK) and lv.mpp > slide.levels[best].mpp:
            best = i
    return best


def region_extent(slide: Slide, coord: TileCoord) -> int:
    """Side, in pixels of ``coord.level``, of the square region that becomes the tile."""
    return max(1, round(coord.size * coord.mpp / slide.levels[coord.level].mpp))


def tile_grid(slide: Slide, target_mpp: float = 0.5, tile_size: int = 384, min_tissue: float = 0.5) -> list[TileCoord]:
    """The tiles of ``slide`` at ``target_mpp`` whose area is at least ``min_tissue`` (0..1) tissue.

    Whole slides get a non-overlapping grid from the level's top-left corner, in row-major order; edge tiles that
    run past the slide count the missing part as background and are read padded with white. A folder of tile images
    gets one tile per image, centred on it, with the tissue share measured over the part of the tile the image
    covers. The result depends only on the slide's pixels and the arguments.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be between 0 and 1, got {min_tissue}")
    level = level_for_mpp(slide, target_mpp)
    extent = region_extent(slide, TileCoord(level, 0, 0, tile_size, target_mpp))
    boxes = getattr(slide, "image_boxes", None)
    if boxes is not None:
        return _tiles_per_image(slide, boxes, level, extent, target_mpp, tile_size, min_tissue)

    lv = slide.levels[level]
    cols, rows = math.ceil(lv.width / extent), math.ceil(lv.height / extent)
    if min_tissue == 0:
        return [TileCoord(level, c * extent, r * extent, tile_size, float(target_mpp)) for r in range(rows)
                for c in range(cols)]  # fmt: skip
    wanted = max(_MASK_MIN_SIDE, _MASK_PIXELS_PER_TILE * max(cols, rows))
    side = min(max(slide.levels[0].width, slide.levels[0].height), _MASK_MAX_SIDE, wanted)
    mask = tissue_mask(slide.thumbnail(side))
    # Summed-area table: the tissue count of any rectangle in O(1).
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    sx, sy = mask.shape[1] / lv.width, mask.shape[0] / lv.height  # level pixels -> mask pixels

    h, w = mask.shape
    coords = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * extent, r * extent
            x0, x1 = round(x * sx), round((x + extent) * sx)
            y0, y1 = round(y * sy), round((y + extent) * sy)
            # Clip to the mask; the part of an edge tile outside the slide stays in the area, as background.
            cx0, cx1, cy0, cy1 = min(x0, w), min(x1, w), min(y0, h), min(y1, h)
            tissue = sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
            if tissue / max(1, (x1 - x0) * (y1 - y0)) >= min_tissue:
                coords.append(TileCoord(level, x, y, tile_size, float(target_mpp)))
    return coords


def read_tile(slide: Slide, coord: TileCoord) -> np.ndarray:
    """The tile as a (size, size, 3) uint8 RGB array at ``coord.mpp``; raises SlideError when the file is damaged."""
    extent = region_extent(slide, coord)
    # A folder of tiles pads each image with white rather than showing its neighbours in the mosaic.
    read = getattr(slide, "read_image_region", slide.read_region)
    region = read(coord.level, coord.x, coord.y, extent, extent)
    if extent == coord.size:
        return region
    # Area averaging when shrinking (no aliasing); bicubic when enlarging past the finest level.
    method = Image.Resampling.BOX if extent > coord.size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(region).resize((coord.size, coord.size), method))


def sample_tiles(coords: list[TileCoord], cap: int | None, seed: int) -> list[TileCoord]:
    """At most ``cap`` of ``coords``, drawn without replacement; the same seed and input give the same answer.

    The sample keeps the input's order (grid order), so neighbouring tiles stay neighbours. ``cap=None`` (or a cap
    at least ``len(coords)``) returns all of them.
    """
    if cap is None or cap >= len(coords):
        return list(coords)
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    chosen = sorted(random.Random(seed).sample(range(len(coords)), cap))
    return [coords[i] for i in chosen]


def _tiles_per_image(slide, boxes, level, extent, target_mpp, tile_size, min_tissue) -> list[TileCoord]:
    ds = slide.levels[level].downsample
    coords = []
    for bx, by, bw, bh in boxes:  # level-0 pixels
        x0, y0, x1, y1 = bx / ds, by / ds, (bx + bw) / ds, (by + bh) / ds
        x, y = round((x0 + x1 - extent) / 2), round((y0 + y1 - extent) / 2)
        if min_tissue > 0:
            # Measure tissue on the part of the tile that the image covers (the rest is padding, not background).
            ix0, iy0 = max(x, math.ceil(x0)), max(y, math.ceil(y0))
            ix1, iy1 = min(x + extent, math.floor(x1)), min(y + extent, math.floor(y1))
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            region = slide.read_region(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
            scale = min(1.0, 256 / max(region.shape[:2]))
            if scale < 1:
                small = (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale)))
                region = np.asarray(Image.fromarray(region).resize(small, Image.Resampling.BOX))
            if tissue_mask(region).mean() < min_tissue:
                continue
        coords.append(TileCoord(level, x, y, tile_size, float(target_mpp)))
    return coords
