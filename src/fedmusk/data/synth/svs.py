"""Write an Aperio-style SVS: a tiled, pyramidal, JPEG-compressed TIFF that OpenSlide opens as vendor "aperio".

Layout as an Aperio scanner writes it: the full-resolution level first, then a small stripped thumbnail, then the
reduced levels (each half the size of the one before). Every image description starts with "Aperio Image Library"
and carries ``MPP = ...`` (which OpenSlide reports as openslide.mpp-x/y) and ``AppMag``; the TIFF resolution tags
say the same in pixels per centimetre. No label or macro image is written: on real slides those are photographs of
the glass label and often show a name.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import tifffile

_LIBRARY = "Aperio Image Library v12.0.15"


def halve(image: np.ndarray) -> np.ndarray:
    """2x area reduction of an (H, W, 3) uint8 image; an odd last row or column is dropped."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    a = image[0:h:2, 0:w:2].astype(np.uint16)
    a += image[1:h:2, 0:w:2]
    a += image[0:h:2, 1:w:2]
    a += image[1:h:2, 1:w:2]
    a += 2
    a //= 4
    return a.astype(np.uint8)


def write_svs(
    image: np.ndarray,
    path: str | PathLike[str],
    mpp: float,
    tile_size: int = 256,
    levels: int = 3,
    quality: int = 90,
    scanner_id: str = "SYNTH-01",
) -> Path:
    """Write ``image`` ((H, W, 3) uint8 RGB at ``mpp`` microns per pixel) as an Aperio SVS at ``path``.

    Writes up to ``levels`` pyramid levels, stopping once a level fits in one tile. Returns the path.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (TIFF tiles), got {tile_size}")
    pyramid = [image]
    while len(pyramid) < levels and max(pyramid[-1].shape[:2]) > tile_size:
        pyramid.append(halve(pyramid[-1]))
    height, width = image.shape[:2]
    magnification = 40 if mpp < 0.375 else 20
    fields = f"AppMag = {magnification}|MPP = {mpp:.4f}|ScanScope ID = {scanner_id}|Filename = synthetic"

    thumb = pyramid[-1]
    while max(thumb.shape[:2]) > 512:
        thumb = halve(thumb)

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k, level in enumerate(pyramid):
            h, w = level.shape[:2]
            if k == 0:
                head = f"{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size}) JPEG/RGB Q={quality}"
            else:
                head = f"{width}x{height} -> {w}x{h} - "
            _write_page(tif, level, f"{_LIBRARY} \r\n{head}|{fields}", mpp * width / w, tile_size, quality, k > 0)
            if k == 0:
                th, tw = thumb.shape[:2]
                _write_page(tif, thumb, f"{_LIBRARY} \r\n{width}x{height} -> {tw}x{th} - |{fields}", mpp * width / tw,
                            None, quality, True)  # fmt: skip
    return path


def _write_page(tif, image, description, mpp, tile_size, quality, reduced) -> None:
    pixels_per_cm = 1e4 / mpp
    tif.write(
        image,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        tile=(tile_size, tile_size) if tile_size else None,
        description=description,
        resolution=(pixels_per_cm, pixels_per_cm),
        resolutionunit="CENTIMETER",
        subfiletype=1 if reduced else 0,
        metadata=None,  # keep tifffile's own JSON out of the description: OpenSlide reads the Aperio one
        software=False,
    )
