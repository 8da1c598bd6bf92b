"""What every benchmark script shares: the machine's name and writing results/<name>.json and .md.

Imported as a sibling module (the scripts run as ``python benchmarks/<script>.py``, which puts this folder on
``sys.path``); there is deliberately no ``benchmarks/__init__.py`` (fairscale installs a package of that name)."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(out_dir: Path, name: str, report: dict, table: str, indent: int = 2) -> Path:
    """Write ``<out_dir>/<name>.json`` (every number) and ``<name>.md`` (the table); returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=indent) + "\n")
    (out_dir / f"{name}.md").write_text(table)
    return path
