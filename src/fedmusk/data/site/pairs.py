"""A site's image-caption pairs, ``<site_root>/pretrain/pairs.csv``: columns ``image`` (a path relative to the
pretrain folder, a tile or a slide) and ``caption``. One parser for training and for ``fedmusk validate``.

Row numbers are data rows (row 1 = the first row under the header). A row without a caption is skipped: training
passes over it, validation warns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.manifest import relative_site_path
from fedmusk.data.site.problems import Problem, error, warning
from fedmusk.data.site.reports import read_report

PAIRS_FILE = "pretrain/pairs.csv"  # relative to the site root
COLUMNS = ("image", "caption")


@dataclass(frozen=True)
class Pair:
    """One usable row: its data row number, its image relative to the pretrain folder, its caption."""

    row: int
    image: str
    caption: str


@dataclass
class PairsFile:
    """What pairs.csv holds: the usable pairs in file order, every non-empty caption by row (validation looks at
    them all), and with ``strict=False`` every problem found."""

    pairs: list[Pair] = field(default_factory=list)
    captions: dict[int, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _missing(path: Path) -> str | None:
    return None if path.exists() else "not found"


def read_pairs(
    pretrain: Path, strict: bool = True, image_problem: Callable[[Path], str | None] = _missing
) -> PairsFile:
    """The pairs of ``<pretrain>/pairs.csv``.

    ``strict=True`` (training): the first error raises SiteDataError naming the file, the row and the field (a file
    that cannot be read, a missing column, an image path that is empty, leads outside the pretrain folder or names
    a missing file); a row without a caption is skipped before its image is looked at.
    ``strict=False`` (validation): nothing is raised; every problem is in ``problems`` with its row number, rows
    without a caption included. ``image_problem(path)`` says why an image cannot be used (default: it is missing).
    """
    found = PairsFile()

    def problem(message: str, row: int | None = None, column: str | None = None) -> None:
        if strict:
            raise SiteDataError(message if row is None else f"row {row}: {message}", path=PAIRS_FILE, field=column)
        found.problems.append(error(message, row=row, field=column, path=PAIRS_FILE))

    try:
        content = read_report(pretrain / "pairs.csv")
    except SiteDataError as err:
        problem(err.message)
        return found
    records = list(csv.reader(io.StringIO(content, newline="")))
    header = [h.strip().lower() for h in records[0]] if records else []
    missing = [c for c in COLUMNS if c not in header]
    if strict and missing:
        problem(f"required column '{missing[0]}' is missing (header must be 'image,caption')", column=missing[0])
    if not records:
        problem("is empty: it needs a header line 'image,caption'")
        return found
    for column in missing:
        problem(f"required column '{column}' is missing (columns found: {', '.join(h for h in header if h) or 'none'})",
                column=column)  # fmt: skip
    if missing:
        return found
    image_col, caption_col = header.index("image"), header.index("caption")
    checked: dict[str, str | None] = {}
    for n, cells in enumerate(records[1:], start=1):
        image = cells[image_col].strip() if image_col < len(cells) else ""
        caption = cells[caption_col].strip() if caption_col < len(cells) else ""
        if not any(c.strip() for c in cells) or (strict and not caption):
            continue
        rel, why = relative_site_path(image) if image else (None, None)
        if not image:
            problem("image path is empty" if strict else "image is empty", n, "image")
        elif why:
            problem(f"image path {why.replace('site folder', 'pretrain folder')}", n, "image")
        else:
            if rel not in checked:
                checked[rel] = image_problem(pretrain / rel)
            if checked[rel]:
                problem(f"image pretrain/{rel} {checked[rel]}", n, "image")
        if not caption:
            found.problems.append(warning("caption is empty; the pair is skipped", row=n, field="caption",
                                          path=PAIRS_FILE))  # fmt: skip
            continue
        found.captions[n] = caption
        if rel is not None and not why and not checked[rel]:
            found.pairs.append(Pair(n, rel, caption))
    return found
