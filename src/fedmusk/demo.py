"""``fedmusk demo``: the federated story end to end; ``fedmusk embed``: zero-shot similarity on image files."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from fedmusk.config import FedMuskConfig, check_model_config, to_yaml
from fedmusk.musk_model.zeroshot import image_text_similarity
from fedmusk.runtime import load_model, load_tokenizer, resolve_device, seed_everything


def read_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise FileNotFoundError(f"{path}: not a readable image ({err})") from None


def similarity_for_files(cfg: FedMuskConfig, paths: Sequence[Path], texts: Sequence[str]):
    seed_everything(cfg.seed)
    model = load_model(cfg.model, resolve_device(cfg.device), cfg.seed)
    return image_text_similarity(
        model, load_tokenizer(cfg.model), [read_image(p) for p in paths], texts, cfg.model.max_text_len
    )


def print_similarity_table(console: Console, names, texts, sims: torch.Tensor, probs: torch.Tensor) -> None:
    table = Table(title="image-text similarity (cosine; probability over the texts)")
    table.add_column("image")
    for t in texts:
        table.add_column(t if len(t) <= 40 else t[:37] + "...", justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(f"{sims[i, j]:+.3f} ({probs[i, j]:.2f})" for j in range(len(texts))))
    console.print(table)


def run_demo(cfg: FedMuskConfig, console: Console, workdir: Path = Path("runs/demo")) -> dict:
    """The federated story end to end: a synthetic 3-hospital cohort (made once), a SecAgg+ federation of the three
    hospitals, a pooled (centralized) baseline and each hospital alone; prints the test results side by side."""
    from fedmusk.data.synth.cohort import synthesize_cohort
    from fedmusk.federation import run_simulation_from_config
    from fedmusk.training.run import run_train

    check_model_config(cfg.model)
    seed_everything(cfg.seed)
    if cfg.model.preset == "tiny":
        torch.set_num_threads(1)  # a tiny model spends more time handing work between threads than computing
    cohort = workdir / "cohort"
    if not (cohort / "cohort.json").is_file():
        console.print(f"writing the synthetic 3-hospital cohort to {cohort} ...")
        synthesize_cohort(cohort, sites=3, seed=cfg.seed, tile_px=cfg.data.tile_size, progress=True)
    sites = sorted(p for p in cohort.iterdir() if (p / "manifest.csv").is_file())
    runs = workdir / time.strftime("%Y%m%d-%H%M%S")
    study = open_study(cfg, runs, [s.name for s in sites])
    arm_cfg = replace(cfg, tracking=replace(cfg.tracking, uri=study.tracking_uri, parent_run_id=study.run_id))
    with study:
        console.rule(f"federation of {len(sites)} hospitals, {cfg.federation.strategy}, "
                     f"{'SecAgg+' if cfg.federation.secure_aggregation else 'plain'} aggregation")
        federated = run_simulation_from_config(arm_cfg, sites, runs / "federated", console=console)
        console.rule("baselines: all hospitals pooled, then each hospital alone")
        pooled = run_train(arm_cfg, sites, runs / "centralized", console)
        alone = {site.name: run_train(arm_cfg, [site], runs / f"local-{site.name}", console) for site in sites}
        table = results_table(cfg.train.task, federated, pooled, alone, [s.name for s in sites])
        console.print(table)
        (runs / "results.txt").write_text(_plain(table))
        study.log_artifact(runs / "results.txt")
    console.print(
        f"bytes sent per hospital per round: {federated['bytes_up_per_client_round']:,.0f}; "
        f"federation took {federated['seconds']:.0f} s"
    )
    console.print(f"registered model: {federated['registered_model']}")
    console.print(f"results in {runs}; compare every arm in MLflow with: {study.ui_command}")
    return {"federated": federated, "centralized": pooled, "local": alone}


def open_study(cfg: FedMuskConfig, runs: Path, sites: list[str]):
    """The study's parent MLflow run: one store (``tracking.uri``, by default ``<runs>/mlflow.db``), one experiment;
    every arm of the demo becomes a child run of it."""
    from fedmusk.tracking import Tracker

    runs.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri or f"sqlite:///{(runs / 'mlflow.db').resolve()}"
    description = (
        f"fedmusk demo: a {cfg.federation.strategy} federation of {len(sites)} hospitals against the pooled "
        "(centralized) baseline and each hospital alone; compare the child runs' test/ metrics"
    )
    tags = {"fedmusk.arm": "study", "fedmusk.sites": ",".join(sites), "fedmusk.task": cfg.train.task,
            "mlflow.note.content": description}  # fmt: skip
    study = Tracker(runs, uri=uri, experiment=cfg.tracking.experiment, run_name=f"study-{runs.name}", tags=tags,
                    announce=False)  # fmt: skip
    (runs / "config.yaml").write_text(to_yaml(cfg))
    study.log_artifact(runs / "config.yaml")
    return study


def _plain(table: Table) -> str:
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the console
    console.print(table)
    return console.export_text()


def results_table(task: str, federated: dict, pooled: dict, alone: dict, sites: list[str]) -> Table:
    """Test C-index (survival) or AUROC (response) per hospital's test cases and over all test cases."""
    key = "c_index" if task == "survival" else "auc"
    table = Table(title=f"test {'C-index' if key == 'c_index' else 'AUROC'} (95% bootstrap CI over all test cases)")
    table.add_column("model")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("all test cases", justify="right")

    def cell(metrics: dict | None) -> str:
        value = None if metrics is None else metrics.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    def with_ci(metrics: dict) -> str:
        ci = metrics.get(f"{key}_ci")
        return cell(metrics) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "")

    fed_sites = federated["test"]["per_site"]
    table.add_row("federated", *(cell(fed_sites.get(s)) for s in sites), with_ci(federated["test"]["pooled"]))
    table.add_row("centralized (pooled)", *(cell(pooled["test_per_site"].get(s)) for s in sites), with_ci(pooled["test"]))
    for name, result in alone.items():
        table.add_row(f"{name} alone", *(cell(result["test"]) if s == name else "" for s in sites), "")
    return table
