"""The site manifest: ``<site_root>/manifest.csv``, one row per slide, read strictly.

Columns (header names are matched ignoring case and surrounding spaces):

- ``case_id``  required, the site's own pseudonym for the patient case (never a name or record number)
- ``slide``    required, path relative to the site folder: a DICOM WSI series folder or .dcm file, an .svs/.tif/.tiff
  file, or a folder of tile images
- ``report``   optional, path of the case's pathology report (.txt) relative to the site folder
- ``time``     required, follow-up in months (a number >= 0)
- ``event``    required, 1 = event observed, 0 = censored
- ``response`` optional, 1 / 0 / empty
- ``split``    optional, train / val / test / empty

Rows are numbered as data rows: row 1 is the first row under the header (a spreadsheet shows it as line 2). All rows
of one case must agree on time, event, response and split. Comma-, semicolon- and tab-separated files are accepted,
UTF-8 (with or without the mark Excel writes) or Windows-1252.
"""

from __future__ import annotations

import csv
import io
import math
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.problems import ERROR, Problem, error, warning

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("case_id", "slide", "time", "event")
OPTIONAL_COLUMNS = ("report", "response", "split")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
SPLITS = ("train", "val", "test")
LABEL_FIELDS = ("time", "event", "response", "split")
# Column names that suggest someone exported identifiers along with the manifest.
_IDENTIFYING_COLUMN = re.compile(
    r"name|mrn|record|birth|dob|ssn|social|phone|email|address|accession|patient|insurance|zip|postcode", re.I
)


@dataclass(frozen=True)
class ManifestRow:
    """One usable manifest row. ``row`` is the 1-based data row; paths are relative to the site root, '/'-separated."""

    row: int
    case_id: str
    slide: str
    report: str | None
    time: float
    event: int
    response: int | None
    split: str | None


@dataclass
class Case:
    """All slides of one patient case with its labels (agreed by every row of the case)."""

    case_id: str
    slides: list[str]
    reports: list[str]
    time: float
    event: int
    response: int | None
    split: str | None
    rows: list[int]


@dataclass
class Manifest:
    """A parsed manifest.

    ``rows`` holds only rows without errors (rows of a case whose labels disagree are left out entirely);
    ``raw_rows`` holds every non-blank data row as written, as (row number, {column: value}), for code that must know
    everything the site wrote down (the scrubber); ``problems`` lists what was wrong.
    """

    site_root: Path
    columns: list[str] = field(default_factory=list)
    rows: list[ManifestRow] = field(default_factory=list)
    raw_rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    total_rows: int = 0

    def cases(self) -> list[Case]:
        """The usable rows grouped by case, in order of first appearance."""
        cases: dict[str, Case] = {}
        for r in self.rows:
            case = cases.get(r.case_id)
            if case is None:
                case = cases[r.case_id] = Case(r.case_id, [], [], r.time, r.event, r.response, r.split, [])
            case.slides.append(r.slide)
            if r.report is not None and r.report not in case.reports:
                case.reports.append(r.report)
            case.rows.append(r.row)
        return list(cases.values())

    @property
    def identifying_columns(self) -> list[str]:
        """Unknown columns whose names suggest patient identifiers (their values are scrubbed like case ids)."""
        return [c for c in self.columns if c not in COLUMNS and _IDENTIFYING_COLUMN.search(c)]


def read_manifest(site_root: str | Path, strict: bool = True) -> Manifest:
    """Read ``<site_root>/manifest.csv``.

    With ``strict=True`` (the default for training code) the first error raises SiteDataError naming the row and
    field; with ``strict=False`` every problem is collected in ``Manifest.problems`` and nothing is raised for bad
    data (validation uses this).
    """
    site_root = Path(site_root)
    manifest = Manifest(site_root)
    _parse(site_root, manifest)
    if strict:
        errors = [p for p in manifest.problems if p.severity == ERROR]
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more; run 'fedmusk validate' to see them all)" if len(errors) > 1 else ""
            raise SiteDataError(first.message + more, path=first.path, row=first.row, field=first.field)
    return manifest


