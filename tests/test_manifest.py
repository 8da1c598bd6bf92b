"""Strict reading of a site's manifest.csv: columns, values, row numbers and case consistency."""

import pytest
from _validation_helpers import MANIFEST_HEADER, row, write_manifest

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.manifest import read_manifest, relative_site_path


def _problems(manifest):
    return [(p.severity, p.row, p.field, p.message) for p in manifest.problems]


def _errors_for(tmp_path, rows, header=None):
    write_manifest(tmp_path, rows, header)
    manifest = read_manifest(tmp_path, strict=False)
    return [(p.row, p.field, p.message) for p in manifest.problems if p.severity == "error"]


def test_valid_manifest_gives_typed_rows_and_cases_in_order(tmp_path):
    write_manifest(tmp_path, [
        row("C0002", "slides/b.svs", "reports/C0002.txt", time="3", event="0", response="1", split="val"),
        row("C0001", "slides/a1", time="12.5", event="1", split="train"),
        row("C0002", "slides\\b2.svs", "reports/C0002.txt", time="3.0", event="0.0", response="1", split="VAL"),
    ])
    manifest = read_manifest(tmp_path)
    assert manifest.problems == []
    first = manifest.rows[0]
    assert (first.row, first.case_id, first.slide, first.report) == (1, "C0002", "slides/b.svs", "reports/C0002.txt")
    assert (first.time, first.event, first.response, first.split) == (3.0, 0, 1, "val")
    assert manifest.rows[1].report is None and manifest.rows[1].response is None
    assert manifest.rows[2].slide == "slides/b2.svs"  # Windows separators are accepted
    cases = manifest.cases()
    assert [c.case_id for c in cases] == ["C0002", "C0001"]
    assert cases[0].slides == ["slides/b.svs", "slides/b2.svs"] and cases[0].reports == ["reports/C0002.txt"]
    assert cases[0].rows == [1, 3] and cases[0].event == 0


def test_missing_required_columns_are_each_named(tmp_path):
    write_manifest(tmp_path, [{"case_id": "C1", "slide": "a"}], header=["case_id", "slide", "report"])
    manifest = read_manifest(tmp_path, strict=False)
    missing = {p.field for p in manifest.problems if p.severity == "error"}
    assert missing == {"time", "event"}
    assert all("missing" in p.message for p in manifest.problems)
    assert manifest.rows == []


def test_unknown_column_is_a_warning_and_identifying_column_says_so(tmp_path):
    header = MANIFEST_HEADER + ["stage", "patient_name"]
    write_manifest(tmp_path, [dict(row("C0001", "a"), stage="II", patient_name="Jane Doe")], header)
    manifest = read_manifest(tmp_path, strict=False)
    assert [(p.severity, p.field) for p in manifest.problems] == [("warning", "stage"), ("warning", "patient_name")]
    assert "identifiers" in manifest.problems[1].message
    assert "Jane" not in " ".join(p.message for p in manifest.problems)
    assert len(manifest.rows) == 1
    assert manifest.identifying_columns == ["patient_name"]


def test_header_names_ignore_case_and_spaces_and_excel_byte_order_mark(tmp_path):
    (tmp_path / "manifest.csv").write_text("\ufeffCase_ID , Slide,Time,EVENT\nC0001,a,1,0\n", encoding="utf-8")
    manifest = read_manifest(tmp_path)
    assert manifest.rows[0].case_id == "C0001"


def test_semicolon_separated_manifest_is_read(tmp_path):
    write_manifest(tmp_path, [row("C0001", "a", time="4", event="1")], delimiter=";")
    assert read_manifest(tmp_path).rows[0].time == 4.0


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("event", "2", "must be 1 (event observed) or 0 (censored), found '2'"),
        ("event", "yes", "found 'yes'"),
        ("event", "", "event is empty"),
        ("time", "-3", "negative"),
        ("time", "abc", "not a number"),
        ("time", "2021-03-04", "looks like a date"),
        ("time", "12,5", "decimal comma"),
        ("time", "nan", "finite"),
        ("time", "", "time is empty"),
        ("response", "0.5", "response must be 1, 0 or empty"),
        ("split", "validation", "write 'val'"),
        ("split", "holdout", "split must be train, val, test or empty"),
        ("case_id", "", "case_id is empty"),
        ("slide", "", "slide is empty"),
        ("slide", "../other_site/a.svs", "outside the site folder"),
        ("slide", "slides/../../a.svs", "outside the site folder"),
        ("slide", "/mnt/pacs/a.svs", "absolute path"),
        ("slide", "C:\\slides\\a.svs", "absolute path"),
        ("report", "../reports/r.txt", "outside the site folder"),
    ],
)
def test_bad_value_is_an_error_on_its_row_and_field(tmp_path, field, value, words):
    rows = [row("C0001", "a"), dict(row("C0002", "b"), **{field: value})]
    errors = _errors_for(tmp_path, rows)
    assert len(errors) == 1, errors
    assert errors[0][:2] == (2, field)
    assert words in errors[0][2]


