"""Writing DICOM VL Whole Slide Microscopy pyramids that other readers accept, and converting the real SVS."""

import numpy as np
import pydicom
import pytest
from _slides_helpers import WSI_SOP_CLASS, real_svs, tissue_image
from pydicom.uid import JPEGBaseline8Bit
from wsidicom import WsiDicom

import fedmusk.data.slides.dicom_wsi as dicom_wsi
from fedmusk.data.slides import open_slide
from fedmusk.data.slides.dicom_wsi import convert_to_dicom, write_dicom_wsi
from fedmusk.data.slides.tiles import TileCoord, read_tile, tile_grid

JPEG_MEAN_ERROR = 4.0  # mean absolute difference per channel that JPEG at quality 90 stays well within
# Re-encoding dense, textured real tissue costs more: 4 to 5 for a tile of skin at quality 95, chroma 4:2:2.
TISSUE_JPEG_MEAN_ERROR = 7.0


def _halve(image):
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(float)
    return (padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]) / 4


@pytest.fixture(scope="module")
def image():
    return tissue_image(600, 700)


@pytest.fixture(scope="module")
def series(image, tmp_path_factory):
    return write_dicom_wsi(image, tmp_path_factory.mktemp("wsi") / "s", mpp=0.25, tile_size=128, levels=3,
                           pseudonym="SITE1-0042")  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_to_dicom(real_svs(), tmp_path_factory.mktemp("conv") / "svs", pseudonym="SITE1-0007")


def test_written_pyramid_opens_in_wsidicom_with_halving_levels_and_pixel_spacing(series):
    wsi = WsiDicom.open(series)
    try:
        got = [(lv.level, lv.size.width, lv.size.height, lv.mpp.width) for lv in wsi.levels]
    finally:
        wsi.close()
    assert got == [(0, 700, 600, 0.25), (1, 350, 300, 0.5), (2, 175, 150, 1.0)]


def test_written_pixels_read_back_within_jpeg_tolerance_at_every_level(series, image):
    expected = image.astype(float)
    with open_slide(series) as slide:
        for i, lv in enumerate(slide.levels):
            got = slide.read_region(i, 0, 0, lv.width, lv.height).astype(float)
            assert got.shape == expected.shape
            assert np.abs(got - expected).mean() < JPEG_MEAN_ERROR, f"level {i}"
            expected = _halve(expected)


def test_written_files_are_standard_tiled_full_jpeg_wsi_that_pydicom_decodes(series, image):
    ds = pydicom.dcmread(series / "level-0.dcm")
    assert ds.SOPClassUID == WSI_SOP_CLASS and ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.DimensionOrganizationType == "TILED_FULL" and ds.Modality == "SM"
    assert ds.NumberOfFrames == 6 * 5 and (ds.Rows, ds.Columns) == (128, 128)
    frames = ds.pixel_array  # pydicom walks the encapsulation and decodes every frame
    assert frames.shape == (30, 128, 128, 3)
    assert np.abs(frames[0].astype(float) - image[:128, :128]).mean() < JPEG_MEAN_ERROR


