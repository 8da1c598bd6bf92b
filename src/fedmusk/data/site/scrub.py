"""The scrubber: every metric, config echo and log line that may leave a site goes through it.

A :class:`Scrubber` built with :meth:`Scrubber.from_site` knows what is private to the site (case ids, slide and
report paths as written and as absolute paths, the text of reports and pretraining captions, and the patient
attributes in DICOM headers) and also removes what looks private anywhere (absolute paths, file names of slides and
reports, names after titles, record numbers, dates, phone numbers, emails, SSN-like numbers). What it removes is
replaced by a bracketed marker such as ``[case]`` or ``[path]``, so a redacted log line still reads.

Rules worth knowing:

- case ids and paths are found inside longer strings too ("C0042" in "slideC0042_x"), ignoring case; digit-only
  values only where they are not part of a longer number;
- report and caption text is recognised by any run of 4 words (punctuation and case ignored);
- values shorter than 3 characters cannot be told apart from ordinary text and are not removed from free text
  (validation warns about such case ids); in metrics, a key equal to a case id is dropped whatever its length;
- numbers in metrics are kept (only a Python int equal to a digit-only case id is dropped); strings and keys that
  carry anything private are dropped, not rewritten.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePath

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.manifest import Manifest, on_disk_spelling, read_manifest, relative_site_path
from fedmusk.data.site.reports import REPORT_MAX_BYTES, find_identifiers, read_report
from fedmusk.data.slides.dicom_headers import dicom_patient_values

CASE = "[case]"
PATH = "[path]"
PATIENT = "[patient]"
REPORT_TEXT = "[report text]"

_MIN_LITERAL = 3
_NGRAM = 4
_WORD = re.compile(r"[^\W_]+")
_PATH_CHARS = r"[^\s'\"<>|,;()\[\]{}]"
_GENERIC_PATHS = [
    # POSIX absolute; URLs are left alone ('/' follows ':', '/', a host name or '#')
    re.compile(rf"(?<![\w:/.\\#-])~?/{_PATH_CHARS}+"),
    re.compile(rf"(?<![\w])[A-Za-z]:[\\/]{_PATH_CHARS}*"),  # Windows drive
    re.compile(rf"\\\\{_PATH_CHARS}+"),  # Windows network share
    re.compile(
        rf"{_PATH_CHARS}*?[\w-]\.(?:svs|tiff?|dcm|dicom|ndpi|mrxs|scn|bif|vms|vsi|png|jpe?g|txt|csv|jsonl)\b", re.I
    ),
]


class Scrubber:
    """Removes a site's private values from text, metrics and log records.

    Build it with :meth:`from_site` in site code. The constructor takes the values directly (tests, special uses):
    ``case_ids``, ``paths`` (relative or absolute), ``texts`` (report-like text recognised by 4-word runs; identifiers
    found in it are removed on their own as well), ``identifiers`` (other values such as DICOM patient attributes)
    and ``names`` (person names, DICOM style "FAMILY^GIVEN" or plain; each name word is also removed on its own).
    """

    def __init__(
        self,
        case_ids: Iterable[str] = (),
        paths: Iterable[str] = (),
        texts: Iterable[str] = (),
        identifiers: Iterable[str] = (),
        names: Iterable[str] = (),
    ) -> None:
        self._literals: dict[str, str] = {}  # lower-cased value -> marker, found inside longer strings
        self._words: dict[str, str] = {}  # lower-cased value -> marker, found only as a whole word
        self._exact_ids: set[str] = set()
        self._ngrams: set[str] = set()
        for case_id in case_ids:
            if case_id.strip():
                self._exact_ids.add(case_id.strip().lower())
                self._add(case_id, CASE)
        for path in paths:
            self._add_path(str(path))
        for value in identifiers:
            self._add(value, PATIENT)
        for name in names:
            self._add_name(name)
        for text in texts:
            self._add_text(text)
        self._compile()

    @classmethod
    def from_site(cls, site_root: str | Path, manifest: Manifest | None = None) -> Scrubber:
        """A scrubber for the site at ``site_root``: every case id and path written in the manifest (including rows
        that have errors), the site folder itself, report texts, pretraining texts and captions, and the patient
        attributes of every DICOM slide. Files that cannot be read are skipped; this never raises for bad data."""
        site_root = Path(site_root)
        manifest = manifest if manifest is not None else read_manifest(site_root, strict=False)
        case_ids, paths, texts, identifiers, names = [], [str(site_root)], [], [], []
        try:
            paths.append(str(site_root.resolve()))
        except OSError:
            pass
        identifying = set(manifest.identifying_columns)
        for _, cells in manifest.raw_rows:
            case_ids.append(cells.get("case_id", ""))
            identifiers.extend(v for k, v in cells.items() if k in identifying)
            for column in ("slide", "report"):
                written = cells.get(column, "").strip()
                if not written:
                    continue
                paths.append(written)
                rel, _ = relative_site_path(written)
                if rel is None:
                    continue
                disk = on_disk_spelling(site_root, rel)  # a decomposed (macOS) file name, spelled as on disk
                paths.extend(dict.fromkeys([rel, str(site_root / rel), disk, str(site_root / disk)]))
                if column == "report":
                    texts.append(_text_or_empty(site_root / rel, REPORT_MAX_BYTES))
                else:
                    dicom_values, dicom_names = dicom_patient_values(site_root / rel)
                    identifiers.extend(dicom_values)
                    names.extend(dicom_names)
        texts.extend(_pretrain_texts(site_root / "pretrain", paths))
        return cls(case_ids, paths, texts, identifiers, names)

    # -- building ---------------------------------------------------------------------------------------------------

    def _add(self, value: str, marker: str, whole_word: bool = False) -> None:
        value = str(value).strip().lower()
        if len(value) < _MIN_LITERAL:
            return
        (self._words if whole_word else self._literals).setdefault(value, marker)

    def _add_path(self, path: str) -> None:
        path = path.strip()
        if not path:
            return
        for variant in {path, path.replace("\\", "/"), path.replace("/", "\\")}:
            self._add(variant, PATH)
        # Folder and file names can carry identifiers of their own ("SMITH_J/S21-1234.svs"); plain lower-case words
        # ("slides", "images") are left alone so that ordinary log text survives.
        for part in re.split(r"[\\/]", path):
            stem = part.rsplit(".", 1)[0] if "." in part[1:] else part
            for piece in {part, stem}:
                if len(piece) >= 4 and not re.fullmatch(r"[a-z]+", piece):
                    self._add(piece, PATH)

    def _add_name(self, name: str) -> None:
        text = str(name).replace("^", " ").replace(",", " ")
        self._add(" ".join(text.split()), PATIENT)
        for word in text.split():
            self._add(word.strip("."), PATIENT, whole_word=True)

    def _add_text(self, text: str) -> None:
        words = [w.group().lower() for w in _WORD.finditer(text)]
        for i in range(len(words) - _NGRAM + 1):
            gram = words[i : i + _NGRAM]
            if any(len(w) >= 3 and not w.isdigit() for w in gram):
                self._ngrams.add(" ".join(gram))
        for f in find_identifiers(text):
            found = text[f.start : f.end]
            if f.kind == "name":
                self._add_name(found)
            else:
                self._add(found, f"[{f.kind}]")

    def _compile(self) -> None:
        self._patterns: list[tuple[re.Pattern[str], dict[str, str]]] = []
        digits = {k: v for k, v in self._literals.items() if k.isdigit()}
        inside = {k: v for k, v in self._literals.items() if not k.isdigit()}
        if inside:
            self._patterns.append((re.compile(_trie_regex(inside), re.I), inside))
        if digits:
            self._patterns.append((re.compile(rf"(?<!\d)(?<!\d\.){_trie_regex(digits)}(?!\d)"), digits))
        if self._words:
            pattern = rf"(?<![^\W_]){_trie_regex(self._words)}(?![^\W_])"
            self._patterns.append((re.compile(pattern, re.I), self._words))

    # -- using ------------------------------------------------------------------------------------------------------

    def text(self, value: object) -> str:
        """``value`` as a string with everything private replaced by a marker ([case], [path], [patient],
        [report text], [date], [name], ...)."""
        text = value if isinstance(value, str) else str(value)
        spans = self._spans(text)
        if not spans:
            return text
        out, pos = [], 0
        for start, end, marker in spans:
            out.append(text[pos:start])
            out.append(marker)
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def is_clean(self, value: object) -> bool:
        """True when ``value`` (as text) carries nothing the scrubber would remove."""
        return not self._spans(value if isinstance(value, str) else str(value))

    def metrics(self, metrics: Mapping) -> dict:
        """A copy of ``metrics`` (nested dicts, lists and tuples allowed) without any key or string value that
        carries a private value. Numbers (int, float, bool, numpy scalars and numeric arrays) are kept as they are,
        except a Python int equal to a digit-only case id."""
        return self._clean_mapping(metrics)

    def logging_filter(self) -> ScrubbingFilter:
        """A logging.Filter that rewrites each record's message, exception text and string extras with
        :meth:`text`. Attach it with :meth:`ScrubbingFilter.attach` so records of child loggers are covered too."""
        return ScrubbingFilter(self)

    def attach(self, logger: str | logging.Logger = "fedmusk") -> ScrubbingFilter:
        """Scrub every record that ``logger`` (and its child loggers) emit; returns the filter (``.detach()``)."""
        return self.logging_filter().attach(logger)

    def _spans(self, text: str) -> list[tuple[int, int, str]]:
        spans = []
        for pattern, markers in self._patterns:
            for m in pattern.finditer(text):
                spans.append((m.start(), m.end(), markers.get(m.group().lower(), PATH)))
        if self._ngrams:
            spans.extend(self._ngram_spans(text))
        for pattern in _GENERIC_PATHS:
            spans.extend((m.start(), m.end(), PATH) for m in pattern.finditer(text))
        spans.extend((f.start, f.end, f"[{f.kind}]") for f in find_identifiers(text))
        return _merge(spans)

    def _ngram_spans(self, text: str) -> list[tuple[int, int, str]]:
        words = list(_WORD.finditer(text))
        spans = []
        for i in range(len(words) - _NGRAM + 1):
            gram = " ".join(w.group().lower() for w in words[i : i + _NGRAM])
            if gram in self._ngrams:
                spans.append((words[i].start(), words[i + _NGRAM - 1].end(), REPORT_TEXT))
        return spans

    def _shareable(self, value) -> bool:
        text = str(value)
        return text.strip().lower() not in self._exact_ids and self.is_clean(text)

    def _clean_mapping(self, metrics: Mapping) -> dict:
        out = {}
        for key, value in metrics.items():
            if not self._shareable(key):
                continue
            keep, cleaned = self._clean_value(value)
            if keep:
                out[key] = cleaned
        return out

    def _clean_value(self, value) -> tuple[bool, object]:
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in self._exact_ids:
            return False, None  # a numeric case id sent as a number
        if value is None or isinstance(value, (bool, int, float, complex)):
            return True, value
        if isinstance(value, str):
            return self._shareable(value), value
        if isinstance(value, (bytes, bytearray, PurePath)):
            return False, None
        if isinstance(value, Mapping):
            return True, self._clean_mapping(value)
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [c for keep, c in (self._clean_value(v) for v in value) if keep]
            return True, (items if isinstance(value, list) else type(value)(items))
        dtype = getattr(value, "dtype", None)  # numpy scalars and arrays, torch tensors
        if dtype is not None and getattr(dtype, "kind", "f") in "biufc" and not str(dtype).startswith("<U"):
            return True, value
        return self._shareable(value), value


class ScrubbingFilter(logging.Filter):
    """Rewrites log records through a :class:`Scrubber` (message with its arguments, exception and stack text, and
    string attributes passed with ``extra=``). Never drops a record."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber
        self._attached: list[logging.Logger | logging.Handler] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_fedmusk_scrubbed", False):
            return True
        scrub = self.scrubber.text
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not let its arguments through unscrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = scrub(message), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # handlers that format exc_info themselves would bypass the scrubbed text
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in self._STANDARD and isinstance(value, str):
                setattr(record, name, scrub(value))
        record._fedmusk_scrubbed = True
        return True

    def attach(self, logger: str | logging.Logger = "fedmusk") -> ScrubbingFilter:
        """Add this filter to ``logger`` and to every handler that its records reach (its own and its ancestors').

        A logger's own filters do not see records from child loggers, handlers do; so this covers
        ``fedmusk.client`` and friends. Handlers added later need ``handler.addFilter(filter)``.
        """
        log = logging.getLogger(logger) if isinstance(logger, str) else logger
        targets: list[logging.Logger | logging.Handler] = [log]
        current: logging.Logger | None = log
        while current is not None:
            targets.extend(current.handlers)
            current = current.parent if current.propagate else None
        for target in targets:
            if self not in target.filters:
                target.addFilter(self)
                self._attached.append(target)
        return self

    def detach(self) -> None:
        for target in self._attached:
            target.removeFilter(self)
        self._attached.clear()



