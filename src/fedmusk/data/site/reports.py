"""Pathology reports: reading them, and finding text in them that looks like a patient identifier.

``find_identifiers`` is deliberately eager: a false alarm costs a data manager a look at the report, a miss can put
a patient's name into something that leaves the hospital. It never returns the text it found, only where it is, so
callers can report "a date at character 120" without repeating the date.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedmusk.data.errors import SiteDataError

# Kinds of identifier, worded for the people who read validation output.
NAME = "name"
RECORD_NUMBER = "medical record number"
ACCESSION = "accession number"
DATE = "date"
PHONE = "phone number"
EMAIL = "email address"
SSN = "SSN-like number"


@dataclass(frozen=True)
class IdentifierFinding:
    """Something that looks like an identifier at ``text[start:end]``; ``kind`` is one of the constants above."""

    kind: str
    start: int
    end: int


REPORT_MAX_BYTES = 1 << 20  # a pathology report is a few KB; beyond 1 MiB only the start is read (validate warns)


def read_report(path: str | Path, max_bytes: int | None = None) -> str:
    """The text of a report (or any other site text file), newlines normalised to ``\n``.

    UTF-8 is expected; files saved by older Windows programs (Windows-1252) and UTF-16 files with a byte-order mark
    (Excel's and Notepad's "Unicode") are accepted too. With ``max_bytes`` only the file's first ``max_bytes`` are
    read (cut at the last line or word break before). Raises SiteDataError when the file is missing, is a folder,
    cannot be read, or is binary rather than text.
    """
    path = Path(path)
    if not path.exists():
        raise SiteDataError("file not found", path=path)
    if not path.is_file():
        raise SiteDataError("is a folder, expected a text file (.txt)", path=path)
    try:
        with path.open("rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as err:
        raise SiteDataError(f"file cannot be read ({err.strerror or type(err).__name__})", path=path) from None
    if max_bytes is not None and len(raw) > max_bytes:
        cut = max(raw.rfind(b"\n", 0, max_bytes), raw.rfind(b" ", 0, max_bytes))
        raw = raw[: cut if cut > 0 else max_bytes]
    text = decode_text(raw)
    if text is None:
        raise SiteDataError("is not a text file (it contains binary data)" if b"\x00" in raw else
                            "is not readable text (save it as UTF-8)", path=path)  # fmt: skip
    return text.replace("\r\n", "\n").replace("\r", "\n")


NOT_JSON, NO_TEXT = "not JSON", "no text"  # why a line of a .jsonl text file holds no document


def jsonl_documents(content: str) -> Iterator[tuple[int, str | None, str | None]]:
    """Each non-blank line of a .jsonl text file (one JSON object with a "text" string a line) as ``(line number,
    its text, None)``, or ``(line number, None, NOT_JSON or NO_TEXT)`` for a line that is not such an object."""
    for n, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            yield n, None, NOT_JSON
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            yield n, None, NO_TEXT
            continue
        yield n, record["text"], None

def decode_text(raw: bytes) -> str | None:
    """``raw`` decoded as UTF-16 (with a byte-order mark), UTF-8 or Windows-1252, the first that fits; None for
    binary data."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in raw:
        return None
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return None


_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
# A capitalised word as names are written in reports: "Smith", "O'Neil", "Meyer-Lansky", "SMITH".
_NAME_WORD = r"[A-Z](?:[A-Za-z'\u2019-]+|\.)"
_NAME = rf"{_NAME_WORD}(?:,? {_NAME_WORD}){{0,3}}"
# Words that follow "Patient:" or a title in reports but are not names.
_NOT_NAMES = {
    "male", "female", "man", "woman", "unknown", "the", "a", "an", "none", "not", "see", "no", "yes", "adult",
    "child", "infant", "history", "information", "consent", "identification", "id", "number", "age", "sex",
    "dr", "dr.", "mr", "mr.", "mrs", "mrs.", "ms", "ms.", "prof", "prof.", "doctor", "professor",
}