def test_messages_do_not_repeat_values_that_could_identify_a_patient(tmp_path):
    rows = [dict(row("C0001", "a"), time="Jane Doe", event="MRN 1234567", split="Smith")]
    errors = _errors_for(tmp_path, rows)
    text = " ".join(message for _, _, message in errors)
    assert len(errors) == 3
    assert "Jane" not in text and "1234567" not in text and "Smith" not in text


def test_rows_are_numbered_from_the_first_data_row_and_blank_rows_keep_their_place(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "case_id,slide,time,event\nC0001,a,1,0\n,,,\nC0002,b,1,7\n", encoding="utf-8"
    )
    manifest = read_manifest(tmp_path, strict=False)
    assert [(p.row, p.field) for p in manifest.problems] == [(3, "event")]
    assert manifest.total_rows == 2


@pytest.mark.parametrize(
    "field, other, shown",
    [("time", "24", "24 here, 12.5 there"), ("event", "0", "0 here, 1 there"), ("response", "1", "1 here, empty there"),
     ("split", "test", "test here, train there")],
)
def test_rows_of_one_case_that_disagree_on_a_label_drop_the_whole_case(tmp_path, field, other, shown):
    rows = [row("C0001", "a", split="train"), row("C0002", "b", split="train"),
            dict(row("C0001", "c", split="train"), **{field: other})]
    write_manifest(tmp_path, rows)
    manifest = read_manifest(tmp_path, strict=False)
    errors = [p for p in manifest.problems if p.severity == "error"]
    assert [(p.row, p.field) for p in errors] == [(3, field)]
    assert "row 1 of the same case" in errors[0].message and shown in errors[0].message
    assert [r.case_id for r in manifest.rows] == ["C0002"]


def test_same_slide_listed_twice_is_an_error_on_the_second_row(tmp_path):
    errors = _errors_for(tmp_path, [row("C0001", "slides/a"), row("C0002", "./slides//a/")])
    assert errors == [(2, "slide", "the same slide is already listed in row 1; list each slide once")]


def test_too_many_values_in_a_row_is_explained(tmp_path):
    (tmp_path / "manifest.csv").write_text("case_id,slide,time,event\nC0001,a,12,5,1\n", encoding="utf-8")
    problems = read_manifest(tmp_path, strict=False).problems
    assert any("5 values but the header names 4 columns" in p.message and p.row == 1 for p in problems)


def test_short_or_spaced_case_ids_are_warned_about(tmp_path):
    write_manifest(tmp_path, [row("7", "a"), row("Jane Doe", "b")])
    manifest = read_manifest(tmp_path, strict=False)
    assert [(p.severity, p.row, p.field) for p in manifest.problems] == [
        ("warning", 1, "case_id"), ("warning", 2, "case_id")]
    assert len(manifest.rows) == 2


def test_strict_reading_raises_the_first_error_with_row_and_field(tmp_path):
    write_manifest(tmp_path, [row("C0001", "a", event="x"), row("C0002", "b", time="-1")])
    with pytest.raises(SiteDataError) as info:
        read_manifest(tmp_path)
    err = info.value
    assert (err.row, err.field, err.path) == (1, "event", "manifest.csv")
    assert "1 more" in err.message and "fedmusk validate" in err.message
    assert str(err).startswith("manifest row 1, field 'event', manifest.csv:")


@pytest.mark.parametrize(
    "content, words",
    [(None, "manifest.csv not found"), ("", "is empty"), ("case_id,slide,time,event\n", "no data rows")],
)
def test_missing_or_empty_manifest_is_one_clear_error(tmp_path, content, words):
    if content is not None:
        (tmp_path / "manifest.csv").write_text(content, encoding="utf-8")
    manifest = read_manifest(tmp_path, strict=False)
    assert len(manifest.problems) == 1 and words in manifest.problems[0].message
    with pytest.raises(SiteDataError, match=words):
        read_manifest(tmp_path)


def test_non_utf8_manifest_is_read_with_a_warning(tmp_path):
    (tmp_path / "manifest.csv").write_bytes("case_id,slide,time,event\nC0001,caf\xe9/a,1,0\n".encode("cp1252"))
    manifest = read_manifest(tmp_path, strict=False)
    assert [p.severity for p in manifest.problems] == ["warning"]
    assert manifest.rows[0].slide == "caf\xe9/a"


def test_raw_rows_keep_every_written_value_including_rows_with_errors(tmp_path):
    write_manifest(tmp_path, [row("C0001", "a", event="bad"), row("C0002", "/abs/b.svs")])
    manifest = read_manifest(tmp_path, strict=False)
    assert manifest.rows == []
    assert [cells["case_id"] for _, cells in manifest.raw_rows] == ["C0001", "C0002"]
    assert manifest.raw_rows[1] == (2, {**row("C0002", "/abs/b.svs")})


@pytest.mark.parametrize(
    "written, expected",
    [("a/b.svs", "a/b.svs"), ("./a//b/", "a/b"), ("a/x/../b", "a/b"), ("a\\b.svs", "a/b.svs"),
     ("..", None), ("/a", None), ("\\\\server\\share\\a.svs", None), ("D:/a.svs", None), (".", None)],
)
def test_relative_site_path_normalises_or_refuses(written, expected):
    assert relative_site_path(written)[0] == expected
