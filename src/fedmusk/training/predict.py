"""``fedmusk predict``: apply a trained model to a site's cases, inside the site.

A ``Predictor`` rebuilds the model a bundle (``fedmusk.training.bundle``) describes on this site's base MUSK and
tokenizer, refuses it when their fingerprints differ from the ones it was trained with, and scores cases: a risk
score (higher = earlier event) or a response probability, a risk group, and for the discrete-time survival head the
survival probability at each time bin. Results are written to a CSV inside the site; nothing leaves it.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmusk.data.errors import SiteDataError
from fedmusk.training.bundle import Bundle, ModelMismatchError, base_fingerprints, tokenizer_fingerprint
from fedmusk.training.cohort import CaseRecord, load_site_cases
from fedmusk.training.outcome import Predictions

RESULTS_DIR = "fedmusk-results"  # inside the site folder
SPLIT_CHOICES = ("all", "train", "val", "test")
GROUP_NAMES = ("low", "high")


class Predictor:
    """The model of ``bundle`` on this machine, ready to score cases. Raises ModelMismatchError when the base MUSK,
    tokenizer or adapter layout differ from the model's, ConfigError for settings that cannot load."""

    def __init__(self, bundle: Bundle, progress: Callable[[str], None] | None = None):
        from fedmusk.config import check_model_config
        from fedmusk.data.prepare.pipeline import TilingSettings
        from fedmusk.musk_model.lora import read_adapter_file
        from fedmusk.runtime import load_model, load_tokenizer, resolve_device, seed_everything
        from fedmusk.training.features import FeatureStore
        from fedmusk.training.outcome import OutcomeTrainer

        cfg = self.cfg = bundle.cfg
        self.bundle = bundle
        check_model_config(cfg.model)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        base = load_model(cfg.model, device, cfg.seed)
        self.fingerprints = base_fingerprints(cfg, base)
        _same("base MUSK", bundle.meta.get("base_fingerprint"), self.fingerprints["base"], "model.weights")
        tokenizer = load_tokenizer(cfg.model)
        here = tokenizer_fingerprint(tokenizer)
        _same("tokenizer", bundle.meta.get("tokenizer_fingerprint"), here, "model.tokenizer")
        self.features = None
        if cfg.train.fusion != "report":
            embedder = base if cfg.train.features == "cached" else None
            tiling = TilingSettings.from_config(cfg.data)
            self.features = FeatureStore(embedder, tiling, cfg.model.ms_aug, cfg.data.batch_size, progress)
        self.trainer = OutcomeTrainer(cfg, base, tokenizer, self.features, device)
        try:
            self.trainer.load_adapter_state(read_adapter_file(bundle.path))
        except ValueError as err:  # AdapterStateError: another layout than this configuration builds
            raise ModelMismatchError(f"{bundle.path}: the adapter does not fit its configuration ({err})") from None

    def check_site_cache(self, cases: Sequence[CaseRecord], reprepare: bool = False) -> None:
        """Refuse tile features the site cached for another base MUSK or tiling (``reprepare``: embed them again
        for this model instead). Slides without a cache are prepared when scored."""
        if self.features is None or self.cfg.train.features != "cached" or reprepare:
            return
        from fedmusk.data.prepare.pipeline import TilingSettings, read_cache, tiling_fingerprint

        tiling = tiling_fingerprint(TilingSettings.from_config(self.cfg.data))
        for case in cases:
            for slide in case.slides:
                cached = read_cache(case.site_root, slide)
                if cached is None or cached.features is None or cached.fingerprint == self.features.fingerprint:
                    continue
                what = "tiling" if cached.tiling and cached.tiling != tiling else "base MUSK or multi-scale setting"
                raise ModelMismatchError(
                    f"the site's tile features were made with another {what} than this model's (data.tile_size="
                    f"{self.cfg.data.tile_size}, data.target_mpp={self.cfg.data.target_mpp}); pass --reprepare to "
                    "embed the slides again for this model"
                )

    def score(self, cases: Sequence[CaseRecord], advance: Callable[[int], None] | None = None) -> Predictions:
        """The model's outputs for every case, labelled or not, in order (``advance(n)`` after each batch)."""
        cases = list(cases)
        if self.features is not None:
            for case in cases:
                self.features.ensure(case.site_root, case.slides)
        size = self.cfg.train.batch_cases
        parts: list[Predictions] = []
        for start in range(0, len(cases), size):
            batch = cases[start : start + size]
            parts.append(self.trainer.predict(batch, labelled_only=False))
            if advance is not None:
                advance(len(batch))
        if not parts:
            return Predictions([], np.zeros(0), None, None)
        survival = None if parts[0].survival is None else np.concatenate([p.survival for p in parts])
        return Predictions(cases, np.concatenate([p.risk for p in parts]), survival, parts[0].eval_times)


def risk_group_names(risk: np.ndarray) -> list[str]:
    """"high" above the median of the scored cases' risk, else "low" (ties go low, as in the KM plots)."""
    from fedmusk.training.plots import risk_groups

    if len(risk) == 0:
        return []
    return [GROUP_NAMES[g] for g in risk_groups(risk, 2)]


