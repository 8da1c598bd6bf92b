"""One finding of site validation: what is wrong, where, and whether it blocks the site from taking part."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """A problem found in a site's data.

    ``severity`` is "error" (the row or file cannot be used; ``fedmusk validate`` fails) or "warning" (worth a look,
    nothing is blocked). ``row`` is the 1-based data row of the file in ``path`` (row 1 = the first row under the
    header; for .jsonl files, the line number), ``field`` the column concerned, ``path`` the file relative to the site
    root. Messages never repeat report text or patient identifiers.
    """

    severity: str
    row: int | None
    field: str | None
    path: str | None
    message: str

    def __str__(self) -> str:
        where = [p for p in (self.path, None if self.row is None else f"row {self.row}", self.field) if p]
        return f"{self.severity}: {', '.join(where)}: {self.message}" if where else f"{self.severity}: {self.message}"


def error(message: str, *, row: int | None = None, field: str | None = None, path: str | None = None) -> Problem:
    return Problem(ERROR, row, field, path, message)


def warning(message: str, *, row: int | None = None, field: str | None = None, path: str | None = None) -> Problem:
    return Problem(WARNING, row, field, path, message)
