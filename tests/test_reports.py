"""Reading pathology reports and spotting text in them that looks like a patient identifier."""

import pytest
from _validation_helpers import CLEAN_REPORT

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.reports import find_identifiers, read_report


def _kinds(text):
    return [(f.kind, text[f.start : f.end]) for f in find_identifiers(text)]


@pytest.mark.parametrize(
    "text, kind, found",
    [
        ("Referred by Dr. Alice Meyer-Lansky for review.", "name", "Alice Meyer-Lansky"),
        ("Patient: SMITH, John  Sex: M", "name", "SMITH, John"),
        ("Signed out by: R. Jones, consultant.", "name", "R. Jones"),
        ("MRN: 00123456", "medical record number", "00123456"),
        ("Medical record number 4455 6677 on file.", "medical record number", "4455 6677"),
        ("Accession: S21-12345", "accession number", "S21-12345"),
        ("Block from SP-2021-001234 reviewed.", "accession number", "SP-2021-001234"),
        ("Collected 2021-03-10 in theatre.", "date", "2021-03-10"),
        ("Received 04/12/1961.", "date", "04/12/1961"),
        ("Received 12 March 2021.", "date", "12 March 2021"),
        ("Reported on Jan 5, 2020 by the lab.", "date", "Jan 5, 2020"),
        ("Call (555) 123-4567 with questions.", "phone number", "(555) 123-4567"),
        ("Call +44 20 7946 0958 with questions.", "phone number", "+44 20 7946 0958"),
        ("Tel: 030 1234 5678.", "phone number", "030 1234 5678"),
        ("Copy to alice.meyer@hospital.example.org please.", "email address", "alice.meyer@hospital.example.org"),
        ("SSN 123-45-6789 recorded.", "SSN-like number", "123-45-6789"),
    ],
)
def test_each_kind_of_identifier_is_found_with_its_exact_span(text, kind, found):
    assert (kind, found) in _kinds(text)


@pytest.mark.parametrize(
    "text",
    [
        CLEAN_REPORT,
        "Gleason score 3+4=7, grade group 2; Ki-67 about 15%; pT2 N0 M0 (AJCC 8th edition).",
        "Three fragments measuring 3.5 x 2.0 x 1.2 cm; margin 0.1234567 mm; 4/5 cores positive.",
        "Patient: Male, 65 years old. Immunohistochemistry: TTF-1 positive, p40 negative.",
        "ER 90%, PR 80%, HER2 1+ (score 0-3). Tumour cellularity 40-50%.",
    ],
)
def test_ordinary_pathology_language_is_not_flagged(text):
    assert _kinds(text) == []


def test_findings_are_sorted_and_never_overlap():
    text = "Patient: John Smith MRN: 7654321 DOB: 1961-04-12 Dr. Ann Lee tel (555) 123-4567"
    findings = find_identifiers(text)
    assert [f.start for f in findings] == sorted(f.start for f in findings)
    assert all(a.end <= b.start for a, b in zip(findings, findings[1:]))
    assert {f.kind for f in findings} == {"name", "medical record number", "date", "phone number"}


def test_report_is_read_as_text_with_windows_line_endings_and_encoding(tmp_path):
    path = tmp_path / "r.txt"
    path.write_bytes("Tumour \xe0 3 cm.\r\nMargins free.\r\n".encode("cp1252"))
    assert read_report(path) == "Tumour \xe0 3 cm.\nMargins free.\n"
    path.write_bytes("\ufeffTumour 3 cm.".encode("utf-8"))
    assert read_report(path) == "Tumour 3 cm."


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p, "not found"),
        (lambda p: (p.mkdir(), p)[1], "folder"),
        (lambda p: (p.write_bytes(b"%PDF-1.4\x00\x01\x02"), p)[1], "binary"),
    ],
)
def test_unusable_report_raises_site_data_error_naming_the_file(tmp_path, make, words):
    path = make(tmp_path / "C0001.txt")
    with pytest.raises(SiteDataError, match=words) as info:
        read_report(path)
    assert info.value.path == str(path)
