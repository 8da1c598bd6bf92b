"""``fedmusk train``: a centralized (pooled sites) or local (one site) baseline with the federated clients' code.

Writes ``<out>/metrics.json`` (``{"task", "mode", "test": {"c_index", "auc", ...}, ...}``), Kaplan-Meier or ROC
plots of the test cases, the training curves, the adapter in peft's format, and an MLflow run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from fedmusk.config import ConfigError, FedMuskConfig, check_model_config, to_yaml
from fedmusk.musk_model.lora import save_adapter
from fedmusk.training.plots import plot_kaplan_meier, plot_roc, plot_round_curves
from fedmusk.training.session import TrainingSession


def selection_score(task: str, metrics: dict) -> float | None:
    """The validation number that picks the best epoch: C-index for survival, AUROC for response."""
    value = metrics.get("c_index") if task == "survival" else metrics.get("auc")
    return None if value is None else float(value)


RUN_FILES = ("metrics.json", "adapter")  # what a finished run leaves: a folder holding them is not overwritten


def check_run_folder(out_dir: Path, force: bool = False) -> None:
    """Refuse (ConfigError) an output folder that is a file, or that holds an earlier run unless ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the run's results")
    earlier = [name for name in RUN_FILES if (out_dir / name).exists()]
    if earlier and not force:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(earlier)}); choose another folder, or pass "
                          "--force to replace it")  # fmt: skip


def run_train(
    cfg: FedMuskConfig, site_roots: Sequence[Path], out_dir: Path, console: Console | None = None,
    force: bool = False,
) -> dict:
    """Train on ``site_roots`` pooled for ``train.epochs`` epochs and test the model after the last epoch (the
    best validation epoch is reported, not used); the adapter is saved with its config and model card.

    Without test cases the adapter and the training record are still written and ``test`` is None with the reason
    in ``test_note``. Cases without usable slides are excluded (counted in ``excluded``). Raises ConfigError when
    ``out_dir`` holds an earlier run (unless ``force``) or is a file.
    """
    console = console or Console(stderr=True)
    check_model_config(cfg.model)
    out_dir = Path(out_dir)
    check_run_folder(out_dir, force)
    check_site_folders(site_roots)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    task = cfg.train.task
    start = time.perf_counter()
    session = TrainingSession(cfg, site_roots, warn=lambda message: console.print(Text(message, style="yellow")))
    sizes = {split: len(session.trainer.usable_cases(cases)) for split, cases in session.splits.items()}
    mode = "centralized" if len(site_roots) > 1 else "local"
    excluded = session.exclusion_counts
    console.print(f"{mode} {task} training on {len(site_roots)} site(s): {sizes}; cases excluded: {excluded}")
    if not sizes["train"]:
        raise ConfigError("no training cases are left to train on (see the exclusions above, or the manifest's "
                          "split column)")  # fmt: skip
    if not sizes["val"]:
        console.print(Text("no validation cases: model selection is off, the adapter of the last epoch is kept",
                           style="yellow"))  # fmt: skip
    test_note = None if sizes["test"] else "no test cases (no manifest row has split=test): nothing to test on"
    if test_note:
        console.print(Text(f"{test_note}; the adapter and the training record are still written", style="yellow"))

    from fedmusk.tracking import Tracker

    history: dict[str, list] = {"train_loss": [], "val_score": []}
    best_score, best_epoch = None, 0
    sites = [Path(s).name for s in site_roots]
    run_name = f"local-{sites[0]}" if mode == "local" else mode
    what = "all sites pooled" if mode == "centralized" else f"{sites[0]} alone"
    tags = {"fedmusk.arm": mode, "fedmusk.sites": ",".join(sites), "fedmusk.task": task,
            "mlflow.note.content": f"{mode} baseline ({task}): {what}, {cfg.train.epochs} epochs, last epoch tested"}
    with Tracker(
        out_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, run_name=run_name,
        parent_run_id=cfg.tracking.parent_run_id, tags=tags, announce=cfg.tracking.parent_run_id is None,
    ) as tracker:  # fmt: skip
        tracker.log_config(cfg, arm=mode)
        tracker.log_site_datasets(site_datasets(site_roots, session.splits))
        with _progress(console) as bar:
            job = bar.add_task("epochs", total=cfg.train.epochs)
            for epoch in range(1, cfg.train.epochs + 1):
                train = session.train(1)
                val = session.evaluate("val") if sizes["val"] else {}
                score = selection_score(task, val)
                history["train_loss"].append(train["loss"])
                history["val_score"].append(score)
                val_key = "val_c_index" if task == "survival" else "val_auc"
                tracker.log_metrics({"epoch": {"train_loss": train["loss"], val_key: score}}, step=epoch)
                if best_score is None or (score is not None and score > best_score):
                    best_score, best_epoch = score, epoch
                bar.update(job, advance=1, description=f"epoch {epoch}: loss {train['loss']:.3f}, val {_fmt(score)}")
        # The final model is the one after the last epoch, as the federation's is the one after its last round:
        # every arm is tested the same way, and no arm gains from picking its best epoch on a small validation set.
        test_pred = session.trainer.predict(session.splits["test"])
        from fedmusk.training.outcome import metrics_for

        test = metrics_for(test_pred, cfg, session.splits["train"]) if test_pred.cases else None
        per_site = {
            Path(root).name: metrics_for(_subset(test_pred, Path(root).name), cfg, session.splits["train"])
            for root in site_roots
        } if test_pred.cases else {}  # fmt: skip
        plots = _plots(task, test_pred, history, out_dir)
        save_adapter(session.trainer.model, out_dir / "adapter")
        from fedmusk.training.bundle import Lineage, reference_base_and_tokenizer, save_bundle

        base, tokenizer = reference_base_and_tokenizer(cfg)
        save_bundle(out_dir / "adapter", cfg, Lineage(arm=mode, sites=sites, epochs=cfg.train.epochs), base, tokenizer)
        result = {
            "task": task,
            "mode": mode,
            "sites": sites,
            "n_cases": sizes,
            "epochs": cfg.train.epochs,
            "final_epoch": cfg.train.epochs,
            "best_epoch": best_epoch,  # the best validation epoch, for information: the test uses the last one
            "val_score": best_score,
            "excluded": excluded,
            "test": test,
            "test_note": test_note,
            "test_per_site": per_site,
            "history": history,
            "plots": [p.name for p in plots],
            "seconds": round(time.perf_counter() - start, 1),
            "tracking_uri": tracker.tracking_uri,
            "run_id": tracker.run_id,
        }
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        tracker.log_final_test(test, per_site, step=cfg.train.epochs)
        for path in [out_dir / "metrics.json", out_dir / "config.yaml", *plots]:
            tracker.log_artifact(path)
        tracker.log_dir(out_dir / "adapter", "adapter")
    return result


