"""fedmusk's import layers (pyproject.toml, ``[tool.importlinter]``): the model knows nothing of sites, the site data
nothing of training, the training engine nothing of Flower, and the coordinator and the sites share only the wire
contract. A module that imports from a layer above it, or a package loop, fails here with the import's line."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_imports_only_from_its_own_layer_or_below():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache", str(ROOT / "pyproject.toml")],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = done.stdout.partition("Broken contracts")[2] or done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "Contracts: 4 kept, 0 broken." in done.stdout
