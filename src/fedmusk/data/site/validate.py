"""``fedmusk validate``: check every row and every file of a site before it joins a federation.

:func:`validate_site` never raises for a problem in the data; it returns a :class:`ValidationReport` listing each
:class:`Problem` with its row, field and file. Errors make the row (or the site) unusable; warnings are worth a look.
Messages never repeat report text or identifiers: for a suspected identifier they say which kind and where.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.manifest import MANIFEST_NAME, Manifest, ManifestRow, read_manifest
from fedmusk.data.site.problems import ERROR, WARNING, Problem, error, warning
from fedmusk.data.site.reports import REPORT_MAX_BYTES, describe_findings, find_identifiers, read_report
from fedmusk.data.site.validate_pretrain import pretrain_problems
from fedmusk.data.slides.dicom_headers import has_dicom_preamble, is_dicom_file, wsi_header_problem

__all__ = ["Problem", "ValidationReport", "validate_site", "run_validate", "content_fingerprint"]

ROW_HEADER = "row\n(1 = first\ndata row)"  # stated in the header: a spreadsheet would call row 1 line 2
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
_OTHER_WSI_SUFFIXES = {".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".czi", ".isyntax", ".vsi"}
_TILE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_FINGERPRINT_BYTES = 1 << 20


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_site`.

    ``valid_rows`` are the manifest rows that training can use (no error on the row, its case, slide or report);
    ``total_rows`` counts all non-blank data rows. ``ok`` is True when there is no error at all.
    """

    site_root: Path
    problems: list[Problem] = field(default_factory=list)
    valid_rows: list[ManifestRow] = field(default_factory=list)
    total_rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: rows usable, errors and warnings, and what to do next."""
        counts = f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"
        rows = f"{len(self.valid_rows)} of {_plural(self.total_rows, 'manifest row')} usable"
        if self.ok:
            return f"Site is ready: {rows}; {counts}."
        return f"Site is NOT ready: {rows}; {counts}. Fix the errors and run 'fedmusk validate' again."

    def render(self, show_paths: bool = True) -> Table:
        """The problems as a table (severity, row, field, file, problem) with the summary as its caption.

        ``show_paths=False`` keeps only fedmusk's own file names (manifest.csv, pretrain/pairs.csv) in the file column
        and removes paths and site values from the messages, for a table that is to be sent outside the site.
        """
        scrub = None
        if not show_paths:
            from fedmusk.data.site.scrub import Scrubber

            scrub = Scrubber.from_site(self.site_root).text
        table = Table(title="fedmusk site check", caption=self.summary(), caption_justify="left", expand=False)
        table.add_column("severity", no_wrap=True)
        table.add_column(ROW_HEADER, justify="right", no_wrap=True)
        table.add_column("field", no_wrap=True)
        table.add_column("file", overflow="fold")
        table.add_column("problem", overflow="fold")
        for p in self.problems:
            style = "bold red" if p.severity == ERROR else "yellow"
            place = p.path or "" if scrub is None else _shareable_place(p.path)
            message = p.message if scrub is None else scrub(p.message)
            # Text cells: messages may contain brackets ("[Errno 2]", "[path]") that rich would take for markup.
            table.add_row(Text(p.severity, style=style), Text("" if p.row is None else str(p.row)),
                          Text(p.field or ""), Text(place), Text(message))
        return table

    def print(self, console: Console, show_paths: bool = True) -> None:
        """Print the table (or a one-line all-clear) and the summary."""
        if self.problems:
            console.print(self.render(show_paths))
        else:
            style = "bold green" if self.ok else "bold red"
            console.print(Text(self.summary(), style=style))


def validate_site(
    site_root: str | Path, check_slides: bool = True, progress: bool = True, console: Console | None = None
) -> ValidationReport:
    """Check the manifest, every slide and report it names, and the optional ``pretrain/`` folder.

    ``check_slides=True`` opens every slide and reads a little of each level (slow for large sites, but it is the
    only way to find truncated files); ``False`` checks existence, format and DICOM headers only. Progress is shown
    on ``console`` (stderr by default) when ``progress`` is True. Never raises for problems in the data.
    """
    site_root = Path(site_root)
    manifest = read_manifest(site_root, strict=False)
    report = ValidationReport(site_root, list(manifest.problems), total_rows=manifest.total_rows)
    bad_rows: set[int] = set()
    _check_files(site_root, manifest, check_slides, progress, console, report.problems, bad_rows)
    report.problems.extend(pretrain_problems(site_root / "pretrain", check_slides))
    report.problems.sort(key=_order)
    report.valid_rows = [r for r in manifest.rows if r.row not in bad_rows]
    return report


def run_validate(site_root: Path, console: Console, check_slides: bool = True) -> int:
    """What ``fedmusk validate <site_root>`` does: validate, print the table, return the exit code (0 when the
    site has no errors, 1 otherwise)."""
    report = validate_site(site_root, check_slides=check_slides, progress=console.is_terminal, console=console)
    report.print(console)
    return 0 if report.ok else 1


# -- slides and reports listed in the manifest ----------------------------------------------------------------------


def _check_files(site_root, manifest: Manifest, check_slides, progress, console, problems, bad_rows) -> None:
    fingerprints: dict[str, ManifestRow] = {}
    report_blocked: dict[str, bool] = {}  # report path -> it has an error (shown on the first row naming it)

    def add(found: Iterable[Problem], row: ManifestRow) -> None:
        for p in found:
            problems.append(p)
            if p.severity == ERROR:
                bad_rows.add(row.row)

    for row in _progress(manifest.rows, progress, console):
        try:
            add(_slide_problems(site_root, row, check_slides), row)
            fp = content_fingerprint(site_root / row.slide) if row.row not in bad_rows else None
        except Exception as err:  # noqa: BLE001 - a checker bug must not hide the other rows' results
            add([error(f"could not be checked ({type(err).__name__}: {err})", row=row.row, field="slide",
                       path=row.slide)], row)
            fp = None
        if fp is not None:
            first = fingerprints.setdefault(fp, row)
            if first is not row:
                add([_duplicate_content(row, first)], row)
        if row.report is not None:
            if row.report not in report_blocked:
                found = _report_problems(site_root, row)
                report_blocked[row.report] = any(p.severity == ERROR for p in found)
                add(found, row)
            elif report_blocked[row.report]:
                bad_rows.add(row.row)


def _progress(rows: list[ManifestRow], enabled: bool, console: Console | None):
    if not enabled or not rows:
        yield from rows
        return
    from rich.progress import Progress

    with Progress(console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("Checking slides and reports", total=len(rows))
        for row in rows:
            yield row
            bar.advance(task)


def _slide_problems(site_root: Path, row: ManifestRow, check_slides: bool) -> list[Problem]:
    path = site_root / row.slide

    def bad(message: str, where: str = row.slide) -> list[Problem]:
        return [error(message, row=row.row, field="slide", path=where)]

    if not path.exists():
        return bad("slide not found: no such file or folder in the site folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if path.stat().st_size == 0:
            return bad("slide file is empty (0 bytes)")
        if suffix in _OTHER_WSI_SUFFIXES:
            return bad(f"{suffix} slides are not supported; convert them to DICOM WSI or pyramidal TIFF (.tif/.svs)")
        if suffix not in SLIDE_SUFFIXES and not has_dicom_preamble(path):
            return bad("not a supported slide format (expected DICOM WSI, .svs/.tif/.tiff, or a folder of "
                       ".png/.jpg tiles)")
        dicom_files = [path] if suffix in (".dcm", ".dicom") or has_dicom_preamble(path) else []
    elif path.is_dir():
        dicom_files = [f for f in sorted(path.iterdir())
                       if f.is_file() and f.suffix.lower() not in _TILE_SUFFIXES and is_dicom_file(f)]
    else:
        return bad("slide is neither a file nor a folder")
    found = [p for f in dicom_files for p in _dicom_header_problems(site_root, f, row)]
    if found or not check_slides:
        return found
    from fedmusk.data.slides import check_slide

    try:
        check_slide(path)
        tissue = _tissue_share(path)
    except SiteDataError as err:
        return bad(_without_site_root(site_root, err.message), _inside(site_root, err.path) or row.slide)
    except Exception as err:  # noqa: BLE001 - third-party readers raise all sorts of things for damaged files
        return bad(_without_site_root(site_root, f"slide cannot be read ({type(err).__name__}: {err})"))
    if tissue < _MIN_TISSUE_SHARE:
        return [warning("no tissue detected on this slide (blank or very pale scan?); it gives no tiles, and a case "
                        "whose slides are all like this is excluded from training and evaluation", row=row.row,
                        field="slide", path=row.slide)]  # fmt: skip
    return []


_MIN_TISSUE_SHARE = 1e-3  # of the thumbnail: below this, tissue detection finds nothing to tile
_THUMBNAIL_PX = 1024


def _tissue_share(path: Path) -> float:
    """The share of the slide's thumbnail that tissue detection calls tissue (0 for a blank scan)."""
    from fedmusk.data.slides import open_slide
    from fedmusk.data.slides.tissue import tissue_fraction

    with open_slide(path) as slide:
        return tissue_fraction(slide.thumbnail(_THUMBNAIL_PX))


