"""Opening slides of every supported kind, and refusing damaged or wrong inputs with a message naming the file."""

import pickle
import shutil

import numpy as np
import pydicom
import pytest
from _slides_helpers import (
    CT_IMAGE_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    real_svs,
    tissue_image,
    truncate,
    write_plain_dicom,
    write_tiled_tiff,
)
from PIL import Image

from fedmusk.data.errors import SiteDataError, SlideError
from fedmusk.data.slides import check_slide, open_slide
from fedmusk.data.slides.dicom_wsi import write_dicom_wsi
from fedmusk.data.slides.tissue import tissue_mask


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory):
    """A three-level DICOM WSI series (480x320 at 0.25 µm/px, 128-pixel tiles)."""
    return write_dicom_wsi(tissue_image(320, 480), tmp_path_factory.mktemp("wsi") / "slide", mpp=0.25, tile_size=128)


@pytest.fixture
def series_copy(dicom_series, tmp_path):
    return shutil.copytree(dicom_series, tmp_path / "copy")


def _error(path) -> str:
    with pytest.raises(SlideError) as info:
        check_slide(path)
    return str(info.value)


# --- the real Aperio SVS --------------------------------------------------------------------------------------------


def test_real_svs_opens_as_aperio_with_its_recorded_resolution():
    with open_slide(real_svs()) as slide:
        assert slide.kind == "svs"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert [(lv.width, lv.height, lv.downsample) for lv in slide.levels] == [(2220, 2967, 1.0)]


def test_real_svs_regions_are_rgb_and_white_past_the_edge():
    with open_slide(real_svs()) as slide:
        region = slide.read_region(0, 1000, 1000, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8
        outside = slide.read_region(0, 2200, 2950, 40, 40)
        assert (outside[20:, :] == 255).all() and (outside[:, 20:] == 255).all()
        assert (outside[:17, :20] < 255).any()  # the part inside the slide is real pixels


def test_real_svs_thumbnail_keeps_aspect_and_shows_a_sane_amount_of_tissue():
    with open_slide(real_svs()) as slide:
        thumb = slide.thumbnail(600)
    assert thumb.shape == (600, 449, 3)
    assert 0.2 < tissue_mask(thumb).mean() < 0.6  # a strip of skin on glass


def test_check_slide_accepts_the_real_svs():
    check_slide(real_svs())


# --- damaged and wrong TIFF/SVS files -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.9999])
def test_truncated_svs_is_reported_as_truncated(tmp_path, keep):
    path = truncate(shutil.copy(real_svs(), tmp_path / "slide.svs"), keep)
    message = _error(path)
    assert str(path) in message and "truncated" in message


def test_truncated_tiled_tiff_says_tiles_are_missing(tmp_path):
    path = truncate(write_tiled_tiff(tmp_path / "slide.tif", tissue_image(384, 512), mpp=0.5), 0.6)
    message = _error(path)
    assert str(path) in message and "truncated" in message and "tiles" in message


def test_random_bytes_named_svs_is_not_a_slide(tmp_path):
    path = tmp_path / "scan.svs"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = _error(path)
    assert str(path) in message and "not TIFF" in message


def test_tiff_without_resolution_is_refused_for_unknown_microns_per_pixel(tmp_path):
    path = write_tiled_tiff(tmp_path / "slide.tif", tissue_image(256, 256), mpp=None)
    message = _error(path)
    assert str(path) in message and "resolution" in message and "microns per pixel" in message


def test_generic_tiled_tiff_takes_its_resolution_from_the_tiff_tags(tmp_path):
    image = tissue_image(256, 384)
    with open_slide(write_tiled_tiff(tmp_path / "slide.tif", image, mpp=0.25)) as slide:
        assert slide.kind == "tiff"
        assert slide.mpp == pytest.approx(0.25)
        assert np.abs(slide.read_region(0, 0, 0, 384, 256).astype(int) - image).mean() < 4  # JPEG


# --- paths that are not slides --------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    path = tmp_path / "nowhere" / "slide.svs"
    message = _error(path)
    assert str(path) in message and "does not exist" in message


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "slide").mkdir()
    message = _error(tmp_path / "slide")
    assert str(tmp_path / "slide") in message and "empty" in message


def test_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    assert "no DICOM files and no .png/.jpg tiles" in _error(tmp_path)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "slide.svs")


# --- DICOM WSI ------------------------------------------------------------------------------------------------------


