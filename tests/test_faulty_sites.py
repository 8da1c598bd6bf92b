"""What a real hospital's data does to a run: faulty cases are excluded and counted, bad input gets a one-line
answer, and no earlier result is lost. Every site here is a damaged copy of a synthetic site."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from _slides_helpers import truncate
from _validation_helpers import blank_first_training_slide
from typer.testing import CliRunner

from fedmusk.cli import app

FAST = ["train.epochs=1", "train.bootstrap=10", "device=cpu"]


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Tables wide enough that a message stays on one line."""
    from fedmusk import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 400)


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=400)
    result.text = " ".join(result.output.split())  # tables wrap long cells
    assert "Traceback" not in result.output
    return result


def copy_site(small_cohort, tmp_path: Path, index: int = 0) -> Path:
    return Path(shutil.copytree(small_cohort[index], tmp_path / small_cohort[index].name))


def rows(site: Path) -> list[dict]:
    with (site / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def set_splits(site: Path, split_of) -> None:
    table = rows(site)
    for i, r in enumerate(table):
        r["split"] = split_of(i, r)
    with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def test_blank_and_unreadable_slides_exclude_their_cases_and_training_goes_on(small_cohort, tmp_path):
    site = copy_site(small_cohort, tmp_path)
    blank_case = blank_first_training_slide(site)
    damaged_row = next(r for r in rows(site) if r["split"] == "train" and r["case_id"] != blank_case)
    truncate(site / damaged_row["slide"], 0.5)

    checked = invoke("validate", site)
    assert checked.exit_code == 1  # the truncated file is an error to fix
    assert "no tissue detected on this slide" in checked.text and "blank-scan.tif" in checked.text

    prepared = invoke("prepare", site, "--config", "configs/demo.yaml", "--tiles-only")
    assert re.search(r"slides without tissue tiles\W+1\b", prepared.text) and "no tissue tile was found" in prepared.text

    out = tmp_path / "run"
    trained = invoke("train", "configs/demo.yaml", "--site", site, "--out", out, *FAST)
    assert trained.exit_code == 0, trained.output
    assert f"case {blank_case}, slide slides/blank-scan.tif" in trained.text and "the case is excluded" in trained.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded"] == {"no_tissue": 1, "unreadable": 1}
    assert metrics["test"]["n"] >= 1 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_site_without_test_or_validation_cases_still_writes_its_adapter_and_says_why_test_is_empty(
    small_cohort, tmp_path
):
    site = copy_site(small_cohort, tmp_path, 1)
    set_splits(site, lambda i, r: "train")
    out = tmp_path / "run"
    trained = invoke("train", "configs/demo.yaml", "--site", site, "--out", out, *FAST)
    assert trained.exit_code == 0, trained.output
    assert "no validation cases: model selection is off, the adapter of the last epoch is kept" in trained.text
    assert "test: none (no test cases" in trained.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] is None and "no test cases" in metrics["test_note"]
    assert metrics["best_epoch"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()

    before = (out / "metrics.json").read_bytes()
    again = invoke("train", "configs/demo.yaml", "--site", site, "--out", out, *FAST)
    assert again.exit_code == 2 and "already holds a run" in again.text and "--force" in again.text
    assert (out / "metrics.json").read_bytes() == before  # the earlier run is untouched


def test_train_out_pointing_at_a_file_is_refused(small_cohort, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = invoke("train", "configs/demo.yaml", "--site", small_cohort[0], "--out", target, *FAST)
    assert result.exit_code == 2 and "is a file, not a folder" in result.text
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("fault", ["missing", "twice", "same-name"])
def test_simulate_checks_every_site_folder_before_the_federation_starts(small_cohort, tmp_path, fault):
    sites = list(small_cohort)
    if fault == "missing":
        sites[2] = tmp_path / "site-typo"
    elif fault == "twice":
        sites[2] = Path(str(sites[0]) + "/")  # the same folder, spelled differently
    else:
        sites[2] = copy_site(small_cohort, tmp_path / "elsewhere", 0)
    args = ["simulate", "configs/demo.yaml", "--out", tmp_path / "fed"]
    for s in sites:
        args += ["--site", s]
    result = invoke(*args)
    assert result.exit_code == 2
    expected = {"missing": "does not exist", "twice": "is given twice", "same-name": "the same name"}[fault]
    assert expected in result.text
    assert not (tmp_path / "fed").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.task=survivl", "expected one of [survival, response, pretrain]"),
        ("train.fusion=concatt", "expected one of [concat, gated, image, report]"),
        ("model.preset=huge", "expected one of [large, tiny]"),
        ("data.tile_size=0", "'data.tile_size': 0; must be a positive number"),
        ("data.target_mpp=0", "'data.target_mpp': 0.0; must be a positive number"),
        ("train.lr=-5", "'train.lr': -5.0; must be a positive number"),
        ("train.epochs=-1", "'train.epochs': -1; must be 1 or more"),
    ],
)
def test_impossible_settings_are_refused_at_load_naming_key_and_source(small_cohort, tmp_path, override, message):
    result = invoke("train", "configs/demo.yaml", "--site", small_cohort[0], "--out", tmp_path / "run", override)
    assert result.exit_code == 2 and message in result.text and f"override '{override}'" in result.text
    assert not (tmp_path / "run").exists()


