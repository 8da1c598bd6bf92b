"""Small, fast site fixtures for the manifest, validation, report and scrubber tests: real files, nothing mocked."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST_HEADER = ["case_id", "slide", "report", "time", "event", "response", "split"]

CLEAN_REPORT = (
    "Lung, right upper lobe, lobectomy: invasive adenocarcinoma, acinar predominant pattern. "
    "Tumour size 3.2 cm. Visceral pleura not involved. Margins free of tumour. Lymph nodes 0/12 involved."
)


def write_tiles(folder: Path, n: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A folder of small PNG tiles (a valid slide for fedmusk)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(60, 200, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"tile_{i:03d}.png")
    return folder


def write_manifest(site: Path, rows: list[dict], header: list[str] | None = None, delimiter: str = ",") -> Path:
    header = header or MANIFEST_HEADER
    site.mkdir(parents=True, exist_ok=True)
    path = site / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(h, "") for h in header])
    return path


def row(case_id: str, slide: str, report: str = "", time="12.5", event="1", response="", split="") -> dict:
    return {"case_id": case_id, "slide": slide, "report": report, "time": time, "event": event,
            "response": response, "split": split}


def make_site(root: Path, n_cases: int = 3, seed: int = 0) -> Path:
    """A valid site: n cases, one tile-folder slide and one clean report each; case 0 has a second slide."""
    rows = []
    for i in range(n_cases):
        case = f"C{i:04d}"
        write_tiles(root / "slides" / f"{case}_a", seed=seed + i)
        (root / "reports").mkdir(parents=True, exist_ok=True)
        (root / "reports" / f"{case}.txt").write_text(CLEAN_REPORT, encoding="utf-8")
        rows.append(row(case, f"slides/{case}_a", f"reports/{case}.txt", time=str(6 + 3 * i), event=str(i % 2),
                        split="train"))
    write_tiles(root / "slides" / "C0000_b", seed=seed + 100)
    rows.insert(1, row("C0000", "slides/C0000_b", "reports/C0000.txt", time="6", event="0", split="train"))
    write_manifest(root, rows)
    return root


def write_non_slide_dicom(path: Path, patient_name: str = "DOE^JANE", patient_id: str = "MRN998877",
                          accession: str = "S24-55501") -> Path:
    """A small, valid DICOM CT image: a real DICOM file that is not a whole-slide image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((4, 4), dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_slide(folder: Path, pseudonym: str = "C0001", **patient) -> Path:
    """A real DICOM WSI series (via fedmusk's writer), optionally with patient attributes written into its headers
    as a hospital PACS export would have them (``PatientName="DOE^JANE"``, ``AccessionNumber=...``)."""
    import pydicom

    from fedmusk.data.slides.dicom_wsi import write_dicom_wsi

    rng = np.random.default_rng(1)
    image = rng.integers(80, 220, size=(96, 128, 3), dtype=np.uint8)
    write_dicom_wsi(image, folder, mpp=0.5, tile_size=64, levels=2, pseudonym=pseudonym)
    if patient:
        for file in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(file)
            for key, value in patient.items():
                setattr(ds, key, value)
            ds.save_as(file)
    return folder


def write_tiff_slide(path: Path) -> Path:
    """A small tiled, pyramidal TIFF with its resolution recorded (0.5 microns per pixel)."""
    import tifffile

    rng = np.random.default_rng(2)
    image = rng.integers(80, 220, size=(512, 512, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        options = dict(tile=(256, 256), photometric="rgb", resolutionunit="CENTIMETER", compression="jpeg")
        tif.write(image, subifds=1, resolution=(20000, 20000), **options)
        tif.write(image[::2, ::2], subfiletype=1, resolution=(10000, 10000), **options)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def blank_first_training_slide(site: Path, split: str = "train") -> str:
    """Point the first ``split`` row of a site's manifest at a new, blank (all glass) pyramidal TIFF at 0.5 µm/px, as
    a scan without tissue would be; returns the case id."""
    import tifffile

    path = site / "manifest.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    target = next(r for r in rows if r["split"] == split)
    blank = site / "slides" / "blank-scan.tif"
    blank.parent.mkdir(parents=True, exist_ok=True)
    glass = np.full((512, 512, 3), 246, dtype=np.uint8)
    tifffile.imwrite(blank, glass, tile=(128, 128), compression="jpeg", photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    for r in rows:
        if r["case_id"] == target["case_id"]:
            r["slide"] = "slides/blank-scan.tif"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target["case_id"]
