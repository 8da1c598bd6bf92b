"""A folder of tile images (.png/.jpg) seen as one slide, ``kind="tiles"``.

The images, in file-name order, are laid out row by row on a grid of equal cells (the largest image's size), so the
folder reads like any other slide: one level, white between images. :func:`fedmusk.data.slides.tiles.tile_grid` knows the
images' boxes (``image_boxes``) and cuts one tile per image instead of a grid across the mosaic, and
:func:`~fedmusk.data.slides.tiles.read_tile` reads it with ``read_image_region`` so neighbouring images never leak in.

Resolution: tile images rarely record it. An image's own resolution field (PNG pHYs, JPEG/TIFF DPI) is used when it
gives a microscope-like 0.05 to 20 microns per pixel; otherwise the tiles are taken to be at
:data:`DEFAULT_TILE_MPP` (0.5 µm/px, the usual 20x resolution that tiles for pathology models are cut at).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedmusk.data.errors import SlideError
from fedmusk.data.slides.base import Slide, SlideLevel, valid_mpp

DEFAULT_TILE_MPP = 0.5
_PLAUSIBLE_MPP = (0.05, 20.0)
_CACHE_IMAGES = 16


class TileFolderSlide(Slide):
    """Tile images laid out as a mosaic; ``image_boxes[i]`` is image i's (x, y, width, height) in level-0 pixels."""

    kind = "tiles"

    def __init__(self, path: Path, files: list[Path], boxes: list[tuple[int, int, int, int]], cell, cols, mpp):
        rows = math.ceil(len(files) / cols)
        super().__init__(path, [SlideLevel(cols * cell[0], rows * cell[1], mpp, 1.0)])
        self.files = files
        self.image_boxes = boxes
        self._cell, self._cols = cell, cols
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, path: Path, files: list[Path]) -> TileFolderSlide:
        """Read the headers of ``files`` (the images that make up the slide at ``path``)."""
        sizes, mpps = [], []
        for f in files:
            try:
                with Image.open(f) as im:
                    sizes.append(im.size)
                    mpps.append(_mpp_from_dpi(im.info.get("dpi")))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise SlideError(f"is not a readable image ({type(err).__name__}: {err})", path=f) from err
        if not sizes:
            raise SlideError("holds no tile images", path=path)
        cell = (max(w for w, _ in sizes), max(h for _, h in sizes))
        cols = math.ceil(math.sqrt(len(files)))
        boxes = [((i % cols) * cell[0], (i // cols) * cell[1], w, h) for i, (w, h) in enumerate(sizes)]
        mpp = mpps[0] if mpps[0] is not None else DEFAULT_TILE_MPP
        return cls(path, list(files), boxes, cell, cols, mpp)

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        cw, ch = self._cell
        for row in range(y // ch, (y + height - 1) // ch + 1):
            for col in range(x // cw, min((x + width - 1) // cw + 1, self._cols)):
                index = row * self._cols + col
                if index >= len(self.files):
                    continue
                bx, by, bw, bh = self.image_boxes[index]
                x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + width, bx + bw), min(y + height, by + bh)
                if x1 > x0 and y1 > y0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image(index)[y0 - by : y1 - by, x0 - bx : x1 - bx]
        return out

    def read_image_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Like ``read_region``, but only the image whose cell holds the region's centre shows; the rest is white.

        Tiles cut from a folder use this, so a tile larger than its image never shows parts of neighbouring images.
        """
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        cw, ch = self._cell
        col, row = (x + width // 2) // cw, (y + height // 2) // ch
        index = row * self._cols + col
        if not (0 <= col < self._cols and 0 <= row and index < len(self.files)):
            return out
        bx, by, bw, bh = self.image_boxes[index]
        x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + width, bx + bw), min(y + height, by + bh)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image(index)[y0 - by : y1 - by, x0 - bx : x1 - bx]
        return out

    def verify_all(self) -> None:
        """Decode every image (used by check_slide): a truncated JPEG/PNG only shows when it is decoded."""
        for index in range(len(self.files)):
            self._image(index)

    def _image(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im.load()
                pixels = _to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise SlideError(f"is a damaged or truncated image ({type(err).__name__}: {err})", path=path) from err
        if pixels.shape[1::-1] != self.image_boxes[index][2:]:
            raise SlideError("changed size since the folder was opened", path=path)
        self._cache[index] = pixels
        while len(self._cache) > _CACHE_IMAGES:
            self._cache.popitem(last=False)
        return pixels

    def close(self) -> None:
        self._cache.clear()


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode in ("I;16", "I;16B", "I", "F"):
        raise ValueError(f"{im.mode} images (16-bit or float) are not supported; save tiles as 8-bit RGB")
    return np.asarray(im.convert("RGB"))


def _mpp_from_dpi(dpi) -> float | None:
    if not dpi:
        return None
    resolution = valid_mpp(dpi[0] if isinstance(dpi, tuple) else dpi)
    if resolution is None:
        return None
    mpp = 25400.0 / resolution
    return mpp if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None
