"""The scrubber that every outgoing metric, config echo and log line passes: adversarial cases."""

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from _validation_helpers import CLEAN_REPORT, make_site, row, write_dicom_slide, write_manifest, write_tiles

from fedmusk.data.site.scrub import Scrubber
from fedmusk.data.slides.dicom_headers import dicom_patient_values

REPORT = (
    "SURGICAL PATHOLOGY REPORT. Patient: DOE, Jane. MRN: 00123456. Accession: S24-55501.\n"
    "Clinical history: persistent cough, right upper lobe mass seen on imaging.\n"
    "Microscopy: sheets of atypical glandular cells with lepidic and acinar growth, focal necrosis.\n"
    "Reported by Dr. Alice Meyer-Lansky."
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = make_site(tmp_path_factory.mktemp("site"), n_cases=2)
    (root / "reports" / "C0042.txt").write_text(REPORT, encoding="utf-8")
    write_tiles(root / "slides" / "SMITH_J" / "S21-98765")
    write_dicom_slide(root / "slides" / "dicom_case", pseudonym="C0050",
                      PatientName="DOE^JANE^MARIE", PatientID="MRN998877", AccessionNumber="ACC77331")
    manifest = (root / "manifest.csv").read_text(encoding="utf-8")
    manifest += "C0042,slides/SMITH_J/S21-98765,reports/C0042.txt,10,1,,train\n"
    manifest += "C0050,slides/dicom_case,,4,0,,test\n"
    manifest += "X9Q7,slides/missing.svs,,not-a-number,1,,\n"  # a row with errors: its values are still private
    (root / "manifest.csv").write_text(manifest, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def scrubber(site):
    return Scrubber.from_site(site)


@pytest.mark.parametrize(
    "line",
    [
        "slide C0042 failed",
        "tiles/slideC0042_x3.png skipped",
        "case=c0042;",
        '{"case": "C0042", "auc": 0.5}',
        "row for X9Q7 could not be used",
    ],
)
def test_case_ids_are_removed_even_inside_longer_strings(scrubber, line):
    out = scrubber.text(line)
    assert "c0042" not in out.lower() and "x9q7" not in out.lower()
    assert "[case]" in out or "[path]" in out


def test_paths_in_exception_messages_are_removed_in_every_spelling(scrubber, site):
    absolute = site / "slides" / "SMITH_J" / "S21-98765"
    messages = [
        str(FileNotFoundError(2, "No such file or directory", str(absolute / "tile_000.png"))),
        f"OSError: cannot open '{absolute}'",
        "cannot read slides\\SMITH_J\\S21-98765 (Windows spelling)",
        "SlideError: slides/SMITH_J/S21-98765: is truncated",
        "folder SMITH_J is empty",
    ]
    for message in messages:
        out = scrubber.text(message)
        assert "SMITH" not in out and "98765" not in out and str(site) not in out, out
        assert "[path]" in out


def test_unknown_absolute_paths_and_slide_file_names_are_removed_without_site_knowledge():
    scrub = Scrubber().text
    assert scrub("wrote /data/hospital_a/export/run.log ok") == "wrote [path] ok"
    assert scrub(r"open C:\PACS\export\slide.svs failed") == "open [path] failed"
    assert scrub("missing S21-1234.svs") == "missing [path]"
    assert scrub("see https://flower.example.org/api/v1") == "see https://flower.example.org/api/v1"


def test_report_sentences_inside_log_messages_are_removed(scrubber):
    line = "INFO batch text='SHEETS of atypical glandular cells, with lepidic' len=7"
    out = scrubber.text(line)
    assert "glandular" not in out and "[report text]" in out
    assert out.startswith("INFO batch text=") and out.endswith("len=7")


def test_three_common_words_from_a_report_do_not_trigger(scrubber):
    assert scrubber.text("right upper lobe") == "right upper lobe"


def test_identifiers_found_in_reports_are_removed_on_their_own(scrubber):
    out = scrubber.text("consult Meyer-Lansky about 00123456")
    assert "Meyer" not in out and "00123456" not in out


def test_dicom_patient_attributes_read_from_headers_are_removed(scrubber, site):
    values, names = dicom_patient_values(site / "slides" / "dicom_case")
    assert "MRN998877" in values and "ACC77331" in values and "DOE^JANE^MARIE" in names
    for line in ["patient DOE^JANE^MARIE", "id=MRN998877", "accession ACC77331 loaded", "Jane Doe", "doe, jane"]:
        out = scrubber.text(line)
        assert not any(v in out.lower() for v in ("doe", "jane", "mrn998877", "acc77331")), out


def test_ordinary_log_lines_and_numbers_pass_unchanged(scrubber):
    lines = [
        "round 3/10: loss=0.4123 auc=0.812 c-index=0.71 on 120 tiles (lr 1e-4, seed 7)",
        "aggregated 3 client updates with FedAvg; clipping_range=8",
        "train/loss 0.1234567 val/loss 0.2345678",
        "flwr 1.42.0, torch 2.13.0, peft 0.21.3",
        "loaded 4 slides and 2 reports",
        "node 6543210987654321 joined run 12345678901234567 from 127.0.0.1:9092",
        "mlflow at http://coordinator.example.org:5000/#/experiments/3",
    ]
    for line in lines:
        assert scrubber.text(line) == line


def test_nested_metrics_drop_identifying_keys_and_strings_but_keep_numbers(site):
    scrubber = Scrubber(case_ids=["C0042", "7", "100234"], paths=["slides/C0042_a"])
    metrics = {
        "auc": 0.81,
        "n_tiles": 120,
        "converged": True,
        "lr": np.float32(1e-4),
        "hist": np.arange(3),
        "per_case": {"C0042": 0.5, "7": 0.1, "mean": 0.3},
        "per_slide": {"slides/C0042_a": 0.4},
        "note": "slide C0042 was skipped",
        "status": "ok",
        "rounds": [1, 2.5, "C0042", ("a", "/data/site/x.svs")],
        "where": Path("/data/site"),
        "case C0042 auc": 0.7,
        "blob": b"\x00\x01",
        "worst_case": 100234,
        "n_slides": 100235,
    }
    out = scrubber.metrics(metrics)
    assert out["auc"] == 0.81 and out["n_tiles"] == 120 and out["converged"] is True
    assert out["lr"] == np.float32(1e-4) and list(out["hist"]) == [0, 1, 2]
    assert out["per_case"] == {"mean": 0.3}
    assert out["per_slide"] == {}
    assert out["status"] == "ok" and "note" not in out
    assert out["rounds"] == [1, 2.5, ("a",)]
    assert not {"where", "case C0042 auc", "blob", "worst_case"} & set(out)
    assert out["n_slides"] == 100235
    assert "C0042" not in json.dumps({k: v for k, v in out.items() if k not in ("lr", "hist")})


def _capture(logger_name: str):
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = ListHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s %(case)s"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler, records


def test_logging_filter_redacts_child_loggers_arguments_extras_and_tracebacks(scrubber, site):
    logger, handler, records = _capture("fedmusk")
    attached = scrubber.attach("fedmusk")
    try:
        child = logging.getLogger("fedmusk.client.train")
        child.info("case %s done with loss %.3f", "C0042", 0.25, extra={"case": "C0042"})
        try:
            open(site / "slides" / "C0042_nowhere.svs")
        except OSError:
            child.exception("could not open slide of %s", "C0042", extra={"case": "-"})
        logging.getLogger("fedmusk").warning(
            "report says: %s", "Sheets of atypical glandular cells with lepidic", extra={"case": "-"})
    finally:
        attached.detach()
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "C0042" not in text and str(site) not in text and "glandular" not in text
    assert records[0] == "fedmusk.client.train case [case] done with loss 0.250 [case]"
    assert "Traceback" in records[1] and "FileNotFoundError" in records[1]
    assert handler.filters == [] and logger.filters == []


def test_logging_filter_is_a_plain_logging_filter_that_keeps_every_record(scrubber):
    f = scrubber.logging_filter()
    assert isinstance(f, logging.Filter)
    record = logging.LogRecord("fedmusk", logging.INFO, __file__, 1, "id %s", ("C0042",), None)
    assert f.filter(record) is True and record.getMessage() == "id [case]"


def test_scrubber_from_a_site_with_a_broken_manifest_still_knows_every_case_id(tmp_path):
    write_manifest(tmp_path, [row("C0077", "/abs/x.svs", event="maybe"), row("C0078", "../y")])
    scrubber = Scrubber.from_site(tmp_path)
    assert "C0077" not in scrubber.text("C0077 C0078") and "C0078" not in scrubber.text("C0078")


def test_scrubber_for_a_missing_site_falls_back_to_generic_patterns(tmp_path):
    scrubber = Scrubber.from_site(tmp_path / "nowhere")
    assert scrubber.text("Dr. Smith called from /srv/x") == "Dr. [name] called from [path]"


def test_clean_report_text_is_indexed_but_short_phrases_in_prompts_survive(tmp_path):
    scrubber = Scrubber(texts=[CLEAN_REPORT])
    assert scrubber.text("an H&E image of invasive adenocarcinoma") == "an H&E image of invasive adenocarcinoma"
    assert "[report text]" in scrubber.text("found: Visceral pleura not involved.")


def test_scrubbing_with_thousands_of_case_ids_and_paths_stays_fast():
    ids = [f"H{i:06d}" for i in range(5000)]
    scrubber = Scrubber(case_ids=ids, paths=[f"slides/{i}/slide.svs" for i in ids])  # built once per site (~1 s)
    line = "round 4 client 2: loss=0.413 auc=0.80, 1200 tiles from 40 slides, took 12.3 s"
    start = time.perf_counter()
    for _ in range(300):
        assert scrubber.text(line) == line
    assert time.perf_counter() - start < 1.0  # about 0.2 ms a line here
    assert scrubber.text("H004999 done") == "[case] done"
