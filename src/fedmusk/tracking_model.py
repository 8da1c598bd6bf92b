"""fedmusk's model as an MLflow ``pyfunc``: ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` gives a model whose
``predict`` runs ``fedmusk predict`` on site folders and returns the same table.

Input: a DataFrame with a ``site_root`` column (a site folder on the machine that runs the model) and an optional
``split`` column (all, train, val or test; default all). Output: one row per case with the columns of
``fedmusk predict``'s CSV. Site-specific settings (the site's ``model.weights`` and ``model.tokenizer`` paths) go in
``load_model(..., model_config={"model.weights": ...})``.

Like ``fedmusk.tracking``, this module imports mlflow; nothing else in fedmusk does. It stands above the training
engine (its model runs ``fedmusk predict``), ``fedmusk.tracking`` below it (training runs record through a Tracker).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

INPUT_COLUMNS = ("site_root", "split")


class FedmuskModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the fedmusk model from the artifact ``model`` once, scores site folders."""

    _skip_type_hint_validation = True  # the explicit signature (signature_for) types the input, not type hints

    def load_context(self, context) -> None:
        from fedmusk.training.bundle import open_bundle
        from fedmusk.training.predict import Predictor

        overrides = [f"{k}={v}" for k, v in (context.model_config or {}).items()]
        self.bundle = open_bundle(context.artifacts["model"], overrides)
        self.predictor = Predictor(self.bundle)

    def predict(self, context, model_input, params=None):
        from fedmusk.training.predict import prediction_table, select_cases

        frame = pd.DataFrame(model_input)
        columns: list[str] = []
        rows: list[list] = []
        for _, item in frame.iterrows():
            split = str(item["split"]) if "split" in frame and pd.notna(item["split"]) else "all"
            cases = select_cases(self.bundle, Path(str(item["site_root"])), split)
            table = prediction_table(self.bundle.task, self.predictor.score(cases))
            columns, rows = table.columns, rows + table.rows
        return pd.DataFrame(rows, columns=columns or ["case_id", "split", "risk_score", "risk_group"])


def signature_for(adapter_dir: str | Path):
    """Input and output schema of the pyfunc for the model in ``adapter_dir`` (its task decides the columns)."""
    import json

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    meta = json.loads((Path(adapter_dir) / "fedmusk_model.json").read_text())
    outputs = [ColSpec("string", "case_id"), ColSpec("string", "split"), ColSpec("double", "risk_score"),
               ColSpec("string", "risk_group")]  # fmt: skip
    if meta["task"] == "response":
        outputs.append(ColSpec("double", "response_probability"))
    elif meta.get("survival_loss") == "nll":
        outputs += [ColSpec("double", f"survival_{t:g}m") for t in sorted(meta["time_bins"])]
    inputs = Schema([ColSpec("string", "site_root"), ColSpec("string", "split", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def save_pyfunc(adapter_dir: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model for the fedmusk model in ``adapter_dir`` to ``path`` (a new folder)."""
    import logging

    import fedmusk

    # MLflow warns that a python_model object is cloudpickled; the pickle holds only this class (the model itself
    # is the artifact folder), and the console is for the federation.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=FedmuskModel(),
        artifacts={"model": str(adapter_dir)},
        signature=signature_for(adapter_dir),
        input_example=pd.DataFrame({"site_root": ["path/to/site-folder"], "split": ["test"]}),
        pip_requirements=[f"fedmusk=={fedmusk.__version__}"],
    )
    return Path(path)


def register_model(tracker, adapter_dir: str | Path, name: str, tags: Mapping[str, Any], description: str) -> str:
    """Log the fedmusk model in ``adapter_dir`` as a pyfunc under ``tracker``'s run and register it as a new version
    of ``name`` (a ``fedmusk.tracking.Tracker``); returns the version number."""
    with tempfile.TemporaryDirectory(prefix="fedmusk-pyfunc-") as tmp:
        return tracker.register_model(save_pyfunc(adapter_dir, Path(tmp) / "model"), name, tags, description)
