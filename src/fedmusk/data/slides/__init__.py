"""Open a whole-slide image, whatever the hospital stores it as, behind one small interface.

``open_slide(path)`` looks at the content (not only the name) and picks a backend:

- a DICOM VL Whole Slide Microscopy series (a folder of .dcm files, or one .dcm file) -> wsidicom, ``kind="dicom"``;
- an Aperio .svs or a tiled, pyramidal TIFF -> OpenSlide, ``kind="svs"`` (Aperio) or ``"tiff"`` (anything else);
- a folder of tile images (.png/.jpg), or a single such image -> ``kind="tiles"`` (see :mod:`fedmusk.data.slides.tile_folder`).

Every :class:`Slide` reads RGB regions in a level's own pixel coordinates; parts of a region outside the level come
back white, as the glass background would. Every problem with the data is raised as
:class:`~fedmusk.data.errors.SlideError` naming the file and what is wrong with it.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from fedmusk.data.errors import SlideError
from fedmusk.data.slides.base import Slide, SlideLevel, valid_mpp

__all__ = ["Slide", "SlideLevel", "check_slide", "open_slide", "valid_mpp"]

DICOM_SUFFIXES = {".dcm", ".dicom"}
TIFF_SUFFIXES = {".svs", ".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def open_slide(path: str | PathLike[str]) -> Slide:
    """Open the slide at ``path`` (a DICOM WSI folder or file, an .svs/.tif/.tiff file, or a folder of tiles).

    The backend is chosen by content: DICOM files are recognised by their "DICM" preamble, TIFF by its magic
    number, tiles by their image suffix. Raises SlideError, naming the file, when the path is missing or empty,
    is not a slide (for instance a CT or a plain secondary-capture DICOM), is truncated or damaged, or has no
    pixel spacing (microns per pixel).
    """
    p = Path(path)
    if not p.exists():
        raise SlideError("the slide does not exist (no such file or folder)", path=p)
    if p.is_dir():
        return _open_folder(p)
    if not p.is_file():
        raise SlideError("is neither a file nor a folder", path=p)
    try:
        with p.open("rb") as f:
            head = f.read(132)
    except OSError as err:
        raise SlideError(f"cannot be read ({err.strerror or err})", path=p) from err
    if not head:
        raise SlideError("is an empty file (0 bytes)", path=p)
    suffix = p.suffix.lower()
    if _is_dicom_header(head) or suffix in DICOM_SUFFIXES:
        from fedmusk.data.slides.dicom import DicomSlide

        return DicomSlide.open([p], display=p)
    if head[:4] in _TIFF_MAGIC:
        from fedmusk.data.slides.tiff import TiffSlide

        return TiffSlide.open(p)
    if suffix in TIFF_SUFFIXES:
        raise SlideError(
            f"is named like a {suffix} slide but its content is not TIFF (no TIFF header); the file is damaged "
            "or not a slide",
            path=p,
        )
    if suffix in IMAGE_SUFFIXES:
        from fedmusk.data.slides.tile_folder import TileFolderSlide

        return TileFolderSlide.open(p, [p])
    raise SlideError(
        "is not a recognised slide format (expected DICOM WSI, .svs/.tif/.tiff, or a folder of .png/.jpg tiles)",
        path=p,
    )


def check_slide(path: str | PathLike[str]) -> None:
    """Prove the slide at ``path`` is usable: open it (header and pyramid checks, including truncation) and read a
    small region from the middle of every level. Returns None; raises SlideError naming the file and the problem.
    """
    with open_slide(path) as slide:
        for i, lv in enumerate(slide.levels):
            w, h = min(64, lv.width), min(64, lv.height)
            slide.read_region(i, (lv.width - w) // 2, (lv.height - h) // 2, w, h)
        deep_check = getattr(slide, "verify_all", None)  # backends that can afford to decode everything do so
        if deep_check is not None:
            deep_check()


def _open_folder(folder: Path) -> Slide:
    try:
        entries = sorted(e for e in folder.iterdir() if e.is_file() and not e.name.startswith("."))
    except OSError as err:
        raise SlideError(f"the slide folder cannot be listed ({err.strerror or err})", path=folder) from err
    dicom_files = [e for e in entries if e.suffix.lower() in DICOM_SUFFIXES or _looks_like_dicom(e)]
    if dicom_files:
        from fedmusk.data.slides.dicom import DicomSlide

        return DicomSlide.open(dicom_files, display=folder)
    images = [e for e in entries if e.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        from fedmusk.data.slides.tile_folder import TileFolderSlide

        return TileFolderSlide.open(folder, images)
    if not entries:
        raise SlideError("the slide folder is empty (expected DICOM WSI files or .png/.jpg tiles)", path=folder)
    raise SlideError(
        f"the slide folder holds {len(entries)} file(s) but no DICOM files and no .png/.jpg tiles", path=folder
    )


def _is_dicom_header(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return _is_dicom_header(f.read(132))
    except OSError:
        return False
