"""DICOM headers: is a file a whole-slide image with an intact header, and which values in it identify a patient.

Only headers are read (``stop_before_pixels``), so this is cheap even for large series; reading the pixel data is
:func:`fedmusk.data.slides.check_slide`'s job.
"""

from __future__ import annotations

import warnings
from pathlib import Path

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_WSI_REQUIRED = ("Rows", "Columns", "TotalPixelMatrixColumns", "TotalPixelMatrixRows")
# DICOM attributes that identify a patient, a study or a specimen (values are removed wherever they appear).
_DICOM_PERSON_NAMES = (
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "ReferringPhysicianName",
    "PhysiciansOfRecord", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician",
)
_DICOM_VALUES = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "ContainerIdentifier", "SpecimenIdentifier", "StudyDate", "SeriesDate",
    "AcquisitionDateTime", "ContentDate", "InstitutionName", "InstitutionAddress", "DeviceSerialNumber",
    "MedicalRecordLocator",
)
_DICOM_SEQUENCES = ("SpecimenDescriptionSequence", "OtherPatientIDsSequence", "IssuerOfTheContainerIdentifierSequence")


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` starts like a DICOM file (128-byte preamble, then "DICM")."""
    try:
        with Path(path).open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    return Path(path).suffix.lower() in (".dcm", ".dicom") or has_dicom_preamble(path)


def wsi_header_problem(path: Path) -> str | None:
    """Why the DICOM file at ``path`` is not a usable whole-slide image instance, judged from its header; None when
    the header is intact and says VL Whole Slide Microscopy."""
    from pydicom.uid import UID

    try:
        ds = _read_header(path)
    except Exception as err:  # noqa: BLE001 - pydicom raises several types for damaged headers
        return f"DICOM header is damaged or truncated ({type(err).__name__})"
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class:
        # pydicom stops quietly at the end of a cut-off file, so a missing SOP Class is the tell-tale sign.
        return "DICOM header is damaged or truncated (it ends before the SOP Class UID)"
    if sop_class != WSI_SOP_CLASS:
        return f"is a DICOM '{UID(sop_class).name}', not a whole-slide image (VL Whole Slide Microscopy Image Storage)"
    missing = [k for k in _WSI_REQUIRED if k not in ds]
    if missing:
        return f"DICOM header is damaged or truncated (missing {', '.join(missing)})"
    return None


def dicom_patient_values(path: str | Path) -> tuple[list[str], list[str]]:
    """(identifying values, person names) from the headers of the DICOM file(s) at ``path`` (a .dcm file or a
    folder). Anything that is not DICOM, or cannot be read, yields nothing."""
    path = Path(path)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    except OSError:
        return [], []
    values: list[str] = []
    names: list[str] = []
    for file in files:
        if not has_dicom_preamble(file):
            continue
        try:
            _collect_dicom(_read_header(file), values, names)
        except Exception:  # noqa: BLE001 - damaged headers are validation's business, not the scrubber's
            continue
    return values, names


def _collect_dicom(ds, values: list[str], names: list[str]) -> None:
    for keyword in _DICOM_PERSON_NAMES:
        names.extend(_dicom_strings(ds.get(keyword)))
    for keyword in _DICOM_VALUES:
        values.extend(_dicom_strings(ds.get(keyword)))
    for keyword in _DICOM_SEQUENCES:
        for item in ds.get(keyword) or []:
            _collect_dicom(item, values, names)


def _dicom_strings(value) -> list[str]:
    """``Dataset.get(keyword)`` gives the value itself: a string, a PersonName, or a multi-value list of them."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [str(v) for v in items if str(v).strip()]


def _read_header(path: Path):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about oddities; only failures matter to callers
        return pydicom.dcmread(path, stop_before_pixels=True)
