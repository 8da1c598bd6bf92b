"""``fedmusk simulate``: a whole federation on one machine, one Flower SuperNode per site folder.

The coordinator (ServerApp) and the sites (ClientApps) are the same code that runs in a deployment; Flower's
simulation runtime only replaces the network. Afterwards the driver, which unlike a coordinator may read every
site, tests the final adapter on every site's test cases and writes ``<out>/summary.json`` (docs/federation.md
lists its fields).
"""

from __future__ import annotations

import os

# Before flwr and ray are imported: no usage statistics leave the machine.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fedmusk.client.site_client import SiteClient, site_address  # noqa: E402
from fedmusk.config import ConfigError, FedMuskConfig  # noqa: E402
from fedmusk.server.checkpoint import CHECKPOINT_DIR, load_latest, resume_point  # noqa: E402
from fedmusk.server.rounds import ROUNDS_FILE  # noqa: E402
from fedmusk.site_settings import site_local_settings  # noqa: E402
from fedmusk.strategies.aggregation import secure_sum_error_bound  # noqa: E402
from fedmusk.wire import (  # noqa: E402
    NODE_PARTITION,
    RUN_OUT_DIR,
    RUN_RESUME,
    RUN_SITE_ROOTS,
    RUN_SITE_SETTINGS,
    wire_run_config,
)

SUMMARY_FILE = "summary.json"
FLOWER_LOG = "flower.log"


@contextlib.contextmanager
def flower_output_to(log_file: Path, console=None):
    """Flower's log, Ray's messages and Python warnings go to ``log_file``; fedmusk's round lines go to
    ``console`` (a rich Console) when given. Everything is put back afterwards."""
    import warnings

    from rich.console import Console

    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = {}
    for name in ("flwr", "ray", "py.warnings"):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers, logger.propagate = [handler], False
    rounds = logging.getLogger("fedmusk.rounds")
    printer = None
    if console is not None:
        # bound to the stream the console writes to now: stdout and stderr are the log file while Flower runs
        printer = _RoundPrinter(Console(file=console.file, width=console.width, no_color=console.no_color))
        rounds.addHandler(printer)
        rounds.setLevel(logging.INFO)
    rounds.addHandler(handler)
    log_stream = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log_stream), contextlib.redirect_stderr(log_stream):
            logging.captureWarnings(True)
            yield
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        rounds.removeHandler(handler)
        if printer is not None:
            rounds.removeHandler(printer)
        handler.close()
        log_stream.close()