def relative_site_path(value: str) -> tuple[str | None, str | None]:
    """Normalise a path written in the manifest: (path relative to the site, '/'-separated, or None; why not).

    Backslashes count as separators (manifests written on Windows). Absolute paths and paths that climb out of the
    site folder with '..' are refused: everything a site uses must lie inside the site folder.
    """
    text = value.strip().replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None, "is an absolute path; give it relative to the site folder (data must stay inside the site)"
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None, "leads outside the site folder ('..'); data must stay inside the site"
            parts.pop()
        else:
            parts.append(part)
    if not parts:
        return None, "is not a file or folder inside the site"
    return "/".join(parts), None


def _parse(site_root: Path, manifest: Manifest) -> None:
    problems = manifest.problems
    path = site_root / MANIFEST_NAME
    if not site_root.is_dir():
        problems.append(error(f"site folder not found (or not a folder): {site_root}"))
        return
    if not path.is_file():
        problems.append(error(f"{MANIFEST_NAME} not found in the site folder", path=MANIFEST_NAME))
        return
    try:
        raw = path.read_bytes()
    except OSError as err:
        problems.append(error(f"cannot be read ({err.strerror or type(err).__name__})", path=MANIFEST_NAME))
        return
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw[1:2] == b"\x00" or raw[:1] == b"\x00":
        try:  # Excel's "Unicode Text" (UTF-16, tab-separated); without a byte-order mark, NUL bytes give it away
            bom = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
            text = raw.decode("utf-16" if bom else "utf-16-le" if raw[1:2] == b"\x00" else "utf-16-be")
        except UnicodeDecodeError:
            problems.append(error("looks like UTF-16 text but cannot be decoded; save it as CSV UTF-8",
                                  path=MANIFEST_NAME))  # fmt: skip
            return
        problems.append(warning("is UTF-16 (Excel's 'Unicode Text'); it was read as such (CSV UTF-8 is preferred)",
                                path=MANIFEST_NAME))  # fmt: skip
        text = text.lstrip("\ufeff")
    else:
        text = None
    try:
        text = raw.decode("utf-8-sig") if text is None else text
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            problems.append(error("is not a text file (save it as CSV, UTF-8)", path=MANIFEST_NAME))
            return
        problems.append(warning("is not UTF-8; it was read as Windows-1252 (save it as CSV UTF-8)", path=MANIFEST_NAME))
    first_line = text.split("\n", 1)[0]
    delimiter = ","
    if "," not in first_line:
        delimiter = ";" if ";" in first_line else "\t" if "\t" in first_line else ","
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not records or not any(c.strip() for c in records[0]):
        problems.append(error("is empty: it needs a header line naming the columns", path=MANIFEST_NAME))
        return
    header = [h.strip().lower() for h in records[0]]
    data = records[1:]
    manifest.columns = [h for h in header if h]
    _collect_raw(header, data, manifest)
    if not _check_header(header, data, problems):
        return
    if manifest.total_rows == 0:
        problems.append(error("has a header but no data rows", path=MANIFEST_NAME))
        return
    parsed = [_parse_row(n, cells, header, problems) for n, cells in _data_rows(header, data)]
    parsed = [_as_on_disk(site_root, r) for r in parsed if r is not None]
    manifest.rows = _check_cases(parsed, problems)


def _as_on_disk(site_root: Path, row: ManifestRow) -> ManifestRow:
    """``row`` with its paths spelled as on disk where they differ only in Unicode normalisation (a name typed in
    a spreadsheet is composed, NFC; macOS writes file names decomposed, NFD)."""
    slide = on_disk_spelling(site_root, row.slide)
    report = None if row.report is None else on_disk_spelling(site_root, row.report)
    return row if (slide, report) == (row.slide, row.report) else replace(row, slide=slide, report=report)