def test_a_yaml_whose_top_level_is_a_list_is_named(small_cohort, tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- model\n- data\n")
    result = invoke("train", listed, "--site", small_cohort[0], "--out", tmp_path / "run")
    assert result.exit_code == 2 and "listed.yaml: the top level must be a mapping" in result.text


def _failing_save(error: BaseException):
    def save_file(*args, **kwargs):
        raise error

    return save_file


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("full", "cannot write the tile cache: the disk is full"),
        ("permission", "cannot write the tile cache: permission denied"),
    ],
)
def test_a_cache_that_cannot_be_written_stops_prepare_with_the_reason(small_cohort, tmp_path, monkeypatch, error,
                                                                      message):  # fmt: skip
    from safetensors import SafetensorError

    import fedmusk.data.prepare.pipeline as prepare

    raised = {
        "full": SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                'space left on device" })'),
        "permission": PermissionError(13, "Permission denied"),
    }[error]  # fmt: skip
    monkeypatch.setattr(prepare, "save_file", _failing_save(raised))
    site = copy_site(small_cohort, tmp_path)
    result = invoke("prepare", site, "--config", "configs/demo.yaml", "--tiles-only", "--quick")
    assert result.exit_code == 2 and message in result.text
    assert not list((site / ".fedmusk" / "tiles").glob("*.tmp"))  # no half-written entry left behind


def test_a_dicom_wsi_without_its_base_level_is_refused_naming_series_and_level(tmp_path):
    from _slides_helpers import tissue_image
    from _validation_helpers import make_site, row, write_manifest

    from fedmusk.data.slides.dicom_wsi import write_dicom_wsi

    site = make_site(tmp_path / "site", n_cases=1)
    series = write_dicom_wsi(tissue_image(512, 512), site / "slides" / "dicom", mpp=0.5, tile_size=128, levels=3)
    (series / "level-0.dcm").unlink()  # an export that left out the full-resolution instance
    write_manifest(site, [row("C0000", "slides/dicom", "reports/C0000.txt", split="train")])
    result = invoke("validate", site)
    assert result.exit_code == 1
    assert "is missing its base level (level 0" in result.text and "only resampled levels" in result.text
    assert re.search(r"DICOM WSI series [0-9.]{10,} is missing", result.text)  # its UID, in the site's own table


def test_prepare_warns_when_tiles_must_be_enlarged_to_reach_target_mpp(tmp_path):
    from _slides_helpers import tissue_image, write_tiled_tiff
    from _validation_helpers import make_site, row, write_manifest

    site = make_site(tmp_path / "site", n_cases=1)
    write_tiled_tiff(site / "slides" / "coarse.tif", tissue_image(512, 512), mpp=1.0)
    write_manifest(site, [row("C0000", "slides/coarse.tif", "reports/C0000.txt", split="train")])
    result = invoke("prepare", site, "--tiles-only", "data.tile_size=64")
    assert result.exit_code == 0, result.output
    assert "the finest level is 1 um/px, coarser than data.target_mpp=0.5: its tiles are enlarged 2x" in result.text


