"""A trained outcome model on disk: the adapter in peft's format plus what it takes to apply it elsewhere.

``save_bundle`` writes, beside ``adapter_config.json`` / ``adapter_model.safetensors`` / ``fedmusk_adapter.json``:

- ``config.yaml``: the resolved configuration the model was trained with (task, heads, time bins, tiling, base);
- ``fedmusk_model.json``: the fingerprints a site's data must match (base MUSK, tokenizer, tile features) and the
  model's lineage (arm, federation id, strategy, rounds, sites, secure aggregation, DP, config hash);
- ``README.md``: the model card (peft's own card is a blank template).

``resolve_model`` turns what a user passes to ``fedmusk predict --model`` (an adapter folder, a run's output folder,
or an MLflow model URI) into such a folder. Nothing here imports mlflow: URIs go through ``fedmusk.tracking``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmusk.config import ConfigError, FedMuskConfig, load_config, to_yaml

MODEL_FILE = "fedmusk_model.json"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
ADAPTER_FILE = "adapter_model.safetensors"
BUNDLE_FORMAT = 1


class ModelMismatchError(ValueError):
    """A model that cannot be applied to this site as it stands: another base MUSK, tokenizer, task or tiling."""


def config_hash(cfg: FedMuskConfig) -> str:
    """sha256 (first 16 hex digits) of the resolved configuration's YAML: two runs with the same hash were
    configured identically."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's SentencePiece file: the same ids for the same text."""
    return file_sha256(tokenizer.path)


def base_fingerprints(cfg: FedMuskConfig, base) -> dict[str, str]:
    """``base``: the base MUSK's tensors alone; ``features``: what the site's tile-feature cache records (the base
    together with the tiling and multi-scale setting), so a cache made for this model is recognised."""
    from fedmusk.data.prepare.pipeline import TilingSettings, model_fingerprint

    return {
        "base": model_fingerprint(base, False, TilingSettings()),
        "features": model_fingerprint(base, cfg.model.ms_aug, TilingSettings.from_config(cfg.data)),
    }


@dataclass
class Lineage:
    """Where a model came from; every field is safe to publish (no paths, no case ids)."""

    arm: str  # "federated", "centralized" or "local"
    sites: list[str] = field(default_factory=list)
    federation_id: str | None = None
    rounds: int | None = None
    strategy: str | None = None
    secure_aggregation: bool | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    epochs: int | None = None
    final_rule: str = "last"  # the adapter after the last round or epoch (docs/after-the-federation.md says why)


def save_bundle(adapter_dir: str | Path, cfg: FedMuskConfig, lineage: Lineage, base=None, tokenizer=None) -> Path:
    """Add config, fingerprints and model card to a saved adapter folder; returns the folder.

    ``base`` (the base MUSK the model was trained on) and ``tokenizer`` are fingerprinted when given; without them
    (a coordinator that holds no base weights) the fingerprints are recorded as unknown and not checked later."""
    out = Path(adapter_dir)
    if not (out / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"no adapter at {out / ADAPTER_FILE}")
    (out / CONFIG_FILE).write_text(to_yaml(cfg))
    prints = base_fingerprints(cfg, base) if base is not None else {"base": None, "features": None}
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "task": cfg.train.task,
        "survival_loss": cfg.train.survival_loss if cfg.train.task == "survival" else None,
        "fusion": cfg.train.fusion,
        "features": cfg.train.features,
        "time_bins": list(cfg.train.time_bins),
        "model_preset": cfg.model.preset,
        "base_fingerprint": prints["base"],
        "features_fingerprint": prints["features"],
        "tokenizer_fingerprint": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "tiling": {
            "target_mpp": cfg.data.target_mpp, "tile_size": cfg.data.tile_size, "min_tissue": cfg.data.min_tissue,
        },
        "config_hash": config_hash(cfg),
        "adapter_sha256": file_sha256(out / ADAPTER_FILE),
        "lineage": lineage.__dict__,
    }
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(meta))
    return out


@dataclass
class Bundle:
    """A model folder ready to apply: its configuration (site overrides applied) and recorded facts."""

    path: Path
    cfg: FedMuskConfig
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return self.cfg.train.task

    @property
    def name(self) -> str:
        lineage = self.meta.get("lineage") or {}
        arm = lineage.get("arm") or "model"
        return f"{arm}-{self.meta.get('adapter_sha256', '')[:8]}".strip("-")


