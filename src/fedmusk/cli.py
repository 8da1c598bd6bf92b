"""The ``fedmusk`` command: one entry point for hospital IT, coordinators and researchers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="fedmusk",
    help="Federated fine-tuning of the MUSK pathology foundation model across hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Configuration overrides as key=value, e.g. seed=3")]
ConfigFiles = Annotated[
    list[Path] | None, typer.Option("--config", "-c", help="YAML configuration file(s); later files win.")
]


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _user_errors():
    """Errors that are the user's to fix: printed in one line, no traceback."""
    from fedmusk.config import ConfigError
    from fedmusk.musk_model.weights import WeightsMismatchError

    errors: tuple[type[BaseException], ...] = (ConfigError, WeightsMismatchError, FileNotFoundError)
    try:
        from fedmusk.data.errors import SiteDataError

        errors += (SiteDataError,)
    except ImportError:  # pragma: no cover - the data package is always installed with fedmusk
        pass
    return errors


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _user_errors() as err:
        _fail(str(err))


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image files (tiles, JPEG/PNG/TIFF).")],
    text: Annotated[list[str], typer.Option("--text", "-t", help="A candidate text; repeat for several.")],
    config: ConfigFiles = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Configuration override key=value; repeat for several.")
    ] = None,
) -> None:
    """Score images against texts with MUSK's contrastive heads (zero-shot classification)."""
    from fedmusk.demo import print_similarity_table, similarity_for_files

    cfg = _run(_load, config, overrides)
    sims, probs = _run(similarity_for_files, cfg, images, text)
    print_similarity_table(console, [p.name for p in images], text, sims, probs)


@app.command()
def demo(
    config: ConfigFiles = None,
    overrides: Overrides = None,
) -> None:
    """Run the demonstration on the embedded default (tiny MUSK, real tissue image, report sentences)."""
    from fedmusk.demo import run_demo

    cfg = _run(_load, config or [_default_config("demo.yaml")], overrides)
    _run(run_demo, cfg, console)


def _load(files, overrides):
    from fedmusk.config import load_config

    return load_config(files or [], overrides or [])


def _default_config(name: str) -> Path:
    """A config shipped in the repository's configs/ (next to src/) or installed beside the package."""
    for base in (Path(__file__).resolve().parents[2] / "configs", Path(sys.prefix) / "share" / "fedmusk" / "configs"):
        if (base / name).is_file():
            return base / name
    _fail(f"default configuration {name} not found; pass --config")
    raise AssertionError  # unreachable


if __name__ == "__main__":
    app()