def test_the_real_svs_is_not_enlarged_at_its_own_resolution_but_is_at_a_finer_target(tmp_path):
    from _slides_helpers import real_svs
    from _validation_helpers import make_site, row, write_manifest

    site = make_site(tmp_path / "site", n_cases=1)
    shutil.copy(real_svs(), site / "slides" / "real.svs")
    write_manifest(site, [row("C0000", "slides/real.svs", "reports/C0000.txt", split="train")])
    at_its_own = invoke("prepare", site, "--tiles-only", "--quick", "data.tile_size=512")
    assert at_its_own.exit_code == 0 and "enlarged" not in at_its_own.text
    finer = invoke("prepare", site, "--tiles-only", "--quick", "data.tile_size=512", "data.target_mpp=0.25")
    assert finer.exit_code == 0 and "coarser than data.target_mpp=0.25: its tiles are enlarged 2x" in finer.text


def test_a_utf16_manifest_from_excel_is_read_with_a_warning(tmp_path):
    from _validation_helpers import make_site

    site = make_site(tmp_path / "site")
    text = (site / "manifest.csv").read_text(encoding="utf-8").replace(",", "\t")
    (site / "manifest.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode Text": BOM, UTF-16LE, tabs
    result = invoke("validate", site)
    assert result.exit_code == 0, result.output
    assert "is UTF-16 (Excel's 'Unicode Text'); it was read as such" in result.text
    assert "4 of 4 manifest rows usable" in result.text


def test_decomposed_unicode_file_names_match_the_manifest(tmp_path):
    import unicodedata

    from _validation_helpers import make_site

    from fedmusk.data.site.manifest import read_manifest

    site = make_site(tmp_path / "site")
    composed = unicodedata.normalize("NFC", "Müller-Straße")
    decomposed = unicodedata.normalize("NFD", composed)
    (site / "slides" / "C0001_a").rename(site / "slides" / decomposed)  # as copied from a Mac
    manifest = site / "manifest.csv"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("slides/C0001_a", f"slides/{composed}"),
                        encoding="utf-8")  # fmt: skip
    result = invoke("validate", site)
    assert result.exit_code == 0 and "not found" not in result.text
    assert f"slides/{decomposed}" in {r.slide for r in read_manifest(site).rows}


def test_an_oversized_report_is_read_only_up_to_the_limit_with_a_warning(tmp_path):
    import time

    from _validation_helpers import make_site

    from fedmusk.data.site.reports import REPORT_MAX_BYTES
    from fedmusk.data.site.scrub import Scrubber

    site = make_site(tmp_path / "site")
    huge = "Invasive adenocarcinoma, acinar pattern. Margins free of tumour.\n" * (20 * 2**20 // 64)  # 20 MiB
    (site / "reports" / "C0001.txt").write_text(huge, encoding="utf-8")
    start = time.perf_counter()
    result = invoke("validate", site)
    Scrubber.from_site(site)
    assert time.perf_counter() - start < 20  # unbounded, this took tens of seconds and gigabytes
    assert result.exit_code == 0 and re.search(r"report is 2\d\.\d MiB; only its first 1 MiB is used", result.text)
    from fedmusk.training.cohort import load_site_cases

    case = next(c for c in load_site_cases(site) if c.case_id == "C0001")
    assert len(case.report.encode()) <= REPORT_MAX_BYTES


def test_a_site_without_pretrain_folder_pretrains_on_its_training_cases_only(small_cohort, tmp_path):
    from fedmusk.config import load_config
    from fedmusk.training.pretrain_cases import case_pretrain_data

    site = copy_site(small_cohort, tmp_path)
    shutil.rmtree(site / "pretrain")
    cfg = load_config(["configs/demo.yaml"])
    data = case_pretrain_data(site, cfg, max_words=48)
    train = {r["slide"] for r in rows(site) if r["split"] == "train"}
    held_out = {r["slide"] for r in rows(site) if r["split"] != "train"}
    assert held_out and data.images and data.texts and data.pairs
    used = {im.name.split("#")[0] for im in data.images} | {p.image.name for p in data.pairs}
    assert used <= train  # never a validation or test case's slide...
    held_out_reports = {(site / r["report"]).read_text() for r in rows(site) if r["split"] != "train"}
    assert not any(p.caption in held_out_reports for p in data.pairs)  # ...nor its report
    assert data.images[0].read().shape == (cfg.data.tile_size, cfg.data.tile_size, 3)
