"""DICOM VL Whole Slide Microscopy slides, read with wsidicom.

wsidicom skips files it cannot use and says why only in its log, so every DICOM file is first inspected here with
pydicom: is it readable, is it a whole-slide image at all (and not a CT or a secondary capture), does it record its
pixel spacing, and is its pixel data complete (the encapsulated frames are walked to the end, which costs a seek per
frame, not a decode). Each problem becomes a SlideError that names the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmusk.data.errors import SlideError
from fedmusk.data.slides.base import Slide, SlideLevel, valid_mpp

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class DicomFileInfo:
    """What inspecting one DICOM file found."""

    path: Path
    is_wsi: bool
    description: str  # e.g. "CT Image Storage (modality CT)", for messages
    flavor: str = ""  # VOLUME, LABEL, OVERVIEW or THUMBNAIL for whole-slide images
    series_uid: str = ""
    resampled: bool = False  # Image Type value 4 is RESAMPLED: a pyramid level made from a finer one
    mpp: float | None = None  # pixel spacing in microns per pixel (VOLUME instances)


class DicomSlide(Slide):
    """A DICOM WSI series (the VOLUME instances of one slide), ``kind="dicom"``."""

    kind = "dicom"

    def __init__(self, path: Path, wsi, levels: list[SlideLevel], pyramid_levels: list[int]) -> None:
        super().__init__(path, levels)
        self._wsi = wsi
        self._pyramid_levels = pyramid_levels  # our level index -> wsidicom's pyramid level (log2 of downsample)

    @classmethod
    def open(cls, files: list[Path], display: Path) -> DicomSlide:
        """Open the whole-slide image made of ``files`` (named ``display`` in errors about the slide as a whole)."""
        from wsidicom import WsiDicom

        infos = [inspect_dicom_file(f) for f in files]
        volumes = [i for i in infos if i.is_wsi and i.flavor == "VOLUME"]
        if not volumes:
            other = next((i for i in infos if not i.is_wsi), None)
            if other is not None:
                raise SlideError(
                    f"is a DICOM {other.description}, not a VL Whole Slide Microscopy image", path=other.path
                )
            flavors = sorted({i.flavor or "unknown" for i in infos})
            raise SlideError(
                f"holds only whole-slide {'/'.join(flavors).lower()} images, no tissue pyramid (VOLUME) instances",
                path=display,
            )
        if len({v.series_uid for v in volumes}) > 1:
            raise SlideError(
                "holds pyramids of more than one slide (several DICOM series); put each slide in its own folder",
                path=display,
            )
        if all(v.resampled for v in volumes):
            finest = min((v.mpp for v in volumes if v.mpp), default=None)
            at = f" at {finest:.3g} um/px" if finest else ""
            raise SlideError(
                f"DICOM WSI series {volumes[0].series_uid or '(no Series Instance UID)'} is missing its base level "
                f"(level 0, the full-resolution VOLUME instance whose Image Type ends in NONE): only resampled levels"
                f" are present, the finest{at}; copy the whole series from the archive",
                path=display,
            )
        try:
            wsi = WsiDicom.open([v.path for v in volumes])
        except Exception as err:  # noqa: BLE001 - wsidicom's reasons are many; its message says which
            raise SlideError(
                f"wsidicom cannot open this DICOM WSI series ({type(err).__name__}: {err})", path=display
            ) from err
        try:
            ordered = sorted(wsi.levels, key=lambda lv: lv.level)
            base = valid_mpp(ordered[0].mpp.width)
            if base is None:
                raise SlideError("has no usable pixel spacing, so microns per pixel are unknown", path=display)
            levels = []
            for lv in ordered:
                mpp = valid_mpp(lv.mpp.width) or base * 2**lv.level
                levels.append(SlideLevel(int(lv.size.width), int(lv.size.height), mpp, mpp / base))
        except BaseException:
            wsi.close()
            raise
        return cls(display, wsi, levels, [lv.level for lv in ordered])

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        region = self._wsi.read_region((x, y), self._pyramid_levels[level], (width, height), as_array=True)
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=2)
        return np.ascontiguousarray(region[..., :3], dtype=np.uint8)

    def close(self) -> None:
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None


def inspect_dicom_file(path: Path) -> DicomFileInfo:
    """Read ``path``'s header and walk its pixel data; raise SlideError when it is damaged, truncated, or a
    whole-slide image without pixel spacing. Non-slide DICOM files are reported (is_wsi=False), not raised."""
    import pydicom
    from pydicom.uid import UID

    size = os.path.getsize(path)
    try:
        with path.open("rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            pixel_data_at = f.tell()
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for malformed files
        raise SlideError(
            f"is not a readable DICOM file; it is damaged or truncated ({type(err).__name__}: {err})", path=path
        ) from err
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if not sop_class:
        raise SlideError(
            "is not a readable DICOM file: its header has no SOP Class UID, so it is damaged or not a DICOM image",
            path=path,
        )
    if sop_class != WSI_SOP_CLASS:
        return DicomFileInfo(path, False, f"{UID(sop_class).name} (modality {ds.get('Modality') or 'unknown'})")
    _check_pixel_data(path, ds, pixel_data_at, size)  # first: a truncated header also looks like missing attributes
    image_type = list(ds.get("ImageType") or [])
    flavor = str(image_type[2]).upper() if len(image_type) > 2 else ""
    resampled = len(image_type) > 3 and str(image_type[3]).upper() == "RESAMPLED"
    spacing = _pixel_spacing(ds)
    info = DicomFileInfo(path, True, "VL Whole Slide Microscopy image", flavor, str(ds.get("SeriesInstanceUID", "")),
                         resampled, None if spacing is None else spacing * 1000.0)  # fmt: skip
    if flavor == "VOLUME" and spacing is None:
        raise SlideError(
            "has no pixel spacing (Shared Functional Groups > Pixel Measures > Pixel Spacing is missing or zero), "
            "so microns per pixel are unknown",
            path=path,
        )
    return info


def _pixel_spacing(ds) -> float | None:
    for group_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(group_name)
        if not groups:
            continue
        measures = groups[0].get("PixelMeasuresSequence")
        if measures and measures[0].get("PixelSpacing"):
            spacing = measures[0].PixelSpacing
            return valid_mpp(spacing[0]) if len(spacing) else None
    return None


def _check_pixel_data(path: Path, ds, at: int, size: int) -> None:
    frames = int(ds.get("NumberOfFrames") or 1)
    implicit, little = ds.original_encoding
    order = "<" if little in (True, None) else ">"
    with path.open("rb") as f:
        f.seek(at)
        head = f.read(8)
        if len(head) < 8:
            raise SlideError(
                f"is truncated: the file ends ({size} bytes) before its pixel data (was the copy interrupted?)",
                path=path,
            )
        if struct.unpack(order + "HH", head[:4]) != _PIXEL_DATA:
            raise SlideError("has no Pixel Data element (7FE0,0010); it is damaged", path=path)
        if implicit:
            length = struct.unpack(order + "I", head[4:8])[0]
        else:
            length = struct.unpack(order + "I", f.read(4))[0]  # OB/OW: 2 reserved bytes, then a 4-byte length
        start = f.tell()
        if length != _UNDEFINED_LENGTH:  # native (uncompressed) pixels
            samples = int(ds.get("SamplesPerPixel", 1))
            expected = frames * int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8
            if start + min(length, expected) > size or length < expected:
                have = max(0, min(length, size - start))
                raise SlideError(
                    f"is truncated: it holds {have} of the {expected} bytes of pixel data its header announces "
                    f"({size} bytes; was the copy interrupted?)",
                    path=path,
                )
            return
        fragments = -1  # the first item is the Basic Offset Table
        while True:
            item = f.read(8)
            if len(item) < 8:
                break
            group, element, item_length = struct.unpack(order + "HHI", item)
            if (group, element) == _SEQUENCE_END:
                if fragments < frames:
                    raise SlideError(
                        f"is damaged: its pixel data holds {max(fragments, 0)} of the {frames} frames it announces",
                        path=path,
                    )
                return
            if (group, element) != _ITEM:
                raise SlideError(
                    f"is damaged: unexpected data inside its pixel data after {max(fragments, 0)} of {frames} frames",
                    path=path,
                )
            if f.tell() + item_length > size:
                break
            f.seek(item_length, os.SEEK_CUR)
            fragments += 1
        raise SlideError(
            f"is truncated: its pixel data stops after {max(fragments, 0)} of {frames} frames "
            f"({size} bytes; was the copy interrupted?)",
            path=path,
        )