def on_disk_spelling(site_root: Path, relative: str) -> str:
    """``relative`` as it is spelled on disk, matching each part by its NFC form when the exact spelling does not
    exist; ``relative`` unchanged when nothing matches (the caller reports it as not found)."""
    if (site_root / relative).exists() or relative.isascii():
        return relative
    folder, parts = site_root, []
    for part in relative.split("/"):
        if not (folder / part).exists():
            wanted = unicodedata.normalize("NFC", part)
            try:
                part = next((e.name for e in folder.iterdir() if unicodedata.normalize("NFC", e.name) == wanted),
                            part)  # fmt: skip
            except OSError:
                return relative
        parts.append(part)
        folder = folder / part
    return "/".join(parts)


def _check_header(header: list[str], data: list[list[str]], problems: list[Problem]) -> bool:
    """Report missing, duplicate, unnamed and unknown columns; False when rows cannot be read at all."""
    ok = True
    seen: set[str] = set()
    for i, name in enumerate(header):
        if not name:
            if any(i < len(cells) and cells[i].strip() for cells in data):
                problems.append(warning(f"column {i + 1} has no name in the header; its values are ignored",
                                        path=MANIFEST_NAME))
            continue
        if name in seen:
            problems.append(error(f"column '{name}' appears twice in the header", field=name, path=MANIFEST_NAME))
            ok = False
        seen.add(name)
    for name in REQUIRED_COLUMNS:
        if name not in seen:
            found = ", ".join(h for h in header if h) or "none"
            problems.append(error(f"required column '{name}' is missing (columns found: {found})", field=name,
                                  path=MANIFEST_NAME))
            ok = False
    for name in header:
        if name and name not in COLUMNS:
            if _IDENTIFYING_COLUMN.search(name):
                message = (f"column '{name}' looks like it holds patient identifiers; remove it (fedmusk only needs "
                           f"{', '.join(COLUMNS)})")
            else:
                message = f"unknown column '{name}' is ignored (known columns: {', '.join(COLUMNS)})"
            problems.append(warning(message, field=name, path=MANIFEST_NAME))
    return ok


def _data_rows(header: list[str], data: list[list[str]]):
    """(row number, cells) for every non-blank data row; blank rows keep their number so rows match the file."""
    for n, cells in enumerate(data, start=1):
        if any(c.strip() for c in cells):
            yield n, cells


def _collect_raw(header: list[str], data: list[list[str]], manifest: Manifest) -> None:
    for n, cells in _data_rows(header, data):
        manifest.raw_rows.append((n, {h: c for h, c in zip(header, cells) if h}))
    manifest.total_rows = len(manifest.raw_rows)


def _parse_row(n: int, cells: list[str], header: list[str], problems: list[Problem]) -> ManifestRow | None:
    before = len(problems)

    def bad(message: str, column: str | None = None) -> None:
        problems.append(error(message, row=n, field=column, path=MANIFEST_NAME))

    extra = cells[len(header):]
    if any(c.strip() for c in extra):
        bad(f"row has {len(cells)} values but the header names {len(header)} columns "
            "(a separator inside a value? put such values in double quotes)")
    values = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header) if h}

    case_id = values["case_id"]
    if not case_id:
        bad("case_id is empty", "case_id")
    elif any(ch.isspace() for ch in case_id):
        problems.append(warning("case_id contains spaces; case ids must be pseudonyms such as C0042, never names",
                                row=n, field="case_id", path=MANIFEST_NAME))
    elif len(case_id) < 3:
        problems.append(warning("case_id is shorter than 3 characters, too short to be kept out of shared logs "
                                "reliably; use pseudonyms such as C0042", row=n, field="case_id", path=MANIFEST_NAME))

    slide = None
    if not values["slide"]:
        bad("slide is empty: give the slide's path relative to the site folder", "slide")
    else:
        slide, why = relative_site_path(values["slide"])
        if why:
            bad(f"slide path {why}", "slide")

    report = None
    if values.get("report"):
        report, why = relative_site_path(values["report"])
        if why:
            bad(f"report path {why}", "report")

    time = _parse_time(values["time"], bad)
    event = _parse_binary(values["event"], "event", "1 (event observed) or 0 (censored)", bad, required=True)
    response = _parse_binary(values.get("response", ""), "response", "1, 0 or empty", bad, required=False)

    split = values.get("split", "").lower() or None
    if split is not None and split not in SPLITS:
        hint = " (write 'val')" if split in ("valid", "validation", "dev") else ""
        bad(f"split must be train, val, test or empty, found {_show(split) or 'something else'}{hint}", "split")

    if any(p.severity == ERROR for p in problems[before:]):
        return None
    return ManifestRow(n, case_id, slide, report, time, event, response, split)  # type: ignore[arg-type]