def _without_site_root(site_root: Path, message: str) -> str:
    """Readers' messages quote absolute paths; inside the site table, paths relative to the site root read better."""
    for root in {str(site_root), str(site_root.resolve())}:
        message = message.replace(root.rstrip("/\\") + "/", "").replace(root.rstrip("/\\") + "\\", "")
    return message


def _inside(site_root: Path, path: str | None) -> str | None:
    """``path`` relative to the site root (the exact file a reader complained about), or None."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(site_root.resolve()).as_posix()
    except (ValueError, OSError):
        return None


def _dicom_header_problems(site_root: Path, file: Path, row: ManifestRow) -> list[Problem]:
    why = wsi_header_problem(file)
    if why is None:
        return []
    return [error(why, row=row.row, field="slide", path=file.relative_to(site_root).as_posix())]


def _duplicate_content(row: ManifestRow, first: ManifestRow) -> Problem:
    if row.case_id == first.case_id:
        return warning(f"same file content as the slide in row {first.row} of the same case (listed twice under "
                       "different names); it will count twice", row=row.row, field="slide", path=row.slide)
    return error(f"same file content as the slide in row {first.row}, which belongs to a different case; a slide "
                 "belongs to exactly one case", row=row.row, field="slide", path=row.slide)


def content_fingerprint(path: Path) -> str | None:
    """A cheap fingerprint that is equal for copies of a slide: for a file its size and first MiB; for a folder
    every file's name and size plus the first MiB of the largest file. None when nothing can be read."""
    h = hashlib.sha256()
    try:
        if path.is_file():
            h.update(str(path.stat().st_size).encode())
            h.update(_head(path))
            return h.hexdigest()
        files = sorted(f for f in path.rglob("*") if f.is_file())
        if not files:
            return None
        sizes = [(f.relative_to(path).as_posix(), f.stat().st_size) for f in files]
        h.update(json.dumps(sizes).encode())
        largest = max(files, key=lambda f: f.stat().st_size)
        h.update(_head(largest))
        return h.hexdigest()
    except OSError:
        return None


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(_FINGERPRINT_BYTES)