def check_site_folders(site_roots: Sequence[Path]) -> None:
    """ConfigError, before anything starts, for a site folder that does not exist or holds no manifest.csv, and
    for a site given twice (it would be counted twice)."""
    from fedmusk.data.site.manifest import MANIFEST_NAME

    seen: dict[Path, Path] = {}
    for root in site_roots:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"site folder {root} does not exist (or is not a folder)")
        if not (root / MANIFEST_NAME).is_file():
            raise ConfigError(f"site folder {root} holds no {MANIFEST_NAME}")
        real = root.resolve()
        if real in seen:
            raise ConfigError(f"site folder {root} is given twice (also as {seen[real]}); each site counts once")
        seen[real] = root
    names = [Path(r).resolve().name for r in site_roots]
    twins = sorted({n for n in names if names.count(n) > 1})
    if twins:
        raise ConfigError(f"two site folders have the same name {twins[0]!r}; sites are named after their folders, "
                          "so give each a distinct name")  # fmt: skip


def site_datasets(site_roots: Sequence[Path], splits: dict) -> dict[str, dict]:
    """Per site: a digest of its manifest and its case counts per split (what MLflow records as a dataset input)."""
    import hashlib

    out = {}
    for root in site_roots:
        name = Path(root).name
        manifest = Path(root) / "manifest.csv"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:32] if manifest.is_file() else "unknown"
        counts = {split: sum(1 for c in cases if c.site == name) for split, cases in splits.items()}
        out[name] = {"digest": digest, "cases": sum(counts.values()), **counts}
    return out


def _subset(pred, site: str):
    """The predictions of one site's cases."""
    from fedmusk.training.outcome import Predictions

    keep = [i for i, c in enumerate(pred.cases) if c.site == site]
    survival = None if pred.survival is None else pred.survival[keep]
    return Predictions([pred.cases[i] for i in keep], pred.risk[keep], survival, pred.eval_times)


def _plots(task: str, pred, history: dict, out_dir: Path) -> list[Path]:
    paths = [plot_round_curves({"train loss": history["train_loss"]}, out_dir / "training_loss.png", "Training", "loss")]
    if any(v is not None for v in history["val_score"]):
        label = "C-index" if task == "survival" else "AUROC"
        paths.append(plot_round_curves({f"validation {label}": history["val_score"]}, out_dir / "validation.png",
                                       "Validation", label))
    if not pred.cases:
        return paths
    if task == "survival":
        paths.append(plot_kaplan_meier(pred.time, pred.event, pred.risk, out_dir / "kaplan_meier.png",
                                       title="Test cases by predicted risk", time_label="Months"))
    elif len(set(pred.response.tolist())) == 2:
        paths.append(plot_roc(pred.response, pred.risk, out_dir / "roc.png", title="Response, test cases"))
    return paths


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