def _parse_time(value: str, bad) -> float | None:
    if not value:
        bad("time is empty: give the follow-up time in months", "time")
        return None
    try:
        time = float(value)
    except ValueError:
        if re.search(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}", value):
            bad("time looks like a date; give the follow-up time in months instead", "time")
        elif re.fullmatch(r"-?\d+,\d+", value):
            bad("time uses a decimal comma; write it with a decimal point (e.g. 12.5)", "time")
        else:
            bad(f"time is not a number of months{_show_in(value)}", "time")
        return None
    if not math.isfinite(time):
        bad("time must be a finite number of months", "time")
        return None
    if time < 0:
        bad(f"time is negative ({value}); follow-up time must be 0 months or more", "time")
        return None
    return time


def _parse_binary(value: str, column: str, allowed: str, bad, required: bool) -> int | None:
    if not value:
        if required:
            bad(f"{column} is empty; it must be {allowed}", column)
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number in (0.0, 1.0):  # also 0.0 / 1.0 as some exports write integers
        return int(number)
    bad(f"{column} must be {allowed}, found {_show(value) or 'something else'}", column)
    return None


_SHOWABLE_WORDS = {"yes", "no", "true", "false", "y", "n", "dead", "alive", "na", "n/a", "nan", "none", "null",
                   "train", "training", "val", "valid", "validation", "dev", "test", "testing", "unknown", "censored"}


def _show(value: str) -> str:
    """A value quoted for a message, but only when it cannot be an identifier (short numbers and known words);
    validation output may be shared with the coordinator."""
    v = value.strip()
    if re.fullmatch(r"[-+]?\d{1,6}(?:[.,]\d{1,4})?", v) or v.lower() in _SHOWABLE_WORDS:
        return f"'{v}'"
    return ""


def _show_in(value: str) -> str:
    shown = _show(value)
    return f" (found {shown})" if shown else ""


def _check_cases(rows: list[ManifestRow], problems: list[Problem]) -> list[ManifestRow]:
    """Every row of a case must carry the same labels; all rows of a case that disagrees are left out."""
    first: dict[str, ManifestRow] = {}
    broken: set[str] = set()
    seen_slides: dict[str, int] = {}
    usable = []
    for r in rows:
        if r.slide in seen_slides:
            problems.append(error(f"the same slide is already listed in row {seen_slides[r.slide]}; list each slide "
                                  "once", row=r.row, field="slide", path=MANIFEST_NAME))
            continue
        seen_slides[r.slide] = r.row
        usable.append(r)
        ref = first.setdefault(r.case_id, r)
        for name in LABEL_FIELDS:
            mine, theirs = getattr(r, name), getattr(ref, name)
            same = (mine == theirs) if name != "time" else math.isclose(mine, theirs, abs_tol=1e-9)
            if not same:
                problems.append(error(
                    f"{name} differs from row {ref.row} of the same case ({_label(mine)} here, {_label(theirs)} "
                    "there); all rows of a case must carry the same labels",
                    row=r.row, field=name, path=MANIFEST_NAME))
                broken.add(r.case_id)
    return [r for r in usable if r.case_id not in broken]


def _label(value) -> str:
    if value is None:
        return "empty"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