def test_dicom_series_folder_and_single_level_file_both_open(dicom_series):
    with open_slide(dicom_series) as slide:
        assert slide.kind == "dicom" and len(slide.levels) == 3
    with open_slide(dicom_series / "level-0.dcm") as slide:
        assert slide.kind == "dicom" and slide.dimensions == (480, 320) and slide.mpp == pytest.approx(0.25)
    check_slide(dicom_series)
    with pytest.raises(SlideError, match="missing its base level"):  # a resampled level alone is not the slide
        open_slide(dicom_series / "level-1.dcm")


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated_dicom_level_is_reported_as_truncated(series_copy, keep):
    level = truncate(series_copy / "level-0.dcm", keep)
    for path in (series_copy, level):  # whether the folder or the file is named in the manifest
        message = _error(path)
        assert str(level) in message and "truncated" in message


def test_garbage_dcm_file_is_not_readable_dicom(tmp_path):
    path = tmp_path / "slide.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + np.random.default_rng(1).bytes(300))
    message = _error(path)
    assert str(path) in message and "not a readable DICOM file" in message


@pytest.mark.parametrize(
    ("sop_class", "modality", "described"),
    [(CT_IMAGE_STORAGE, "CT", "CT Image Storage"), (SECONDARY_CAPTURE_STORAGE, "OT", "Secondary Capture")],
)
def test_dicom_that_is_not_a_whole_slide_image_is_refused(tmp_path, sop_class, modality, described):
    path = write_plain_dicom(tmp_path / "image.dcm", sop_class, modality)
    for named in (path, tmp_path):
        message = _error(named)
        assert str(path) in message and described in message and "not a VL Whole Slide Microscopy image" in message


def test_non_slide_dicom_beside_a_slide_series_is_ignored(series_copy):
    write_plain_dicom(series_copy / "report.dcm", SECONDARY_CAPTURE_STORAGE, "OT")
    with open_slide(series_copy) as slide:
        assert len(slide.levels) == 3


def test_dicom_slide_without_pixel_spacing_is_refused(series_copy):
    path = series_copy / "level-0.dcm"
    ds = pydicom.dcmread(path)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    ds.save_as(path)
    message = _error(series_copy)
    assert str(path) in message and "pixel spacing" in message and "microns per pixel" in message


def test_two_slides_in_one_folder_are_refused(tmp_path, dicom_series):
    shutil.copy(dicom_series / "level-0.dcm", tmp_path / "a.dcm")
    write_dicom_wsi(tissue_image(200, 200, seed=3), tmp_path / "other", mpp=0.25, levels=1)
    shutil.copy(tmp_path / "other" / "level-0.dcm", tmp_path / "b.dcm")
    assert "more than one slide" in _error(tmp_path)


# --- folders of tiles -----------------------------------------------------------------------------------------------


def test_folder_of_tiles_opens_as_a_mosaic_in_name_order(tmp_path):
    tiles = [np.full((64, 80, 3), value, dtype=np.uint8) for value in (10, 20, 30)]
    for name, tile in zip(("b.png", "a.jpg", "c.png"), tiles, strict=True):
        Image.fromarray(tile).save(tmp_path / name, quality=100)
    with open_slide(tmp_path) as slide:
        assert slide.kind == "tiles" and slide.mpp == 0.5  # no resolution recorded: the documented default
        assert slide.image_boxes == [(0, 0, 80, 64), (80, 0, 80, 64), (0, 64, 80, 64)]
        assert abs(int(slide.read_region(0, 10, 10, 4, 4).mean()) - 20) <= 1  # a.jpg comes first
        assert (slide.read_region(0, 80, 64, 80, 64) == 255).all()  # the empty cell is white
    check_slide(tmp_path)


def test_tile_resolution_recorded_in_the_image_is_used(tmp_path):
    Image.fromarray(tissue_image(64, 64)).save(tmp_path / "t.png", dpi=(25400 / 0.25, 25400 / 0.25))
    with open_slide(tmp_path) as slide:
        assert slide.mpp == pytest.approx(0.25, rel=1e-3)


def test_truncated_tile_image_fails_the_slide_check(tmp_path):
    Image.fromarray(tissue_image(256, 256)).save(tmp_path / "t0.jpg")
    Image.fromarray(tissue_image(256, 256, seed=1)).save(tmp_path / "t1.jpg")
    truncate(tmp_path / "t1.jpg", 0.5)
    message = _error(tmp_path)
    assert str(tmp_path / "t1.jpg") in message and "truncated" in message


# --- the error type itself ------------------------------------------------------------------------------------------


def test_site_data_error_names_row_field_and_path_and_survives_pickling():
    err = SiteDataError("must be 0 or 1", path="slides/a.svs", row=3, field="event")
    assert str(err) == "manifest row 3, field 'event', slides/a.svs: must be 0 or 1"
    again = pickle.loads(pickle.dumps(SlideError("is truncated", path="x.svs")))
    assert isinstance(again, SlideError) and str(again) == "x.svs: is truncated" and again.path == "x.svs"
    assert str(SiteDataError("no manifest")) == "no manifest"
