"""Aperio .svs and tiled pyramidal TIFF slides, read with OpenSlide.

OpenSlide says little more than "unsupported or missing image file" about a damaged file, so before handing the
file to it we look at the TIFF structure ourselves (the directory chain, then tile offsets with tifffile) and say
what is actually wrong: a directory, tag value or tile past the end of the file means the file was truncated (an
interrupted copy, usually).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np

from fedmusk.data.errors import SlideError
from fedmusk.data.slides.base import Slide, SlideLevel, valid_mpp

_UNIT_TO_MICRONS = {"centimeter": 1e4, "inch": 25400.0}
# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, SLONG8, IFD8).
_TIFF_TYPE_SIZES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8
}  # fmt: skip


class TiffSlide(Slide):
    """An .svs or tiled TIFF slide. ``kind`` is "svs" when OpenSlide recognises it as Aperio, otherwise "tiff"."""

    def __init__(self, path: Path, osr, levels: list[SlideLevel], kind: str) -> None:
        super().__init__(path, levels)
        self._osr = osr
        self.kind = kind

    @classmethod
    def open(cls, path: Path) -> TiffSlide:
        """Open ``path`` with OpenSlide; raises SlideError for truncated, damaged, unsupported or unscaled files."""
        import openslide

        _check_tiff_structure(path)
        try:
            osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            raise SlideError(
                "is a TIFF that OpenSlide cannot read as a slide (it needs a tiled TIFF, ideally pyramidal, or an "
                f"Aperio .svs; plain striped TIFF images are not supported): {err}",
                path=path,
            ) from err
        except openslide.OpenSlideError as err:
            raise SlideError(f"is a damaged TIFF/SVS file: {err}", path=path) from err
        try:
            mpp = _mpp_from_properties(osr.properties)
            if mpp is None:
                raise SlideError(
                    "has no resolution: neither the Aperio MPP field nor the TIFF X/YResolution with a "
                    "centimetre or inch unit is recorded, so microns per pixel are unknown",
                    path=path,
                )
            levels = [
                SlideLevel(int(w), int(h), mpp * float(ds), float(ds))
                for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples, strict=True)
            ]
            kind = "svs" if osr.properties.get("openslide.vendor") == "aperio" else "tiff"
        except BaseException:
            osr.close()
            raise
        return cls(path, osr, levels, kind)

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.levels[level].downsample
        # OpenSlide wants the top-left corner in level-0 pixels.
        rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        alpha = rgba[..., 3:4].astype(np.uint16)
        if bool((alpha == 255).all()):
            return np.ascontiguousarray(rgba[..., :3])
        # Areas without scanned tiles are transparent; show them as white glass, like the rest of the background.
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None


def _mpp_from_properties(props) -> float | None:
    mpp_x, mpp_y = valid_mpp(props.get("openslide.mpp-x")), valid_mpp(props.get("openslide.mpp-y"))
    if mpp_x is not None:
        return mpp_x if mpp_y is None else (mpp_x + mpp_y) / 2
    # OpenSlide may leave mpp unset for generic TIFFs; XResolution is pixels per unit.
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    res = valid_mpp(props.get("tiff.XResolution"))
    if unit in _UNIT_TO_MICRONS and res is not None:
        return _UNIT_TO_MICRONS[unit] / res
    return None


def _check_tiff_structure(path: Path) -> None:
    """Raise SlideError when the TIFF's first directory or any page's pixel data lies beyond the end of the file."""
    import tifffile

    size = os.path.getsize(path)
    _walk_directories(path, size)
    logger = logging.getLogger("tifffile")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)  # tifffile logs every broken directory; we report the outcome ourselves
    try:
        with tifffile.TiffFile(path) as tif:
            # Pyramid levels stored as SubIFDs are not in tif.pages; the series know about them.
            pages = {page.offset: page for page in tif.pages}
            for series in tif.series:
                for level in series.levels:
                    pages.update((page.offset, page) for page in level.pages if page is not None)
            for index, page in enumerate(pages.values()):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                ends = offsets + np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int(ends.max()) > size:
                    raise SlideError(
                        f"is truncated: {int((ends > size).sum())} of {offsets.size} tiles/strips of image {index} "
                        f"lie beyond the end of the file ({size} bytes; was the copy interrupted?)",
                        path=path,
                    )
                if any(tag.valueoffset + tag.valuebytecount > size for tag in page.tags.values()):
                    raise SlideError(
                        f"is truncated: metadata of image {index} lies beyond the end of the file ({size} bytes)",
                        path=path,
                    )
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile's own error says what is malformed
        raise SlideError(f"is a damaged TIFF file ({type(err).__name__}: {err})", path=path) from err
    finally:
        logger.setLevel(previous)


def _walk_directories(path: Path, size: int) -> None:
    """Follow the chain of TIFF directories (IFDs); one that starts or ends past the end of the file means truncation.

    tifffile quietly drops such directories, and OpenSlide just calls the file unsupported, hence this walk.
    """
    with path.open("rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        bigtiff = head[2:4] in (b"+\x00", b"\x00+")
        # Classic TIFF: 2-byte entry count, 12-byte entries, 4-byte next offset; BigTIFF: 8, 20 and 8 bytes.
        count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if bigtiff else ("H", 12, "I")
        offset_size = struct.calcsize(offset_fmt)
        if len(head) < (16 if bigtiff else 8):
            raise SlideError(f"is truncated: only {size} bytes, too short to hold a TIFF header", path=path)
        offset = struct.unpack(order + offset_fmt, head[8:16] if bigtiff else head[4:8])[0]
        seen: set[int] = set()
        index = 0
        while offset and offset not in seen:
            seen.add(offset)
            f.seek(offset)
            raw = f.read(struct.calcsize(count_fmt))
            end = None
            if len(raw) == struct.calcsize(count_fmt):
                n = struct.unpack(order + count_fmt, raw)[0]
                end = offset + len(raw) + n * entry_size + offset_size
            if end is None or end > size:
                raise SlideError(
                    f"is truncated: TIFF directory {index} (at byte {offset}) runs past the end of the file "
                    f"({size} bytes; was the copy interrupted?)",
                    path=path,
                )
            entries = f.read(n * entry_size + offset_size)
            for e in range(n):  # out-of-line tag values (descriptions, tile offsets) must lie inside the file too
                tag_type, count, value = struct.unpack_from(order + "2x H" + offset_fmt * 2, entries, e * entry_size)
                nbytes = _TIFF_TYPE_SIZES.get(tag_type, 1) * count
                if nbytes > offset_size and value + nbytes > size:
                    raise SlideError(
                        f"is truncated: metadata of TIFF directory {index} lies beyond the end of the file "
                        f"({size} bytes; was the copy interrupted?)",
                        path=path,
                    )
            offset = struct.unpack_from(order + offset_fmt, entries, n * entry_size)[0]
            index += 1