# (kind, pattern, group holding the identifier). Labels are matched case-insensitively, names case-sensitively
# (a capital letter is what separates "Dr. Smith" from "dr. said").
_PATTERNS: list[tuple[str, re.Pattern[str], int]] = [
    (EMAIL, re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), 0),
    (SSN, re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])"), 0),
    (
        PHONE,
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}|\d{3}([.-])\d{3}\1\d{4})(?!\d)"
        ),
        0,
    ),
    (PHONE, re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)"), 0),
    (
        PHONE,
        re.compile(r"(?i:\b(?:tel|phone|telephone|fax|mobile|cell|pager|bleep)\b\.?(?:\s*(?:no|number)\.?)?\s*[:#]?\s*)"
                   r"(\+?[\d(][\d ().-]{5,}\d)"),
        1,
    ),
    (DATE, re.compile(r"(?<![\d.])(?:19|20)\d{2}([-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])(?![\d])"), 0),
    (
        DATE,
        re.compile(r"(?<![\d.])(?:0?[1-9]|[12]\d|3[01])([-/.])(?:0?[1-9]|[12]\d|3[01])\1(?:\d{4}|\d{2})(?!\d|\.\d)"),
        0,
    ),
    (DATE, re.compile(rf"(?i)\b\d{{1,2}}(?:st|nd|rd|th)?[ -]+{_MONTH}\.?,?[ -]+\d{{2,4}}\b"), 0),
    (DATE, re.compile(rf"(?i)\b{_MONTH}\.?[ -]+\d{{1,2}}(?:st|nd|rd|th)?,?[ -]+\d{{4}}\b"), 0),
    (DATE, re.compile(rf"(?i)\b{_MONTH}\.?,?[ -]+(?:19|20)\d{{2}}\b"), 0),
    (DATE, re.compile(r"(?i:\b(?:dob|d\.o\.b\.|date of birth|born)\b\s*[:#]?\s*)(\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4})"), 1),
    (
        RECORD_NUMBER,
        re.compile(
            r"(?i:\b(?:mrn|medical record(?: number| no\.?| #)?|record (?:number|no\.?|#)"
            r"|patient (?:id|number|no\.?|#)|hospital (?:number|no\.?|#)|nhs (?:number|no\.?)|unit (?:number|no\.?))"
            r"\s*[:#]?\s*)([A-Za-z]{0,3}\d[\d -]{2,}\d|\d{4,})"
        ),
        1,
    ),
    (
        ACCESSION,
        re.compile(
            r"(?i:\b(?:accession(?: number| no\.?| #)?|acc(?:ession)? ?#|case (?:number|no\.?|#)"
            r"|specimen (?:number|no\.?|#)|lab (?:number|no\.?|#)|surgical (?:number|no\.?|#))"
            r"\s*[:#]?\s*)([A-Za-z0-9][A-Za-z0-9-]{3,})"
        ),
        1,
    ),
    # Pathology accession numbers as labs print them: S21-12345, SP-2021-001234, CH23-4567.
    (ACCESSION, re.compile(r"\b[A-Z]{1,3}-?(?:19|20)?\d{2}-\d{3,7}\b"), 0),
    # Bare 7-12 digit numbers are record numbers far more often than measurements; decimals are left alone, and so
    # are longer numbers (random 64-bit ids such as Flower's node and run ids have 15 or more digits).
    (RECORD_NUMBER, re.compile(r"(?<![\d.])\d{7,12}(?!\.?\d)"), 0),
    (NAME, re.compile(rf"\b(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor|Professor|Sir|Dame)\b\.?[ \t]+({_NAME})"), 1),
    (
        NAME,
        re.compile(
            r"(?i:\b(?:patient(?:'s)?(?: name)?|name|pt|surname|first name|last name|given name|surgeon|pathologist"
            r"|physician|clinician|consultant|attending|resident|referring(?: physician| doctor| clinician)?"
            r"|(?:electronically )?signed(?: out)?(?: by)?|reported by|verified by|dictated by|requested by"
            r"|ordered by|cc|copy to)\b\s*[:\-]\s*)"
            rf"({_NAME})"
        ),
        1,
    ),
]


def find_identifiers(text: str) -> list[IdentifierFinding]:
    """Spans of ``text`` that look like names, medical record or accession numbers, dates, phone numbers, email
    addresses or SSN-like numbers, sorted by position; overlapping findings are merged (the first kind wins)."""
    found: list[IdentifierFinding] = []
    for kind, pattern, group in _PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span(group)
            if kind == NAME:
                start, end = _trim_name(text, start, end)
                if start == end:
                    continue
            found.append(IdentifierFinding(kind, start, end))
    return _merge(found)


def describe_findings(text: str, findings: list[IdentifierFinding], limit: int = 5) -> str:
    """A message naming the kind and place (line, character, both from 1) of each finding, never the text found:
    "may contain patient identifiers: date at line 2, character 35; ...; remove them before training"."""
    places = []
    for f in findings[:limit]:
        line = text.count("\n", 0, f.start) + 1
        column = f.start - (text.rfind("\n", 0, f.start) + 1) + 1
        places.append(f"{f.kind} at line {line}, character {column}")
    more = f" and {len(findings) - limit} more" if len(findings) > limit else ""
    return f"may contain patient identifiers: {'; '.join(places)}{more}; remove them before training"


def _trim_name(text: str, start: int, end: int) -> tuple[int, int]:
    """Drop words like "Male" that follow "Patient:" but are not names; cut at the first such word."""
    pos = start
    for word in re.finditer(r"[^\s,]+", text[start:end]):
        if word.group().lower().strip("'\u2019-") in _NOT_NAMES:
            break
        pos = start + word.end()
    return start, pos


def _merge(found: list[IdentifierFinding]) -> list[IdentifierFinding]:
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    merged: list[IdentifierFinding] = []
    for f in found:
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            if f.end > last.end:
                merged[-1] = IdentifierFinding(last.kind, last.start, f.end)
            continue
        merged.append(f)
    return merged
