"""``fedmusk prepare``: every usable slide of a site gets one cache entry (tile coordinates and frozen-MUSK features),
reruns do nothing, stale entries are recomputed, a killed run resumes, and a damaged slide is reported and skipped
while the others are prepared."""

import io
import shutil
from pathlib import Path

import pytest
import torch
from _slides_helpers import real_svs, truncate
from _validation_helpers import write_tiles
from rich.console import Console

from fedmusk.config import load_config
from fedmusk.data.errors import SlideError
from fedmusk.data.prepare.cli import run_prepare
from fedmusk.data.prepare.pipeline import (
    TilingSettings,
    cache_dir,
    model_fingerprint,
    prepare_site,
    read_cache,
    slide_key,
)
from fedmusk.data.site.manifest import read_manifest
from fedmusk.data.slides import open_slide
from fedmusk.data.slides.tile_loader import iter_tile_batches, read_tile_batch
from fedmusk.data.slides.tiles import read_tile, tile_grid
from fedmusk.musk_model import musk_transform
from fedmusk.runtime import load_model, model_precision

TINY = ["data.tile_size=96", "data.batch_size=8"]  # tiles at the tiny model's own size




@pytest.fixture(scope="module")
def synthetic_sites(tmp_path_factory):
    """A 2-site synthetic cohort (site-1 writes SVS files, site-2 DICOM WSI series), 3 cases each, small slides."""
    from fedmusk.data.synth.cohort import synthesize_cohort

    root = tmp_path_factory.mktemp("prepare-cohort")
    return synthesize_cohort(root, sites=2, cases_per_site=3, seed=0, tile_px=32, progress=False, slide_px=384,
                             pretrain_tiles=0, pretrain_reports=2, workers=1)  # fmt: skip


@pytest.fixture
def site(synthetic_sites, tmp_path) -> Path:
    """A private copy of the SVS site (tests write caches and damage files)."""
    return Path(shutil.copytree(synthetic_sites[0], tmp_path / "site"))


def _slides(site: Path) -> list[str]:
    return list(dict.fromkeys(r.slide for r in read_manifest(site).rows))


def _case_ids(site: Path) -> list[str]:
    return sorted({r.case_id for r in read_manifest(site).rows})