def test_written_headers_pass_pydicom_strict_value_validation(image, tmp_path, monkeypatch):
    from pydicom import config

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    out = write_dicom_wsi(image[:200, :300], tmp_path / "s", mpp=0.2527, tile_size=128, levels=2, pseudonym="S-1")
    ds = pydicom.dcmread(out / "level-1.dcm")
    assert [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [
        pytest.approx(0.0005054)
    ] * 2


def test_written_files_carry_the_pseudonym_and_no_patient_details(series):
    levels = [pydicom.dcmread(series / f"level-{k}.dcm", stop_before_pixels=True) for k in range(3)]
    for ds in levels:
        assert ds.PatientID == "SITE1-0042"
        assert str(ds.PatientName) == "" and ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert ds.ContainerIdentifier == "SITE1-0042"
    assert len({ds.StudyInstanceUID for ds in levels}) == len({ds.SeriesInstanceUID for ds in levels}) == 1
    assert len({ds.SOPInstanceUID for ds in levels}) == 3
    assert all(str(ds.SOPInstanceUID).startswith("2.25.") for ds in levels)


def test_writing_is_reproducible_and_the_seed_changes_the_uids(image, tmp_path):
    small = image[:200, :300]
    a = write_dicom_wsi(small, tmp_path / "a", mpp=0.5, levels=2, tile_size=128)
    b = write_dicom_wsi(small, tmp_path / "b", mpp=0.5, levels=2, tile_size=128)
    c = write_dicom_wsi(small, tmp_path / "c", mpp=0.5, levels=2, tile_size=128, seed=1)
    assert (a / "level-0.dcm").read_bytes() == (b / "level-0.dcm").read_bytes()
    uid = lambda d: pydicom.dcmread(d / "level-0.dcm", stop_before_pixels=True).SeriesInstanceUID  # noqa: E731
    assert uid(a) != uid(c)
    assert sorted(p.name for p in a.iterdir()) == ["level-0.dcm", "level-1.dcm"]  # no scratch files left behind


def test_levels_stop_once_a_level_fits_in_one_tile(tmp_path):
    out = write_dicom_wsi(tissue_image(100, 150), tmp_path / "s", mpp=0.5, tile_size=64, levels=10)
    with open_slide(out) as slide:
        assert [(lv.width, lv.height) for lv in slide.levels] == [(150, 100), (75, 50), (38, 25)]


def test_extended_offset_table_is_used_when_offsets_outgrow_32_bits(image, tmp_path, monkeypatch):
    monkeypatch.setattr(dicom_wsi, "_BOT_LIMIT", 0)  # pretend every level is larger than 4 GiB
    out = write_dicom_wsi(image[:300, :300], tmp_path / "s", mpp=0.5, tile_size=128, levels=1)
    assert "ExtendedOffsetTable" in pydicom.dcmread(out / "level-0.dcm", stop_before_pixels=True)
    with open_slide(out) as slide:
        assert np.abs(slide.read_region(0, 0, 0, 300, 300).astype(float) - image[:300, :300]).mean() < JPEG_MEAN_ERROR


def test_openslide_reads_the_written_pyramid_too(series):
    import openslide

    with openslide.OpenSlide(str(series / "level-0.dcm")) as osr:
        assert osr.dimensions == (700, 600) and osr.level_count == 3
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_rejects_images_that_are_not_rgb(tmp_path):
    with pytest.raises(ValueError, match="RGB"):
        write_dicom_wsi(np.zeros((64, 64), dtype=np.uint8), tmp_path / "s", mpp=0.5)


# --- the real SVS, converted ----------------------------------------------------------------------------------------


def test_converted_svs_keeps_size_and_resolution_and_gains_levels(converted):
    with open_slide(converted) as slide:
        assert slide.kind == "dicom"
        assert slide.dimensions == (2220, 2967) and slide.mpp == pytest.approx(0.499)
        assert [lv.downsample for lv in slide.levels] == [1, 2, 4, 8, 16]
        assert slide.levels[1].mpp == pytest.approx(0.998)
    assert sorted(p.name for p in converted.iterdir()) == [f"level-{k}.dcm" for k in range(5)]  # no label/macro
    ds = pydicom.dcmread(converted / "level-0.dcm", stop_before_pixels=True)
    assert ds.PatientID == "SITE1-0007" and str(ds.PatientName) == ""


def test_converted_svs_has_the_same_pixels_within_jpeg_tolerance(converted):
    with open_slide(converted) as dcm, open_slide(real_svs()) as svs:
        a = dcm.read_region(0, 0, 0, 2220, 2967).astype(float)
        b = svs.read_region(0, 0, 0, 2220, 2967).astype(float)
        assert np.abs(a - b).mean() < JPEG_MEAN_ERROR
        coarse = dcm.read_region(2, 0, 0, 555, 742).astype(float)
        assert np.abs(coarse - _halve(_halve(b))[:742, :555]).mean() < JPEG_MEAN_ERROR


def test_converted_svs_gives_the_same_tile_grid_and_tiles(converted):
    with open_slide(converted) as dcm, open_slide(real_svs()) as svs:
        grid = tile_grid(svs, 0.5, 384, 0.5)
        assert tile_grid(dcm, 0.5, 384, 0.5) == grid and len(grid) > 5
        tile = grid[len(grid) // 2]
        assert np.abs(read_tile(dcm, tile).astype(float) - read_tile(svs, tile)).mean() < TISSUE_JPEG_MEAN_ERROR

        def in_level0(coords, slide):
            return [(round(c.x * slide.levels[c.level].downsample), round(c.y * slide.levels[c.level].downsample))
                    for c in coords]  # fmt: skip

        # At 1 µm/px the DICOM copy reads its own 0.998 µm/px level and the SVS its only level: same places.
        coarse_dcm, coarse_svs = tile_grid(dcm, 1.0, 384, 0.5), tile_grid(svs, 1.0, 384, 0.5)
        assert {c.level for c in coarse_dcm} == {1} and {c.level for c in coarse_svs} == {0}
        assert in_level0(coarse_dcm, dcm) == in_level0(coarse_svs, svs)
        assert isinstance(coarse_dcm[0], TileCoord)