def _report_problems(site_root: Path, row: ManifestRow) -> list[Problem]:
    try:
        text = read_report(site_root / row.report, REPORT_MAX_BYTES)
    except SiteDataError as err:
        return [error(err.message, row=row.row, field="report", path=row.report)]
    size = (site_root / row.report).stat().st_size
    if size > REPORT_MAX_BYTES:
        return [warning(f"report is {size / 2**20:.1f} MiB; only its first {REPORT_MAX_BYTES >> 20} MiB is used "
                        "(a pathology report is a few KB: is this the right file?)", row=row.row, field="report",
                        path=row.report)]  # fmt: skip
    if not text.strip():
        return [warning("report is empty; the case will be used without report text", row=row.row, field="report",
                        path=row.report)]
    findings = find_identifiers(text)
    if not findings:
        return []
    return [warning(describe_findings(text, findings), row=row.row, field="report", path=row.report)]


# -- helpers --------------------------------------------------------------------------------------------------------


def _order(p: Problem) -> tuple:
    # Whole-file problems first, then row by row as in a spreadsheet (the manifest cell before the files it names),
    # then pretrain/ files.
    pretrain = (p.path or "").startswith("pretrain")
    group = 2 if pretrain else 0 if p.row is None else 1
    file_key = (p.path or "") if pretrain else ""
    return (group, file_key, p.row or 0, p.path != MANIFEST_NAME, p.severity != ERROR)


def _shareable_place(path: str | None) -> str:
    """The file column of a table meant for outside the site: only names that fedmusk itself defines."""
    if path in (None, MANIFEST_NAME, "pretrain", "pretrain/pairs.csv", "pretrain/images"):
        return path or ""
    if path.startswith("pretrain/text/"):
        return "a pretrain/text file"
    if path.startswith("pretrain/"):
        return "a pretrain file"
    return ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
