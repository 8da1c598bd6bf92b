"""Write DICOM VL Whole Slide Microscopy pyramids: from an image in memory, or by converting another slide.

Each pyramid level is one DICOM instance (``level-0.dcm`` is the full resolution, each next level halves it),
organised TILED_FULL, with JPEG baseline frames, so wsidicom, OpenSlide 4 and PACS viewers can read it.

What goes into the files is pseudonymous by construction: the patient ID is the pseudonym the caller gives, the
patient's name, birth date and sex are empty, dates are a fixed placeholder, and label or macro images of a source
slide (which often show the patient's name) are never copied. UIDs are derived from the pixels, the pseudonym and
the seed, so the same input gives byte-identical files and different slides never share UIDs.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import tempfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from fedmusk.data.slides.dicom_dataset import level_dataset, series_uids

_BOT_LIMIT = 2**32  # the Basic Offset Table holds 32-bit offsets; larger levels use the Extended Offset Table
_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA_OB_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"  # (7FE0,0010) OB, undefined length

# (x, y, width, height) in a level's pixels -> (height, width, 3) uint8 RGB
RegionReader = Callable[[int, int, int, int], np.ndarray]


def write_dicom_wsi(
    image: np.ndarray,
    out_dir: str | PathLike[str],
    mpp: float,
    tile_size: int = 256,
    levels: int = 3,
    pseudonym: str = "ANON",
    seed: int = 0,
    *,
    quality: int = 90,
) -> Path:
    """Write ``image`` ((H, W, 3) uint8 RGB at ``mpp`` microns per pixel) as a DICOM WSI series into ``out_dir``.

    Writes up to ``levels`` levels, each half the size of the one before, stopping early once a level fits in one
    tile. ``pseudonym`` becomes the PatientID (and container/specimen identifier; at most 64 characters);
    ``seed`` varies the UIDs for otherwise identical inputs. Files ``level-<k>.dcm`` already in ``out_dir`` are
    replaced. Returns ``out_dir`` (the series folder that :func:`~fedmusk.data.slides.open_slide` opens).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
    pyramid = [image]
    while len(pyramid) < _level_count(image.shape[1], image.shape[0], tile_size, levels):
        pyramid.append(_halve(pyramid[-1]))
    readers = [_array_reader(level) for level in pyramid]
    sizes = [(level.shape[1], level.shape[0]) for level in pyramid]
    return _write_series(out_dir, readers, sizes, mpp, tile_size, pseudonym, seed, quality, "fedmusk array writer")


def convert_to_dicom(
    slide_path: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    pseudonym: str = "ANON",
    tile_size: int = 256,
    levels: int | None = None,
    quality: int = 95,
    seed: int = 0,
) -> Path:
    """Convert any slide :func:`~fedmusk.data.slides.open_slide` reads (an .svs, say) into a DICOM WSI series.

    Level 0 keeps the source's full resolution and pixel spacing; downsampled levels (each half the previous) are
    added until a level fits in one tile, or up to ``levels`` levels. Reads and writes tile by tile, so slides
    larger than memory convert. ``quality`` defaults higher than for fresh images because the source is usually
    JPEG already and each re-encoding loses detail. Only the tissue pyramid is converted, never label or macro
    images. Returns ``out_dir``; raises SlideError when the source cannot be read.
    """
    from fedmusk.data.slides import open_slide
    from fedmusk.data.slides.tiles import level_for_mpp

    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        count = _level_count(width, height, tile_size, levels if levels is not None else 64)
        sizes = [(math.ceil(width / 2**k), math.ceil(height / 2**k)) for k in range(count)]
        readers = []
        for k in range(count):
            src = level_for_mpp(slide, slide.mpp * 2**k)
            readers.append(_resampling_reader(slide, src, 2**k / slide.levels[src].downsample))
        name = "fedmusk converter"
        return _write_series(out_dir, readers, sizes, slide.mpp, tile_size, pseudonym, seed, quality, name)


def _level_count(width: int, height: int, tile_size: int, wanted: int) -> int:
    if wanted < 1:
        raise ValueError(f"levels must be >= 1, got {wanted}")
    count, w, h = 1, width, height
    while count < wanted and (w > tile_size or h > tile_size):
        w, h, count = math.ceil(w / 2), math.ceil(h / 2), count + 1
    return count


