"""Finding tissue, choosing the level to read, cutting a deterministic tile grid, and sampling tiles."""

import numpy as np
import pytest
from _slides_helpers import real_svs, tissue_image
from PIL import Image

from fedmusk.data.slides import open_slide
from fedmusk.data.slides.dicom_wsi import write_dicom_wsi
from fedmusk.data.slides.tiles import TileCoord, level_for_mpp, read_tile, region_extent, sample_tiles, tile_grid
from fedmusk.data.slides.tissue import tissue_mask


@pytest.fixture(scope="module")
def svs():
    with open_slide(real_svs()) as slide:
        yield slide


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A DICOM WSI with levels at 0.25, 0.5 and 1.0 µm/px."""
    out = write_dicom_wsi(tissue_image(512, 768), tmp_path_factory.mktemp("wsi") / "s", mpp=0.25, tile_size=128)
    with open_slide(out) as slide:
        yield slide


# --- tissue ---------------------------------------------------------------------------------------------------------


def test_blank_glass_has_no_tissue():
    noise = np.random.default_rng(0).integers(0, 5, (200, 300, 3), dtype=np.uint8)
    glass = np.full((200, 300, 3), 243, dtype=np.uint8) + noise
    assert not tissue_mask(glass).any()


def test_tissue_is_found_but_black_borders_and_pen_marks_are_not():
    image = tissue_image(300, 400)
    image[:, :20] = 5  # black border
    image[140:160, 40:360] = (40, 150, 60)  # green pen line across the tissue
    image[20:40, 100:300] = (40, 70, 190)  # blue pen scribble on the glass
    mask = tissue_mask(image)
    assert not mask[:, :20].any()
    assert not mask[145:155, 60:340].any()
    assert not mask[20:40, 100:300].any()
    assert mask[100:130, 170:230].all() and mask[170:200, 170:230].all()  # tissue above and below the pen line


def test_an_image_that_is_all_tissue_is_all_tissue():
    image = tissue_image(600, 600)[220:380, 220:380]  # the middle of the blob
    assert tissue_mask(image).mean() > 0.99


def test_tissue_share_of_the_real_svs_is_sane(svs):
    assert 0.25 < tissue_mask(svs.thumbnail(1024)).mean() < 0.5


# --- level choice ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "level"),
    [(0.25, 0), (0.4, 0), (0.5, 1), (0.505, 1), (0.7, 1), (1.0, 2), (4.0, 2), (0.1, 0)],
)
def test_level_is_the_coarsest_at_or_finer_than_the_target(pyramid, target, level):
    assert level_for_mpp(pyramid, target) == level


def test_tiles_come_back_at_the_requested_size_whatever_the_level(pyramid):
    for target in (0.2, 0.5, 0.7, 1.0):
        coords = tile_grid(pyramid, target_mpp=target, tile_size=96, min_tissue=0)
        assert coords, target
        assert read_tile(pyramid, coords[0]).shape == (96, 96, 3)
        assert coords[0].mpp == target and coords[0].level == level_for_mpp(pyramid, target)


# --- the grid on the real slide -------------------------------------------------------------------------------------


def test_real_svs_grid_at_half_micron_lies_on_tissue_and_inside_the_slide(svs):
    coords = tile_grid(svs, target_mpp=0.5, tile_size=384, min_tissue=0.5)
    assert 8 <= len(coords) <= 30
    extent = region_extent(svs, coords[0])
    assert extent == 385  # 384 pixels at 0.5 µm/px are 385 pixels at 0.499 µm/px
    for c in coords:
        assert (c.level, c.size, c.mpp) == (0, 384, 0.5)
        assert 0 <= c.x < 2220 and 0 <= c.y < 2967 and c.x % extent == 0 and c.y % extent == 0
    shares = [tissue_mask(read_tile(svs, c)).mean() for c in coords]
    assert np.median(shares) > 0.6


def test_real_svs_grid_is_deterministic_and_row_major(svs):
    first = tile_grid(svs, 0.5, 384, 0.5)
    assert first == tile_grid(svs, 0.5, 384, 0.5)
    assert first == sorted(first, key=lambda c: (c.y, c.x))


def test_real_svs_tile_at_one_micron_matches_four_half_micron_tiles_shrunk(svs):
    coarse = tile_grid(svs, target_mpp=1.0, tile_size=192, min_tissue=0.5)
    assert coarse
    tile = read_tile(svs, coarse[0])
    assert tile.shape == (192, 192, 3)
    c = coarse[0]
    quads = [read_tile(svs, TileCoord(0, c.x + dx, c.y + dy, 192, 0.5)) for dy in (0, 193) for dx in (0, 193)]
    mosaic = np.concatenate([np.concatenate(quads[:2], 1), np.concatenate(quads[2:], 1)], 0)
    shrunk = np.asarray(Image.fromarray(mosaic).resize((192, 192), Image.Resampling.BOX))
    assert np.abs(tile.astype(float) - shrunk).mean() < 6


def test_without_a_tissue_threshold_the_grid_covers_the_whole_slide(svs):
    coords = tile_grid(svs, 0.5, 384, min_tissue=0)
    assert len(coords) == 6 * 8  # ceil(2220 / 385) x ceil(2967 / 385), edge tiles padded with white
    edge = [c for c in coords if c.x == 5 * 385 and c.y == 7 * 385][0]
    assert (read_tile(svs, edge)[-50:, -50:] == 255).all()


def test_stricter_tissue_threshold_keeps_fewer_tiles(svs):
    assert len(tile_grid(svs, 0.5, 256, 0.9)) < len(tile_grid(svs, 0.5, 256, 0.5)) < len(tile_grid(svs, 0.5, 256, 0.1))


# --- tile folders ---------------------------------------------------------------------------------------------------


def test_tile_folder_gives_one_tile_per_image_with_tissue(tmp_path):
    tissue = tissue_image(600, 600)
    Image.fromarray(tissue[150:406, 150:406]).save(tmp_path / "a.png")  # 256 px, all tissue
    Image.fromarray(np.full((256, 256, 3), 244, dtype=np.uint8)).save(tmp_path / "b.png")  # glass only
    Image.fromarray(tissue[200:328, 200:328]).save(tmp_path / "c.png")  # smaller image, all tissue
    with open_slide(tmp_path) as slide:
        coords = tile_grid(slide, target_mpp=0.5, tile_size=256, min_tissue=0.5)
        # Three images -> a 2x2 mosaic of 256-pixel cells; the tile is centred on each image, the glass one dropped.
        assert [(c.x, c.y) for c in coords] == [(0, 0), (64 - 128, 256 + 64 - 128)]
        assert np.array_equal(read_tile(slide, coords[0]), tissue[150:406, 150:406])
        small = read_tile(slide, coords[1])
        assert np.array_equal(small[64:192, 64:192], tissue[200:328, 200:328]) and (small[:64] == 255).all()


# --- sampling -------------------------------------------------------------------------------------------------------


def test_sampling_is_capped_deterministic_per_seed_and_keeps_grid_order():
    coords = [TileCoord(0, 384 * i, 0, 384, 0.5) for i in range(100)]
    a = sample_tiles(coords, cap=10, seed=1)
    assert len(a) == 10 and a == sample_tiles(coords, cap=10, seed=1)
    assert a != sample_tiles(coords, cap=10, seed=2)
    assert a == sorted(a, key=lambda c: c.x)
    assert sample_tiles(coords, cap=500, seed=0) == coords == sample_tiles(coords, cap=None, seed=0)
    assert sample_tiles([], cap=3, seed=0) == []
