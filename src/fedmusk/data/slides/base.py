"""What every slide reader provides: levels (finest first) and RGB regions read in a level's own pixel coordinates.

Parts of a region outside the level come back white, as the glass background would. Every problem with the data is
raised as :class:`~fedmusk.data.errors.SlideError` naming the file and what is wrong with it. The readers
(:mod:`.dicom`, :mod:`.tiff`, :mod:`.tile_folder`) subclass :class:`Slide`; :func:`fedmusk.data.slides.open_slide`
picks one by content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from fedmusk.data.errors import SlideError

_READ_BLOCK = 2048  # pixels per side when a large level is read piecewise (bounds memory for thumbnails)


@dataclass(frozen=True)
class SlideLevel:
    """One resolution of a slide: size in pixels, microns per pixel, and downsample relative to level 0."""

    width: int
    height: int
    mpp: float
    downsample: float


class Slide:
    """A readable whole-slide image. Use :func:`open_slide` to get one; close it (or use ``with``) when done.

    Subclasses fill in ``levels`` (finest first) and implement ``_read`` for regions inside a level.
    """

    kind: str = ""

    def __init__(self, path: str | PathLike[str], levels: list[SlideLevel]) -> None:
        self.path = str(path)
        self.levels = levels

    @property
    def mpp(self) -> float:
        """Microns per pixel of level 0 (the finest level)."""
        return self.levels[0].mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """An (height, width, 3) uint8 RGB array of the region whose top-left corner is (x, y) in ``level``'s pixels.

        The region may extend past the level's edges; that part is white. Raises SlideError when the file cannot
        be decoded there (a damaged tile, for instance) and ValueError for a level that does not exist.
        """
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} does not exist (the slide has {len(self.levels)} levels)")
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        lv = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read_checked(level, x, y, width, height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_checked(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide as an RGB array whose longer side is ``max_size`` (or level 0 itself if that is smaller).

        Reads the coarsest level that is still at least ``max_size`` on its longer side, piecewise, so a large
        single-level slide never has to fit in memory at full resolution.
        """
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        level = 0
        for i, lv in enumerate(self.levels):
            if max(lv.width, lv.height) >= max_size:
                level = i
        lv = self.levels[level]
        scale = min(1.0, max_size / max(lv.width, lv.height))
        out_w, out_h = max(1, round(lv.width * scale)), max(1, round(lv.height * scale))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for by in range(0, lv.height, _READ_BLOCK):
            for bx in range(0, lv.width, _READ_BLOCK):
                bw, bh = min(_READ_BLOCK, lv.width - bx), min(_READ_BLOCK, lv.height - by)
                # Block edges are mapped with the same rounding, so neighbouring blocks tile without gaps.
                dx0, dy0 = round(bx * scale), round(by * scale)
                dx1, dy1 = round((bx + bw) * scale), round((by + bh) * scale)
                if dx1 <= dx0 or dy1 <= dy0:
                    continue
                block = self._read_checked(level, bx, by, bw, bh)
                if (dx1 - dx0, dy1 - dy0) != (bw, bh):
                    block = np.asarray(Image.fromarray(block).resize((dx1 - dx0, dy1 - dy0), Image.Resampling.BOX))
                out[dy0:dy1, dx0:dx1] = block
        return out

    def close(self) -> None:
        """Release the file handles. Safe to call twice."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        lv = self.levels[0]
        size = f"{lv.width}x{lv.height}"
        return f"<{type(self).__name__} kind={self.kind} {size} mpp={lv.mpp:.4g} levels={len(self.levels)}>"

    def _read_checked(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._read(level, x, y, width, height)
        except SlideError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is a damaged file from the user's view
            raise SlideError(
                f"could not decode the region {width}x{height} at ({x}, {y}) of level {level}; the file is damaged "
                f"or truncated ({type(err).__name__}: {err})",
                path=self.path,
            ) from err
        if region.shape != (height, width, 3) or region.dtype != np.uint8:
            raise SlideError(
                f"the reader returned a {region.shape} {region.dtype} region, expected RGB", path=self.path
            )
        return region

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError


def valid_mpp(value) -> float | None:
    """``value`` as a positive finite float, or None when it is missing or meaningless."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and mpp > 0 else None