def _halve(image: np.ndarray) -> np.ndarray:
    """Exact 2x area reduction; an odd last row/column is averaged with a copy of itself."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    summed = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((summed + 2) // 4).astype(np.uint8)


def _array_reader(level: np.ndarray) -> RegionReader:
    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        return level[y : y + h, x : x + w]

    return read


def _resampling_reader(slide, src_level: int, factor: float) -> RegionReader:
    """Regions of a virtual level ``factor`` times coarser than ``src_level`` of ``slide``, area-averaged."""

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        if factor == 1:
            return slide.read_region(src_level, x, y, w, h)
        sx, sy = round(x * factor), round(y * factor)
        region = slide.read_region(src_level, sx, sy, max(1, round(w * factor)), max(1, round(h * factor)))
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BOX))

    return read


def _write_series(out_dir, readers, sizes, mpp, tile_size, pseudonym, seed, quality, model_name) -> Path:
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_size < 16:
        raise ValueError(f"tile_size must be at least 16, got {tile_size}")
    if not pseudonym or len(pseudonym) > 64 or any(c == "\\" or not c.isprintable() for c in pseudonym):
        raise ValueError(f"pseudonym must be 1 to 64 printable characters without a backslash, got {pseudonym!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("level-*.dcm"):  # a previous, deeper pyramid would otherwise mix with this one
        if stale.name not in {f"level-{k}.dcm" for k in range(len(sizes))}:
            stale.unlink()
    digest = hashlib.sha256(f"{seed}\0{pseudonym}\0{mpp!r}\0{tile_size}".encode())
    with tempfile.TemporaryDirectory(dir=out, prefix=".frames-") as tmp:
        # Frames go to scratch files first: UIDs depend on the compressed pixels, and the header needs the UIDs.
        encoded = []
        for k, (read, (w, h)) in enumerate(zip(readers, sizes, strict=True)):
            frames_path = Path(tmp) / f"level-{k}.frames"
            lengths = _encode_level(read, w, h, tile_size, quality, frames_path, digest)
            encoded.append((frames_path, lengths))
        uids = series_uids(digest.hexdigest())
        for k, ((w, h), (frames_path, lengths)) in enumerate(zip(sizes, encoded, strict=True)):
            ds = level_dataset(
                uids, k, w, h, sizes[0], mpp * 2**k, tile_size, len(lengths), pseudonym, model_name,
                compression_ratio=w * h * 3 / max(1, sum(lengths)),
            )  # fmt: skip
            _write_instance(out / f"level-{k}.dcm", ds, frames_path, lengths)
    return out


def _encode_level(read: RegionReader, width, height, tile_size, quality, frames_path: Path, digest) -> list[int]:
    """JPEG-encode the level's tiles in TILED_FULL order (row by row), padding edge tiles with white."""
    lengths = []
    with frames_path.open("wb") as f:
        for y in range(0, height, tile_size):
            for x in range(0, width, tile_size):
                w, h = min(tile_size, width - x), min(tile_size, height - y)
                tile = np.full((tile_size, tile_size, 3), 255, dtype=np.uint8)
                tile[:h, :w] = read(x, y, w, h)
                buf = io.BytesIO()
                # 4:2:2 chroma subsampling, as the YBR_FULL_422 photometric interpretation declares
                Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling=1)
                frame = buf.getvalue()
                if len(frame) % 2:
                    frame += b"\x00"  # DICOM items have even length; a pad byte after EOI is allowed
                f.write(frame)
                digest.update(frame)
                lengths.append(len(frame))
    return lengths


def _write_instance(path: Path, ds, frames_path: Path, lengths: list[int]) -> None:
    """Write the header with pydicom, then stream the encapsulated pixel data after it.

    Frame offsets go into the Basic Offset Table when they fit in 32 bits, otherwise into the Extended Offset Table.
    """
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64) + 8)[:-1]]).astype(np.int64)
    use_bot = int(offsets[-1]) < _BOT_LIMIT
    if not use_bot:
        ds.ExtendedOffsetTable = offsets.astype("<u8").tobytes()
        ds.ExtendedOffsetTableLengths = np.asarray(lengths, dtype="<u8").tobytes()
    partial = path.with_suffix(".partial")
    ds.save_as(partial, enforce_file_format=True)
    with partial.open("ab") as f, frames_path.open("rb") as frames:
        f.write(_PIXEL_DATA_OB_UNDEFINED)
        table = offsets.astype("<u4").tobytes() if use_bot else b""
        f.write(_ITEM + struct.pack("<I", len(table)) + table)
        for length in lengths:
            f.write(_ITEM + struct.pack("<I", length))
            f.write(frames.read(length))
        f.write(_SEQ_END)
    partial.replace(path)  # a crash never leaves a half-written level under the final name
