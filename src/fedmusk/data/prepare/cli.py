"""What ``fedmusk prepare <site_root>`` does: validate the site, then tile every usable slide and cache the tile
features of the frozen base MUSK inside the site (``<site_root>/.fedmusk/tiles``).

Rows with validation errors are left out and the rest go on; a slide that cannot be read is reported (file and
reason) and skipped while the others are prepared. A second run finds the slides up to date and does nothing; a
killed run resumes with the slides it had not finished. Progress shows counts only, never case ids or report text.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fedmusk.config import FedMuskConfig
from fedmusk.data.prepare.pipeline import NO_TISSUE_WARNING, PrepareResult, TilingSettings, cache_dir, prepare_site
from fedmusk.data.site.validate import validate_site


def run_prepare(
    site_root: Path, cfg: FedMuskConfig, console: Console, embed: bool = True, check_slides: bool = True
) -> int:
    """Validate ``site_root``, then prepare the distinct slides of its usable rows; print a summary.

    ``embed=False`` cuts tiles and records their coordinates only; otherwise every tile is embedded with the
    configured model (``cfg.model``, multi-scale when ``cfg.model.ms_aug``) on ``cfg.device``, reading tiles with
    ``cfg.data.num_workers`` worker processes. ``check_slides=False`` validates headers only (faster; damaged
    slides are then found while preparing). Returns the exit code: 0 when every usable slide is ready and
    validation found no error, 1 otherwise. Data problems are reported, never raised; a configuration that cannot
    be loaded (model weights, device) raises ConfigError.
    """
    site_root = Path(site_root)
    report = validate_site(site_root, check_slides=check_slides, progress=console.is_terminal, console=console)
    if report.errors:
        report.print(console)
    elif report.warnings:
        console.print(f"Validation: {len(report.warnings)} warning(s); run 'fedmusk validate' to see them.")
    slides = list(dict.fromkeys(row.slide for row in report.valid_rows))
    if not slides:
        console.print(Text("Nothing to prepare: the manifest has no usable rows.", style="bold red"))
        return 1
    if report.errors:
        console.print(f"Preparing the {len(slides)} slide(s) of the {len(report.valid_rows)} usable row(s); the rows "
                      "with errors are left out.")  # fmt: skip

    model = transform = None
    precision = "float32"
    if embed:
        from fedmusk.musk_model.transforms import musk_transform
        from fedmusk.runtime import load_model, model_precision, resolve_device

        device = resolve_device(cfg.device)
        precision = model_precision(cfg.model, device)
        model = load_model(cfg.model, device, cfg.seed)
        transform = musk_transform(model.config.img_size)
        console.print(f"Embedding tiles on {device.type} at {precision} (model.precision={cfg.model.precision}).")

    start = time.perf_counter()
    result = _prepare_with_progress(site_root, slides, cfg, model, transform, console, precision)
    seconds = time.perf_counter() - start
    _print_warnings(console, result)
    _print_failures(console, result)
    _print_summary(console, site_root, result, embed, seconds)
    return 0 if report.ok and result.ok else 1


def _prepare_with_progress(
    site_root, slides, cfg, model, transform, console: Console, precision: str = "float32"
) -> PrepareResult:
    """prepare_site under a progress bar of slides done / total and tiles per second (counts only)."""
    bar = Progress(
        TextColumn("Preparing slides"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tiles]} tiles, {task.fields[rate]} tiles/s"), TimeElapsedColumn(),
        console=console, disable=not console.is_terminal,
    )  # fmt: skip
    tiles, start = 0, time.perf_counter()
    with bar:
        task = bar.add_task("prepare", total=len(slides), tiles=0, rate="-")

        def on_tiles(k: int) -> None:
            nonlocal tiles
            tiles += k
            rate = tiles / max(time.perf_counter() - start, 1e-9)
            bar.update(task, tiles=tiles, rate=f"{rate:.0f}")

        return prepare_site(
            site_root, slides, TilingSettings.from_config(cfg.data), model, transform, cfg.data.batch_size,
            cfg.model.ms_aug, progress=lambda _message: bar.advance(task), num_workers=cfg.data.num_workers,
            on_tiles=on_tiles, precision=precision,
        )  # fmt: skip


def _print_warnings(console: Console, result: PrepareResult) -> None:
    if not result.warnings:
        return
    table = Table(title="Slides to look at (prepared, with a warning)", expand=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    for slide, note in result.warnings:
        table.add_row(Text("warning", style="yellow"), Text(slide), Text(note))
    console.print(table)


def _print_failures(console: Console, result: PrepareResult) -> None:
    if not result.failed:
        return
    table = Table(title="Slides that could not be prepared (skipped)", expand=False)
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    for slide, reason in result.failed:
        table.add_row(Text(slide), Text(reason))  # Text: readers' messages may hold brackets rich would parse
    console.print(table)


def _print_summary(console: Console, site_root: Path, result: PrepareResult, embed: bool, seconds: float) -> None:
    what = "tiled and embedded" if embed else "tiled"
    rate = f", {result.tiles_computed / seconds:.1f} tiles/s" if result.tiles_computed and seconds > 0 else ""
    table = Table(title="fedmusk prepare", show_header=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("")
    table.add_row(f"slides {what} now", str(len(result.prepared)))
    table.add_row("slides up to date", str(len(result.up_to_date)))
    table.add_row("slides failed", Text(str(len(result.failed)), style="bold red" if result.failed else ""))
    no_tissue = sum(note == NO_TISSUE_WARNING for _, note in result.warnings)
    table.add_row("slides without tissue tiles", Text(str(no_tissue), style="yellow" if no_tissue else ""))
    table.add_row("tiles ready", f"{result.tiles} ({result.tiles_computed} computed now{rate})")
    table.add_row("cache", Text(str(cache_dir(site_root))))
    console.print(table)
    if not (result.prepared or result.failed) and result.up_to_date:
        console.print(Text("All slides are up to date; nothing to do.", style="bold green"))