def _prepare(site: Path, *overrides: str, **kwargs) -> tuple[int, str]:
    """run_prepare with the tiny model; returns (exit code, what it printed on a terminal-like console)."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    code = run_prepare(site, load_config([], [*TINY, *overrides]), console, **kwargs)
    return code, out.getvalue()


def _mtimes(site: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir(site).glob("*.safetensors")}


def test_prepare_writes_one_entry_per_slide_with_coordinates_and_features(synthetic_sites, tmp_path):
    for source in synthetic_sites:  # an SVS site and a DICOM WSI site
        site = Path(shutil.copytree(source, tmp_path / source.name))
        code, output = _prepare(site)
        assert code == 0, output
        slides = _slides(site)
        assert len(list(cache_dir(site).glob("*.safetensors"))) == len(slides)
        cfg = load_config([], TINY)
        precision = model_precision(cfg.model, "cpu")  # model.precision=auto: what this CPU computes in
        expected = model_fingerprint(load_model(cfg.model, "cpu", cfg.seed), False, TilingSettings(0.5, 96, 0.5),
                                     precision)  # fmt: skip
        for slide in slides:
            entry = read_cache(site, slide)
            assert entry.fingerprint == expected
            n = entry.coords.shape[0]
            assert n > 0 and entry.coords.shape == (n, 4) and (entry.coords[:, 3] == 96).all()
            assert entry.features.shape == (n, 64) and torch.isfinite(entry.features).all()
        # progress and summary show counts, never the site's case pseudonyms or report text
        assert not [c for c in _case_ids(site) if c in output], output
        report = (site / read_manifest(site).rows[0].report).read_text(encoding="utf-8")
        assert not [line for line in report.splitlines() if len(line) > 20 and line in output]
        assert "Preparing slides" in output and str(cache_dir(site)) in output.replace("\n", "")


def test_multiscale_features_have_twice_the_dimension(site):
    slide = _slides(site)[0]
    cfg = load_config([], [*TINY, "model.ms_aug=true"])
    model = load_model(cfg.model, "cpu", cfg.seed)
    result = prepare_site(site, [slide], TilingSettings(0.5, 96, 0.5), model, musk_transform(96), 8, ms_aug=True)
    assert result.prepared == [slide]
    entry = read_cache(site, slide)
    assert entry.features.shape == (entry.coords.shape[0], 128)


def test_second_run_finds_everything_up_to_date_and_writes_nothing(site):
    assert _prepare(site)[0] == 0
    before = _mtimes(site)
    code, output = _prepare(site)
    assert code == 0
    assert "up to date; nothing to do" in output
    assert _mtimes(site) == before


def test_another_model_or_tile_size_makes_the_cache_stale(site):
    slides = _slides(site)
    _prepare(site)
    first = {s: read_cache(site, s) for s in slides}

    _prepare(site, "seed=1")  # another random model: other weights, other fingerprint
    reseeded = {s: read_cache(site, s) for s in slides}
    for s in slides:
        assert reseeded[s].fingerprint != first[s].fingerprint
        assert torch.equal(reseeded[s].coords, first[s].coords)  # same tiling: coordinates reused
        assert not torch.allclose(reseeded[s].features, first[s].features)

    _prepare(site, "seed=1", "data.tile_size=64")
    for s in slides:
        entry = read_cache(site, s)
        assert (entry.coords[:, 3] == 64).all() and entry.features.shape == (entry.coords.shape[0], 64)


def test_bf16_embedding_is_a_cache_of_its_own_and_stays_within_cosine_0999_of_float32(site):
    slides = _slides(site)
    assert _prepare(site, "model.precision=float32")[0] == 0
    fp32 = {s: read_cache(site, s) for s in slides}
    code, output = _prepare(site, "model.precision=bfloat16")
    assert code == 0 and "at bfloat16" in output
    for s in slides:
        bf16 = read_cache(site, s)
        assert bf16.fingerprint != fp32[s].fingerprint  # the precision is part of what shaped the features
        assert bf16.features.dtype == torch.float32 and not torch.equal(bf16.features, fp32[s].features)
        cosine = torch.nn.functional.cosine_similarity(bf16.features, fp32[s].features, dim=-1)
        assert float(cosine.min()) >= 0.999, float(cosine.min())
    model = load_model(load_config([], TINY).model, "cpu", 0)
    tiling = TilingSettings(0.5, 96, 0.5)
    assert model_fingerprint(model, False, tiling) == model_fingerprint(model, False, tiling, "float32")


def test_killed_prepare_resumes_with_the_slides_it_had_not_finished(site):
    slides = _slides(site)
    assert len(slides) >= 3
    cfg = load_config([], TINY)
    model = load_model(cfg.model, "cpu", cfg.seed)
    tiling = TilingSettings.from_config(cfg.data)
    precision = model_precision(cfg.model, "cpu")  # what run_prepare embeds at on this machine
    prepare_site(site, slides[:2], tiling, model, musk_transform(96), 8, precision=precision)  # killed run ...
    leftover = cache_dir(site) / f"{slide_key(slides[2])}.tmp"
    leftover.write_bytes(b"half a safetensors file")  # ... while it was writing the third slide
    done_before = _mtimes(site)
    assert len(done_before) == 2

    code, output = _prepare(site)
    assert code == 0, output
    after = _mtimes(site)
    assert len(after) == len(slides)
    assert all(after[name] == t for name, t in done_before.items())  # the finished slides were not redone
    assert read_cache(site, slides[2]).features is not None
    assert not list(cache_dir(site).glob("*.tmp"))


def test_tiles_only_prepare_records_coordinates_and_keeps_features_already_cached(site):
    slides = _slides(site)
    code, _ = _prepare(site, embed=False)
    assert code == 0
    assert all(read_cache(site, s).features is None and read_cache(site, s).coords.shape[0] > 0 for s in slides)
    _prepare(site)  # embeds, reusing the coordinates
    embedded = _mtimes(site)
    code, output = _prepare(site, embed=False)
    assert code == 0 and "nothing to do" in output
    assert _mtimes(site) == embedded and all(read_cache(site, s).features is not None for s in slides)


@pytest.mark.parametrize("check_slides", [True, False], ids=["found-by-validation", "found-while-preparing"])
def test_damaged_slide_is_reported_and_skipped_while_the_others_are_prepared(site, check_slides):
    slides = _slides(site)
    damaged = slides[1]
    truncate(site / damaged, 0.5)
    code, output = _prepare(site, check_slides=check_slides)
    assert code == 1
    assert "Traceback" not in output
    flat = " ".join(output.split())
    assert Path(damaged).name in flat and "truncated" in flat
    assert read_cache(site, damaged) is None
    assert all(read_cache(site, s).features is not None for s in slides if s != damaged)


@pytest.mark.parametrize("target_mpp, tile_px, img_size", [(0.5, 96, 96), (0.6, 96, 96), (0.5, 96, 64)],
                         ids=["at-model-size", "resampled", "resized-by-transform"])
def test_batched_tile_reading_gives_the_very_tensors_of_tile_by_tile_reading(synthetic_sites, tmp_path, target_mpp,
                                                                              tile_px, img_size):
    transform = musk_transform(img_size)
    slides = [s / _slides(s)[0] for s in synthetic_sites] + [write_tiles(tmp_path / "tiles", n=3, size=100)]
    for path in slides:  # SVS at 0.25 um/px, DICOM WSI at 0.5 um/px, a folder of tile images
        with open_slide(path) as slide:
            coords = tile_grid(slide, target_mpp, tile_px, 0.5)
            assert coords
            one_by_one = torch.stack([transform(read_tile(slide, c)) for c in coords])
            batched = read_tile_batch(slide, coords, transform)
        assert torch.equal(batched, one_by_one) and batched.is_contiguous()


def test_worker_processes_give_the_same_features_in_grid_order(site):
    slides = _slides(site)[:2]
    _prepare(site)
    in_process = {s: read_cache(site, s).features for s in slides}
    shutil.rmtree(cache_dir(site))
    code, _ = _prepare(site, "data.num_workers=2")
    assert code == 0
    for s in slides:
        assert torch.equal(read_cache(site, s).features, in_process[s])


def test_a_slide_that_fails_inside_a_worker_raises_a_slide_error_naming_it(site):
    path = site / _slides(site)[0]
    with open_slide(path) as slide:
        coords = tile_grid(slide, 0.5, 96, 0.5)
    path.write_bytes(b"")  # damaged after tiling, before the workers open it
    with pytest.raises(SlideError) as caught:
        list(iter_tile_batches(path, coords, musk_transform(96), 8, num_workers=1))
    assert path.name in str(caught.value)


def test_real_svs_and_its_dicom_conversion_give_the_same_tiles_and_close_features(tmp_path):
    from fedmusk.data.slides.dicom_wsi import convert_to_dicom

    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    shutil.copy(real_svs(), site / "slides" / "real.svs")
    convert_to_dicom(site / "slides" / "real.svs", site / "slides" / "real-dicom")
    torch.manual_seed(0)
    cfg = load_config([], [])  # the release tiling: 384 px at 0.5 µm/px, resized to the tiny model's 96
    model = load_model(cfg.model, "cpu", cfg.seed)
    result = prepare_site(site, ["slides/real.svs", "slides/real-dicom"], TilingSettings.from_config(cfg.data),
                          model, musk_transform(96), 8)  # fmt: skip
    assert result.ok and result.tiles > 0
    svs, dicom = read_cache(site, "slides/real.svs"), read_cache(site, "slides/real-dicom")
    assert torch.equal(svs.coords, dicom.coords)
    cos = torch.nn.functional.cosine_similarity(svs.features[:, None], dicom.features[None], dim=-1)
    assert cos.diagonal().min() > 0.999  # JPEG re-encoding in the conversion changes pixels only slightly
    assert (cos.argmax(dim=0) == torch.arange(len(cos))).all()  # and each tile is closest to itself


def test_a_site_without_usable_rows_exits_1_without_a_traceback(tmp_path):
    code, output = _prepare(tmp_path / "no-such-site")
    assert code == 1
    assert "Nothing to prepare" in output and "Traceback" not in output