@dataclass
class PredictionTable:
    """One row per case: ``columns`` and ``rows`` as written to the CSV (and returned by the MLflow model)."""

    columns: list[str]
    rows: list[list]

    def to_csv(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([[_cell(v) for v in row] for row in self.rows])
        return path


def prediction_table(task: str, pred: Predictions) -> PredictionTable:
    """Case id, split, risk score, risk group and (survival) S(t) per time bin or (response) probability."""
    columns = ["case_id", "split", "risk_score", "risk_group"]
    groups = risk_group_names(pred.risk)
    extra: list[list[float]] = [[] for _ in pred.cases]
    if task == "response":
        columns.append("response_probability")
        extra = [[1.0 / (1.0 + math.exp(-float(r)))] for r in pred.risk]
    elif pred.survival is not None:
        columns += [f"survival_{t:g}m" for t in pred.eval_times]
        extra = [[float(s) for s in row] for row in pred.survival]
    rows = [
        [c.case_id, c.split, float(r), g, *e] for c, r, g, e in zip(pred.cases, pred.risk, groups, extra, strict=True)
    ]
    return PredictionTable(columns, rows)


def select_cases(bundle: Bundle, site_root: Path, split: str = "all", manifest: Path | None = None) -> list[CaseRecord]:
    """The cases to score: the site's manifest cases (``split``: all, or the train/val/test split the model's
    seed assigns), or those of another manifest inside the site whose outcome columns may be empty or absent."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if manifest is not None:
        return read_new_cases(site_root, manifest)
    t = bundle.cfg.train
    cases = load_site_cases(site_root, bundle.cfg.seed, t.val_fraction, t.test_fraction)
    return cases if split == "all" else [c for c in cases if c.split == split]


def read_new_cases(site_root: Path, manifest: Path) -> list[CaseRecord]:
    """Cases from a CSV with ``case_id``, ``slide`` and optional ``report`` columns (one row per slide; outcome
    columns are ignored). Raises SiteDataError naming the row and field."""
    from fedmusk.data.site.manifest import relative_site_path
    from fedmusk.data.site.reports import read_report

    site_root = Path(site_root)
    if not manifest.is_file():
        raise SiteDataError("manifest not found", path=manifest)
    text = manifest.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
    for required in ("case_id", "slide"):
        if required not in fields:
            raise SiteDataError(f"the header has no '{required}' column", path=manifest.name, field=required)
    cases: dict[str, CaseRecord] = {}
    for n, row in enumerate(reader, start=1):
        value = {k: (row.get(h) or "").strip() for k, h in fields.items()}
        if not value["case_id"]:
            raise SiteDataError("is empty", path=manifest.name, row=n, field="case_id")
        slide, why = relative_site_path(value["slide"])
        if slide is None:
            raise SiteDataError(f"the slide path {why}", path=manifest.name, row=n, field="slide")
        case = cases.setdefault(
            value["case_id"], CaseRecord(site_root.name, site_root, value["case_id"], [], "", math.nan, 0, None, "new")
        )
        case.slides.append(slide)
        if value.get("report"):
            report, why = relative_site_path(value["report"])
            if report is None:
                raise SiteDataError(f"the report path {why}", path=manifest.name, row=n, field="report")
            text = read_report(site_root / report)
            case.report = f"{case.report}\n{text}" if case.report else text
    if not cases:
        raise SiteDataError("has no data rows", path=manifest.name)
    return list(cases.values())


def default_output(site_root: Path, kind: str, bundle: Bundle, suffix: str = "") -> Path:
    """``<site>/fedmusk-results/<kind>-<model>-<time><suffix>``: inside the site."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(site_root) / RESULTS_DIR / f"{kind}-{bundle.name}-{stamp}{suffix}"


def _same(what: str, recorded: str | None, here: str, key: str) -> None:
    if recorded and recorded != here:
        raise ModelMismatchError(
            f"this model was trained on another {what} (fingerprint {recorded[:12]}) than the one configured here "
            f"({here[:12]}); set {key} to the {what} the model was trained with"
        )


def _cell(value):
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


class progress_bar:
    """A rich progress bar over ``total`` cases; the context value is ``advance(n)``."""

    def __init__(self, console, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self._bar.__enter__()
        return lambda n: self._bar.update(self._task, advance=n)

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)


def run_predict(
    site_root: Path,
    model: str,
    overrides: Sequence[str] = (),
    split: str = "all",
    manifest: Path | None = None,
    out: Path | None = None,
    reprepare: bool = False,
    console=None,
) -> tuple[Path, PredictionTable]:
    """Score the site's cases with ``model`` (see ``resolve_model``) and write the CSV (default: inside the site,
    ``fedmusk-results/predict-<model>-<time>.csv``). Returns the file and the table."""
    import tempfile

    from rich.console import Console

    from fedmusk.training.bundle import open_bundle, resolve_model

    console = console or Console(stderr=True)
    site_root = Path(site_root)
    if not (site_root / "manifest.csv").is_file() and manifest is None:
        raise SiteDataError("manifest.csv not found in the site folder", path=site_root)
    with tempfile.TemporaryDirectory(prefix="fedmusk-model-") as scratch:
        bundle = open_bundle(resolve_model(model, scratch), list(overrides))
        cases = select_cases(bundle, site_root, split, None if manifest is None else _inside(site_root, manifest))
        if not cases:
            raise SiteDataError(f"no cases in split '{split}'", path="manifest.csv")
        predictor = Predictor(bundle)
        predictor.check_site_cache(cases, reprepare)
        with progress_bar(console, "scoring cases", len(cases)) as advance:
            pred = predictor.score(cases, advance)
        table = prediction_table(bundle.task, pred)
        path = table.to_csv(out if out is not None else default_output(site_root, "predict", bundle, ".csv"))
    return path, table


def _inside(site_root: Path, manifest: Path) -> Path:
    return manifest if manifest.is_absolute() or manifest.exists() else site_root / manifest