def _pretrain_texts(pretrain: Path, paths: list[str]) -> list[str]:
    """Texts and captions of the site's pretraining data (site-private too); caption image paths go to ``paths``."""
    texts: list[str] = []
    text_dir = pretrain / "text"
    if text_dir.is_dir():
        for file in sorted(text_dir.rglob("*")):
            suffix = file.suffix.lower()
            if suffix == ".txt":
                texts.append(_text_or_empty(file))
            elif suffix == ".jsonl":
                for line in _text_or_empty(file).splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("text"), str):
                        texts.append(record["text"])
    pairs = pretrain / "pairs.csv"
    if pairs.is_file():
        for row in csv.DictReader(_text_or_empty(pairs).splitlines()):
            texts.append(str(row.get("caption") or ""))
            if row.get("image"):
                paths.append(str(row["image"]))
    return texts


def _text_or_empty(path: Path, max_bytes: int | None = None) -> str:
    try:
        return read_report(path, max_bytes)
    except SiteDataError:
        return ""


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    spans.sort(key=lambda s: (s[0], -s[1]))
    merged: list[tuple[int, int, str]] = []
    for start, end, marker in spans:
        if merged and start < merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2])
        else:
            merged.append((start, end, marker))
    return merged


def _trie_regex(words: Iterable[str]) -> str:
    """One regular expression matching any of ``words`` (longest first), sharing common prefixes so that thousands
    of case ids and paths cost little per log line."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        ends = "" in node
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        if len(branches) == 1 and not ends:
            return branches[0]
        body = "(?:" + "|".join(branches) + ")"
        return body + "?" if ends else body

    # Long single-child chains are concatenated, so nesting grows only at branch points; a path of 300 characters
    # still recurses once per character, well inside Python's limit.
    return build(trie)


def site_line_filter(site_root: str | Path, scrubber: Scrubber | None = None) -> Callable[[str], str]:
    """A filter for lines about the site at ``site_root`` (its own log, an error that leaves it): the site folder's
    path written as ``<site>``, then everything ``scrubber`` removes (none: the path only)."""
    root = Path(site_root)
    paths = sorted({str(root), str(root.resolve())}, key=len, reverse=True)

    def scrub(line: str) -> str:
        for path in paths:
            line = line.replace(path, "<site>")
        return scrubber.text(line) if scrubber is not None else line

    return scrub