class _RoundPrinter(logging.Handler):
    def __init__(self, console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(record.getMessage(), highlight=False)


def run_simulation_from_config(
    cfg: FedMuskConfig,
    site_roots: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    resume: bool = False,
    console=None,
) -> dict[str, Any]:
    """Run ``cfg.federation.pretrain_rounds`` continued-pretraining rounds, then ``cfg.federation.rounds`` outcome
    rounds, over ``site_roots`` (resume: continue from the last checkpoint in
    ``out_dir``), then test the final adapter and write ``<out_dir>/summary.json``; returns the summary.

    Flower's and Ray's own output goes to ``<out_dir>/flower.log``; with a ``console`` (rich) one line per round
    is printed there.

    Raises ConfigError for settings that cannot work, and RoundFailed (from the coordinator) when a round fails.
    """
    from flwr.simulation import run_simulation

    from fedmusk.client.client_app import build_client_app
    from fedmusk.server.server_app import ADAPTER_DIR, build_server_app
    from fedmusk.training.run import check_site_folders

    check_site_folders([Path(r) for r in site_roots])  # before Ray starts: a missing or doubled site is a typo
    roots = [Path(r).resolve() for r in site_roots]
    if len(roots) < cfg.federation.min_sites:
        raise ConfigError(f"{len(roots)} site folders given, but federation.min_sites is {cfg.federation.min_sites}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder for the federation's results")
    resume_point(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {
        **wire_run_config(cfg), RUN_SITE_SETTINGS: json.dumps(site_local_settings(cfg)),
        RUN_SITE_ROOTS: json.dumps([str(r) for r in roots]), RUN_OUT_DIR: str(out), RUN_RESUME: bool(resume),
    }  # fmt: skip
    started = time.monotonic()
    with flower_output_to(out / FLOWER_LOG, console):
        # Flower 1.42 marks run_simulation deprecated in favour of `flwr run` against a local SuperLink: that needs
        # the app packaged as a FAB and a SuperLink process per run (docs/after-the-federation.md says more).
        run_simulation(
            server_app=build_server_app(run_config),
            client_app=build_client_app(run_config),
            num_supernodes=len(roots),
            backend_config=simulation_backend(cfg, len(roots)),
        )
    seconds = time.monotonic() - started
    summary = summarize(cfg, roots, out, run_config, seconds, out / ADAPTER_DIR)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    summary["registered_model"] = record_result(cfg, roots, out, summary)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def record_result(cfg: FedMuskConfig, roots: list[Path], out: Path, summary: dict[str, Any]) -> str | None:
    """Add to the federation's MLflow run what only this driver knows: the final test (pooled and per site, the
    numbers the console prints), the sites as dataset inputs, ``summary.json``; register the final adapter as an
    MLflow model with its lineage. Returns ``models:/NAME/VERSION``."""
    from fedmusk.tracking import Tracker
    from fedmusk.tracking_model import register_model
    from fedmusk.training.bundle import MODEL_FILE, model_card
    from fedmusk.training.cohort import load_site_cases, split_cases
    from fedmusk.training.run import site_datasets

    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for root in roots:
        for split, cases in split_cases(
            load_site_cases(root, cfg.seed, cfg.train.val_fraction, cfg.train.test_fraction)
        ).items():
            splits[split] += cases
    adapter = Path(summary["adapter"])
    meta = json.loads((adapter / MODEL_FILE).read_text())
    lineage = meta["lineage"]
    tags = {
        "fedmusk.federation_id": summary["federation_id"], "fedmusk.strategy": summary["strategy"],
        "fedmusk.rounds": summary["rounds_completed"], "fedmusk.sites": ",".join(summary["sites"]),
        "fedmusk.secure_aggregation": summary["secure_aggregation"], "fedmusk.config_hash": meta["config_hash"],
        "fedmusk.base_fingerprint": meta.get("base_fingerprint") or "unknown", "fedmusk.task": cfg.train.task,
    }  # fmt: skip
    if lineage.get("dp_epsilon") is not None:
        tags.update({"fedmusk.dp_epsilon": lineage["dp_epsilon"], "fedmusk.dp_delta": lineage["dp_delta"]})
    tracker = Tracker(out, uri=summary["tracking_uri"], run_id=summary["run_id"], announce=False)
    with tracker:
        tracker.set_tags({k: v for k, v in tags.items() if k != "fedmusk.base_fingerprint"})
        tracker.log_final_test(summary["test"]["pooled"], summary["test"]["per_site"], step=summary["rounds_completed"])
        tracker.log_site_datasets(site_datasets(roots, splits))
        tracker.log_artifact(out / SUMMARY_FILE)
        name = f"{cfg.tracking.experiment}-{cfg.train.task}"
        version = register_model(tracker, adapter, name, tags, model_card(meta))
    return f"models:/{name}/{version}"


def simulation_backend(cfg: FedMuskConfig, n_sites: int) -> dict[str, Any]:
    """Ray settings: this machine's cores shared by the sites (one core per running site), the GPU split between
    them, no dashboard."""
    import torch

    cpus = os.cpu_count() or 1
    use_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": (1.0 / n_sites) if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }


def summarize(
    cfg: FedMuskConfig, roots: list[Path], out: Path, run_config: dict, seconds: float, adapter_dir: Path
) -> dict[str, Any]:
    """The run's summary: rounds from ``rounds.json``, the final checkpoint's identity, and the test metrics of the
    final adapter on every site (each site with the adapter it would use) and pooled over all sites."""
    fed = cfg.federation
    ckpt = load_latest(out / CHECKPOINT_DIR)
    if ckpt is None:
        raise RuntimeError(f"the federation finished without a checkpoint in {out / CHECKPOINT_DIR}")
    rounds = json.loads((out / ROUNDS_FILE).read_text())
    test = final_test(cfg, roots, run_config, ckpt.global_state, ckpt.round, ckpt.extra["federation_id"])
    bytes_up = [r["bytes_up_per_client"] for r in rounds]
    summary: dict[str, Any] = {
        "strategy": fed.strategy,
        "secure_aggregation": fed.secure_aggregation,
        "pretrain_rounds": fed.pretrain_rounds,
        "rounds_completed": ckpt.round,
        "sites": list(test["per_site"]),
        "federation_id": ckpt.extra["federation_id"],
        "rounds": rounds,
        "test": test,
        "excluded": test.pop("excluded"),
        "bytes_up_per_client_round": sum(bytes_up) / len(bytes_up) if bytes_up else 0.0,
        "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / len(rounds) if rounds else 0.0,
        "tracking_uri": ckpt.extra.get("tracking_uri"),
        "run_id": ckpt.extra["mlflow_run_id"],
        "adapter": str(adapter_dir),
        "checkpoint": str(ckpt.path),
        "seconds": seconds,
    }
    if fed.secure_aggregation:
        summary["secagg"] = {
            "clipping_range": fed.secagg_clipping_range,
            "quantization_range": fed.secagg_quantization_range,
            "num_shares": fed.secagg_num_shares,
            "reconstruction_threshold": fed.secagg_reconstruction_threshold,
            # worst-case error of one coordinate of the unmasked sum over these sites
            "sum_error_bound": secure_sum_error_bound(
                fed.secagg_clipping_range, fed.secagg_quantization_range, len(roots)
            ),
        }
    if fed.dp_noise_multiplier > 0:
        eps = [r["dp_epsilon"] for r in rounds if r.get("dp_epsilon") is not None]
        summary["dp"] = {
            "epsilon": eps[-1] if eps else None, "delta": fed.dp_delta,
            "noise_multiplier": fed.dp_noise_multiplier, "clip": fed.dp_clip,
        }  # fmt: skip
    return summary


def final_test(
    cfg: FedMuskConfig, roots: list[Path], run_config: dict, global_state, round: int, federation_id: str
) -> dict[str, Any]:
    """Test metrics of the final adapter: ``per_site`` (each site's test cases with the adapter that site uses:
    the global one, under FedSA the global A with the site's own B and heads) and ``pooled`` (all sites' test cases
    together, IPCW weights from all training cases), and ``excluded``: each site's excluded cases by reason
    (``summarize`` moves it to the summary's top level). A site without test cases has ``n`` 0 and a ``note``."""
    from fedmusk.training.outcome import Predictions

    per_site: dict[str, dict] = {}
    excluded: dict[str, dict[str, int]] = {}
    predictions: list[Predictions] = []
    train_cases = []
    for i, _ in enumerate(roots):
        site = SiteClient.from_address(cfg, site_address({NODE_PARTITION: i}, run_config))
        session = site.session
        session.load_adapter_state(site.adapter_for_round(global_state, round + 1, federation_id))
        pred = session.trainer.predict(session.splits["test"])
        per_site[site.site_name] = _metrics_or_reason(pred, cfg, session.splits["train"])
        if not pred.cases:
            per_site[site.site_name]["note"] = "this site has no test cases"
        excluded[site.site_name] = session.exclusion_counts
        predictions.append(pred)
        train_cases += session.splits["train"]
    pooled = Predictions(
        cases=[c for p in predictions for c in p.cases],
        risk=np.concatenate([p.risk for p in predictions]),
        survival=None if predictions[0].survival is None else np.concatenate([p.survival for p in predictions]),
        eval_times=predictions[0].eval_times,
    )
    return {"pooled": _metrics_or_reason(pooled, cfg, train_cases), "per_site": per_site, "excluded": excluded}


def _metrics_or_reason(pred, cfg: FedMuskConfig, train_cases) -> dict[str, Any]:
    from fedmusk.training.outcome import metrics_for

    try:
        return metrics_for(pred, cfg, train_cases)
    except ValueError as err:  # too few test cases for a metric: say so instead of losing the whole summary
        return {"n": len(pred.cases), "error": str(err)}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-able: {type(value).__name__}")
