"""The DICOM header of one level of a VL Whole Slide Microscopy pyramid, as written by :mod:`fedmusk.data.slides.dicom_wsi`.

Attributes follow the VL Whole Slide Microscopy Image IOD (PS3.3 A.32.8): patient and study modules carry only the
pseudonym and empty values, the image is TILED_FULL with shared functional groups, one brightfield optical path
with an sRGB ICC profile, and one specimen on one slide.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# Fixed placeholders: real acquisition dates are not needed and would make the output differ run to run.
_PLACEHOLDER_DATE, _PLACEHOLDER_TIME = "20000101", "000000"
_UID_NAMESPACE = uuid.UUID("6f0e4c1a-5d1b-4a57-9a43-2f7c1f3b8e21")  # fixed, so UIDs are reproducible across runs


@dataclass(frozen=True)
class SeriesUids:
    study: str
    series: str
    frame_of_reference: str
    dimension_organization: str
    specimen: str
    seed: str  # instance UIDs are derived from this and the level index

    def instance(self, level: int) -> str:
        return _uid(self.seed, f"instance-{level}")


def series_uids(seed: str) -> SeriesUids:
    """UIDs for one series, derived deterministically from ``seed``."""
    roles = ("study", "series", "frame-of-reference", "dimension-organization", "specimen")
    return SeriesUids(*(_uid(seed, role) for role in roles), seed)


def _uid(seed: str, role: str) -> str:
    """A name-based UUID (RFC 4122 version 5) in the UUID-derived UID form 2.25.<integer> (PS3.5 B.2), which needs no
    registered organisation root. (pydicom's generate_uid ignores its entropy sources in this form.)"""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{seed}/{role}').int}"


def level_dataset(
    uids: SeriesUids,
    level: int,
    width: int,
    height: int,
    base_size: tuple[int, int],
    mpp: float,
    tile_size: int,
    frames: int,
    pseudonym: str,
    model_name: str,
    *,
    compression_ratio: float,
) -> Dataset:
    """The header (everything but Pixel Data) of pyramid level ``level``: ``width`` x ``height`` pixels at ``mpp``."""
    from fedmusk import __version__

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = uids.instance(level)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = uids.instance(level)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids.study, uids.series
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids.frame_of_reference, "SLIDE_CORNER"
    ds.Modality = "SM"

    # Patient and study: the pseudonym and nothing else.
    ds.PatientID = pseudonym
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime = _PLACEHOLDER_DATE, _PLACEHOLDER_TIME
    ds.SeriesDate, ds.SeriesTime = _PLACEHOLDER_DATE, _PLACEHOLDER_TIME
    ds.ContentDate, ds.ContentTime = _PLACEHOLDER_DATE, _PLACEHOLDER_TIME
    ds.AcquisitionDateTime = _PLACEHOLDER_DATE + _PLACEHOLDER_TIME
    ds.SeriesNumber, ds.InstanceNumber = 1, level + 1

    ds.Manufacturer, ds.ManufacturerModelName = "fedmusk", model_name
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", __version__

    # Image pixel description: 8-bit RGB, JPEG baseline (which stores YCbCr 4:2:2).
    if level == 0:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    else:
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = tile_size
    ds.NumberOfFrames = frames
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{compression_ratio:.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.BurnedInAnnotation, ds.SpecimenLabelInImage = "NO", "NO"
    ds.VolumetricProperties, ds.FocusMethod, ds.ExtendedDepthOfField = "VOLUME", "AUTO", "NO"

    # Whole-slide geometry: the pixel matrix, its placement on the slide and the pixel spacing (mm, row then column).
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=uids.dimension_organization)])
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = width, height, 1
    ds.NumberOfOpticalPaths = 1
    spacing_mm = mpp / 1000.0
    base_mpp_mm = spacing_mm / 2**level
    ds.ImagedVolumeWidth = round(base_size[0] * base_mpp_mm, 6)
    ds.ImagedVolumeHeight = round(base_size[1] * base_mpp_mm, 6)
    ds.ImagedVolumeDepth = 0.001
    ds.TotalPixelMatrixOriginSequence = Sequence(
        [_item(XOffsetInSlideCoordinateSystem=0.0, YOffsetInSlideCoordinateSystem=0.0)]
    )
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                PixelMeasuresSequence=Sequence(
                    [
                        _item(
                            PixelSpacing=[_ds(spacing_mm), _ds(spacing_mm)],
                            SliceThickness=0.001,
                            SpacingBetweenSlices=0.001,
                        )
                    ]
                ),
                WholeSlideMicroscopyImageFrameTypeSequence=Sequence([_item(FrameType=list(ds.ImageType))]),
                OpticalPathIdentificationSequence=Sequence([_item(OpticalPathIdentifier="1")]),
            )
        ]
    )

    ds.OpticalPathSequence = Sequence(
        [
            _item(
                OpticalPathIdentifier="1",
                OpticalPathDescription="brightfield",
                IlluminationTypeCodeSequence=Sequence([_code("111744", "DCM", "Brightfield illumination")]),
                IlluminationColorCodeSequence=Sequence([_code("414298005", "SCT", "Full Spectrum")]),
                ICCProfile=_srgb_profile(),
                ColorSpace="SRGB",
            )
        ]
    )

    # Specimen: one slide, identified only by the pseudonym.
    ds.ContainerIdentifier = pseudonym
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    ds.AcquisitionContextSequence = Sequence()
    ds.SpecimenDescriptionSequence = Sequence(
        [
            _item(
                SpecimenIdentifier=pseudonym,
                SpecimenUID=uids.specimen,
                IssuerOfTheSpecimenIdentifierSequence=Sequence(),
                SpecimenPreparationSequence=Sequence(),
            )
        ]
    )
    return ds


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _ds(value: float) -> str:
    """``value`` as a Decimal String: at most 16 characters, as many significant digits as fit."""
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DICOM decimal string")


_SRGB: bytes | None = None


def _srgb_profile() -> bytes:
    global _SRGB
    if _SRGB is None:
        from PIL import ImageCms

        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _SRGB