def open_bundle(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Bundle:
    """The model in ``path`` (an adapter folder written by fedmusk) with ``overrides`` (``key=value``, e.g. this
    site's ``model.weights`` and ``model.tokenizer`` paths) applied to its configuration.

    Raises FileNotFoundError when ``path`` holds no fedmusk model and ConfigError for bad overrides. An adapter folder
    without ``config.yaml`` (written before models carried one) takes the run's ``config.yaml`` one level up."""
    folder = Path(path)
    if not (folder / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a fedmusk model (no {ADAPTER_FILE})")
    config = folder / CONFIG_FILE
    if not config.is_file() and (folder.parent / CONFIG_FILE).is_file():
        config = folder.parent / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: the model carries no {CONFIG_FILE}; it cannot be applied safely")
    cfg = load_config([config], list(overrides))
    meta_path = folder / MODEL_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and meta.get("task") != cfg.train.task:
        raise ConfigError(f"train.task cannot be changed when applying a model trained for {meta.get('task')!r}")
    return Bundle(folder, cfg, meta)


def resolve_model(spec: str, scratch: str | Path) -> Path:
    """The adapter folder named by ``spec``: an adapter folder, a run's output folder (``<run>/adapter``), or an
    MLflow model URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``), downloaded under ``scratch``.

    Raises FileNotFoundError naming ``spec`` when nothing there is a fedmusk model."""
    if "://" not in spec and ":/" in spec and not Path(spec).exists():  # models:/, runs:/ and the like
        from fedmusk.tracking import download_model

        local = Path(download_model(spec, scratch))
        for candidate in (local, *sorted(p.parent for p in local.rglob(ADAPTER_FILE))):
            if (candidate / ADAPTER_FILE).is_file():
                return candidate
        raise FileNotFoundError(f"{spec}: the MLflow model holds no fedmusk adapter")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {spec}")
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{spec}: neither an adapter folder nor a run folder holding adapter/")


def model_card(meta: dict[str, Any]) -> str:
    """The model card: what the model predicts, how it was trained, what a site must match to apply it."""
    lin = meta.get("lineage") or {}
    task = meta["task"]
    output = (
        "a risk score per case (higher = earlier event) and, with the discrete-time head, survival probabilities at "
        f"{', '.join(f'{t:g}' for t in meta['time_bins'])} months"
        if task == "survival"
        else "the probability of response per case"
    )
    rows = [
        ("Task", task + (f" ({meta['survival_loss']} loss)" if meta.get("survival_loss") else "")),
        ("Inputs", f"{meta['fusion']} fusion of slide tiles and the pathology report"),
        ("Training", lin.get("arm", "?")),
        ("Sites", ", ".join(lin.get("sites") or []) or "n/a"),
        ("Federation id", lin.get("federation_id") or "n/a"),
        ("Strategy", lin.get("strategy") or "n/a"),
        ("Rounds", lin.get("rounds") if lin.get("rounds") is not None else "n/a"),
        ("Epochs", lin.get("epochs") if lin.get("epochs") is not None else "n/a"),
        ("Secure aggregation", lin.get("secure_aggregation") if lin.get("secure_aggregation") is not None else "n/a"),
        ("Differential privacy", _dp_text(lin)),
        ("Final model", f"the adapter after the {lin.get('final_rule', 'last')} round or epoch"),
        ("Base MUSK", meta.get("model_preset", "?") + f" (fingerprint {_short(meta.get('base_fingerprint'))})"),
        ("Tokenizer fingerprint", _short(meta.get("tokenizer_fingerprint"))),
        ("Tiling", ", ".join(f"{k} {v}" for k, v in meta["tiling"].items())),
        ("Config hash", meta["config_hash"]),
        ("Adapter sha256", meta["adapter_sha256"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# fedmusk outcome model ({task})

A LoRA adapter and outcome head for the MUSK pathology foundation model, trained with fedmusk.
It outputs {output}.

| | |
|---|---|
{table}

## Applying it at a site

    fedmusk predict SITE --model THIS_FOLDER        # scores per case, written inside the site
    fedmusk evaluate SITE --model THIS_FOLDER       # external validation report, written inside the site

The site's base MUSK, tokenizer and tiling must match the fingerprints above; `fedmusk predict` checks them and
refuses a mismatch. Pass the site's own file locations with `--set model.weights=... --set model.tokenizer=...`.

## Limits

Validated only on the cohorts named above. Scores rank cases; risk groups split the scored cases at their own median.
Check calibration at your site (`fedmusk evaluate`) before relying on absolute probabilities.
"""


def _dp_text(lin: dict) -> str:
    if lin.get("dp_epsilon") is None:
        return "off"
    return f"epsilon {lin['dp_epsilon']:.3g}, delta {lin.get('dp_delta')}"


def _short(fingerprint: str | None) -> str:
    return "not recorded" if not fingerprint else fingerprint[:16]


def reference_base_and_tokenizer(cfg: FedMuskConfig):
    """The base MUSK (on the CPU, fresh: training wraps its own copy) and tokenizer the configuration names, for
    their fingerprints; (None, None) where they are not on this machine (a coordinator without the release)."""
    from fedmusk.runtime import load_model, load_tokenizer

    weights, tokenizer = cfg.model.weights, cfg.model.tokenizer
    if (weights is None and cfg.model.preset != "tiny") or (weights is not None and not Path(weights).is_file()):
        return None, None
    if tokenizer is not None and not Path(tokenizer).is_file():
        return load_model(cfg.model, "cpu", cfg.seed), None
    return load_model(cfg.model, "cpu", cfg.seed), load_tokenizer(cfg.model)
