"""Checks of a site's optional ``pretrain/`` folder: ``images/``, ``text/`` (.txt, .jsonl with "text") and
``pairs.csv`` (image, caption; read by ``fedmusk.data.site.pairs``). Row numbers are data rows of pairs.csv (row 1 =
first row under the header) and line numbers of .jsonl files."""

from __future__ import annotations

from pathlib import Path

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.pairs import PAIRS_FILE, read_pairs
from fedmusk.data.site.problems import Problem, error, warning
from fedmusk.data.site.reports import (
    NO_TEXT,
    NOT_JSON,
    describe_findings,
    find_identifiers,
    jsonl_documents,
    read_report,
)

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}
_MAX_POSITIONS = 5


def pretrain_problems(pretrain: Path, check_images: bool = True) -> list[Problem]:
    """Problems with ``<site_root>/pretrain`` (none when the folder does not exist). ``check_images`` also opens every
    image that pairs.csv names."""
    problems: list[Problem] = []
    if not pretrain.exists():
        return problems
    if not pretrain.is_dir():
        return [error("'pretrain' must be a folder", path="pretrain")]
    images, text, pairs = pretrain / "images", pretrain / "text", pretrain / "pairs.csv"
    if not (images.exists() or text.exists() or pairs.exists()):
        return [warning("the pretrain folder has none of images/, text/, pairs.csv; it is ignored", path="pretrain")]
    if images.is_dir() and not any(f.is_file() for f in images.rglob("*")):
        problems.append(warning("the folder is empty", path="pretrain/images"))
    if text.is_dir():
        for file in sorted(f for f in text.rglob("*") if f.is_file() and not f.name.startswith(".")):
            problems.extend(_pretrain_text_problems(pretrain, file))
    if pairs.exists():
        problems.extend(_pairs_problems(pretrain, check_images))
    return problems


def _pretrain_text_problems(pretrain: Path, file: Path) -> list[Problem]:
    where = f"pretrain/{file.relative_to(pretrain).as_posix()}"
    suffix = file.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        return [warning("file is ignored: pretraining text must be .txt or .jsonl", path=where)]
    try:
        content = read_report(file)
    except SiteDataError as err:
        return [error(err.message, path=where)]
    if not content.strip():
        return [warning("file is empty", path=where)]
    if suffix == ".txt":
        findings = find_identifiers(content)
        return [warning(describe_findings(content, findings), path=where)] if findings else []
    found: list[Problem] = []
    flagged: list[str] = []
    for n, text, why in jsonl_documents(content):
        if why == NOT_JSON:
            found.append(error("line is not valid JSON", row=n, path=where))
            continue
        if why == NO_TEXT:
            found.append(error('line has no "text" field (each line must be a JSON object with "text")', row=n,
                               field="text", path=where))
            continue
        kinds = sorted({f.kind for f in find_identifiers(text)})
        if kinds:
            flagged.append(f"line {n} ({', '.join(kinds)})")
    if flagged:
        more = f" and {len(flagged) - _MAX_POSITIONS} more lines" if len(flagged) > _MAX_POSITIONS else ""
        found.append(warning(f"may contain patient identifiers: {'; '.join(flagged[:_MAX_POSITIONS])}{more}; remove "
                             "them before training", field="text", path=where))
    return found


def _pairs_problems(pretrain: Path, check_images: bool) -> list[Problem]:
    pairs = read_pairs(pretrain, strict=False, image_problem=lambda path: _pretrain_image_problem(path, check_images))
    found = pairs.problems
    flagged: list[str] = []
    for n, caption in pairs.captions.items():
        kinds = sorted({f.kind for f in find_identifiers(caption)})
        if kinds:
            flagged.append(f"row {n} ({', '.join(kinds)})")
    if flagged:
        more = f" and {len(flagged) - _MAX_POSITIONS} more rows" if len(flagged) > _MAX_POSITIONS else ""
        found.append(warning(f"captions may contain patient identifiers: {'; '.join(flagged[:_MAX_POSITIONS])}{more}",
                             field="caption", path=PAIRS_FILE))
    return found


def _pretrain_image_problem(path: Path, check_images: bool) -> str | None:
    """Why the pretraining image at ``path`` cannot be used, or None."""
    if not path.exists():
        return "not found"
    if not check_images:
        return None
    if path.is_file() and path.suffix.lower() in _RASTER_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken images
            return f"cannot be read as an image ({type(err).__name__})"
        return None
    from fedmusk.data.slides import check_slide

    try:
        check_slide(path)
    except SiteDataError as err:
        return err.message
    except Exception as err:  # noqa: BLE001
        return f"cannot be read ({type(err).__name__})"
    return None
