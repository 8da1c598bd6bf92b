"""The coordinator's run record in MLflow: resolved configuration, per-round metrics, artifacts.

By default a run lives in a local SQLite store inside the run's output folder (``<out_dir>/mlflow.db``, artifacts
under ``<out_dir>/mlartifacts``), so a federation needs no tracking server; pass ``uri`` to use one. The only line
printed is where to open it. Sites never call this module: their metrics reach it through the coordinator.

Only this module (and ``fedmusk.tracking_model``, which writes fedmusk's model as an MLflow model and registers it
through a Tracker) imports mlflow, and only when a Tracker is built: importing fedmusk.tracking stays cheap.

Metric names are one vocabulary for every arm of a study (federated, centralized, local): ``test/<metric>`` is the
final test over all the arm's test cases pooled (``test/c_index``, ``test/auc``, ...; the bootstrap CI is the tag
``test/<metric>_ci``), ``test_site/<site>/<metric>`` each site's test cases; per-round values live under ``round/``
(the case-weighted mean over sites as ``round/site_mean/...``, each site as ``round/site/<site>/...``), per-epoch
values of the baselines under ``epoch/``, pretraining rounds under ``pretrain/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow.utils.validation): values longer than this are truncated; batches are split.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Final-test numbers logged as metrics (CIs go to tags; alpha, n_boot and the like are settings, not results).
TEST_METRICS = ("c_index", "c_index_uno", "td_auc", "ibs", "auc", "auprc", "n", "n_events", "n_positive")
ARMS = ("study", "federated", "centralized", "local")


class Tracker:
    """One MLflow run of a federation; use as a context manager, or call ``finish``.

    ``run_id`` resumes that run (``--resume``): metrics append to it and its status returns to RUNNING.
    Raises ValueError when ``run_id`` names no run in the store.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        uri: str | None = None,
        experiment: str = "fedmusk",
        run_name: str | None = None,
        run_id: str | None = None,
        announce: bool = True,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()  # after the import: importing mlflow sets its loggers up

        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        local = uri is None
        self.tracking_uri = f"sqlite:///{self.out_dir / 'mlflow.db'}" if local else uri
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException:
                raise ValueError(f"no MLflow run {run_id} in {self.tracking_uri}; cannot resume it") from None
            self._client.update_run(run_id, status="RUNNING")
            self.resumed = True
        else:
            exp = self._client.get_experiment_by_name(experiment)
            if exp is None:
                location = (self.out_dir / "mlartifacts").as_uri() if local else _artifacts_beside(uri)
                exp_id = self._client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run_tags = {**standard_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(exp_id, run_name=run_name, tags=run_tags)
            self.resumed = False
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self._finished = False
        if announce:
            print(f"MLflow run {self.run_id}: open it with `{self.ui_command}`", file=sys.stderr)

    @property
    def ui_command(self) -> str:
        """The shell command that opens this run's store in the MLflow UI."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def log_config(self, cfg: Any, arm: str | None = None) -> list[str]:
        """Log the resolved configuration (a dataclass, OmegaConf config or mapping) as dotted params
        (``train.lr``) and as ``config.yaml``. Values over MLflow's limit are truncated. With ``arm`` only the
        params that apply to that arm are logged (``arm_params``); config.yaml keeps everything.

        MLflow params cannot change: on a resumed run, keys already logged are kept, and the keys whose value now
        differs are returned and listed in the tag ``fedmusk.config_changed_on_resume``.
        """
        from mlflow.entities import Param

        tree = _to_container(cfg)
        params = {k: _param_value(v) for k, v in _flatten(tree, ".").items()}
        if arm is not None:
            params = {k: v for k, v in params.items() if applies_to(k, arm, tree)}
        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])
        if changed:
            self._client.set_tag(self.run_id, "fedmusk.config_changed_on_resume", ",".join(changed)[:5000])
        self._client.log_text(self.run_id, _yaml(tree), "config.yaml")
        return changed

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log numbers at ``step``; nested mappings become "/"-joined keys (``site/a/c_index``). None, strings and
        other non-numbers are skipped (NaN is kept: it says a run diverged). Returns how many were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_metric_key(k), v, now, step)
            for k, value in _flatten(metrics, "/").items()
            if (v := _number(value)) is not None
        ]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
        return len(batch)

    def log_round(
        self,
        round: int,
        aggregated: Mapping[str, Any],
        per_site: Mapping[str, Mapping[str, Any]],
        bytes_up: int,
        bytes_down: int,
        seconds: float,
        phase: str = "outcome",
    ) -> int:
        """One round at step ``round`` under ``round/`` (``pretrain/`` for a pretraining round): the case-weighted
        mean over sites as ``site_mean/``, each site's metrics under ``site/<site_name>/``, and ``bytes_up``,
        ``bytes_down``, ``seconds``."""
        prefix = "pretrain" if phase == "pretrain" else "round"
        return self.log_metrics(
            {
                prefix: {
                    "site_mean": _results_only(aggregated),
                    "site": {name: _results_only(m) for name, m in per_site.items()},
                    "bytes_up": bytes_up, "bytes_down": bytes_down,
                    "seconds": seconds,
                }
            },
            step=round,
        )  # fmt: skip

    def log_final_test(
        self, pooled: Mapping[str, Any] | None, per_site: Mapping[str, Mapping[str, Any]], step: int = 0
    ) -> int:
        """The arm's final test: ``test/<metric>`` over all its test cases pooled, ``test_site/<site>/<metric>``
        per site, each CI as the tag ``test/<metric>_ci`` ("low to high"). Returns how many metrics were logged.
        ``pooled=None`` (no test cases): nothing is logged but the tag ``test/note``."""
        if pooled is None:
            self._client.set_tag(self.run_id, "test/note", "no test cases: nothing to test on")
            return 0
        metrics = {"test": _test_numbers(pooled), "test_site": {s: _test_numbers(m) for s, m in per_site.items()}}
        for key in TEST_METRICS:
            ci = pooled.get(f"{key}_ci")
            if ci and None not in ci:
                self._client.set_tag(self.run_id, f"test/{key}_ci", f"{ci[0]:.4f} to {ci[1]:.4f}")
            reason = (pooled.get("reasons") or {}).get(key)
            if reason:
                self._client.set_tag(self.run_id, f"test/{key}_undefined", _param_value(reason))
        return self.log_metrics(metrics, step=step)

    def log_site_datasets(self, sites: Mapping[str, Mapping[str, Any]], context: str = "training") -> None:
        """Each site's data as an MLflow dataset input: its name, a digest and case counts only (``sites[name]`` =
        ``{"digest": ..., "cases": n, "train": n, ...}``); never paths or case ids."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(name=name, digest=str(info["digest"])[:36], source_type="fedmusk-site",
                        source=json.dumps({"site": name}),
                        profile=json.dumps({k: v for k, v in info.items() if k != "digest"})),
                tags=[InputTag("mlflow.data.context", context)],
            )
            for name, info in sites.items()
        ]  # fmt: skip
        if inputs:
            self._client.log_inputs(self.run_id, datasets=inputs)

    def register_model(self, model_dir: str | os.PathLike, name: str, tags: Mapping[str, Any], description: str):
        """Log the MLflow model folder ``model_dir`` under the run's ``model/`` and register it as a new version of
        ``name``; returns the version number. ``fedmusk.tracking_model.register_model`` writes fedmusk's model as
        such a folder (a pyfunc that runs ``fedmusk predict``) and calls this."""
        self._client.log_artifacts(self.run_id, str(model_dir), "model")
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name, description="fedmusk outcome models")
        except MlflowException:  # it exists: add a version
            pass
        source = f"{self._client.get_run(self.run_id).info.artifact_uri}/model"
        version = self._client.create_model_version(
            name, source, run_id=self.run_id, tags={k: str(v) for k, v in tags.items()}, description=description
        )
        return version.version

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts (under ``artifact_path`` when given)."""
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a folder's contents into the run's artifacts (under ``artifact_path`` when given)."""
        self._client.log_artifacts(self.run_id, str(path), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric of this run, in step order."""
        return sorted((m.step, m.value) for m in self._client.get_metric_history(self.run_id, key))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings), e.g. the config hash or the strategy's name."""
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED; later calls do nothing."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"run status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if not self._finished:
            self._client.set_terminated(self.run_id, status=status)
            self._finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def standard_tags() -> dict[str, str]:
    """Source tags MLflow shows for every run: the fedmusk command, its version and, in a git checkout, the
    commit."""
    import fedmusk

    command = " ".join(["fedmusk", *sys.argv[1:2]]) if Path(sys.argv[0]).name == "fedmusk" else "fedmusk (python)"
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "fedmusk.version": fedmusk.__version__}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def applies_to(key: str, arm: str, tree: Mapping[str, Any]) -> bool:
    """Whether config key ``key`` (dotted) applies to ``arm``: tracking settings never (they say where the record
    is, not how the model was made); federation settings and pretraining only to the federation (and pretraining
    only when it ran); the baselines' epoch count not to the federation, which trains ``local_epochs`` per round."""
    if key.startswith("tracking."):
        return False
    if arm in ("centralized", "local"):
        return not key.startswith(("federation.", "train.pretrain."))
    if arm == "federated":
        pretrain = (tree.get("federation") or {}).get("pretrain_rounds", 0)
        if key.startswith("train.pretrain.") and not pretrain:
            return False
        return key != "train.epochs"
    return True


def _results_only(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics without confidence limits and bootstrap settings: a CI is not a series of its own."""
    return {k: v for k, v in metrics.items() if not str(k).endswith(_NOT_SERIES)}


_NOT_SERIES = ("_lo", "_hi", "alpha", "n_boot", "_tau")


def _test_numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The final-test numbers; a metric the test cases do not define (``reasons`` says why: too few cases, one
    class) is NaN, so every arm still has the same names side by side."""
    reasons = metrics.get("reasons") or {}
    return {
        k: (math.nan if metrics.get(k) is None and k in reasons else metrics[k]) for k in TEST_METRICS if k in metrics
    }


def download_model(uri: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Download an MLflow model (``models:/NAME/VERSION``, ``runs:/ID/model``) into ``dst``; returns the folder."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    except MlflowException as err:
        raise FileNotFoundError(f"{uri}: {str(err).splitlines()[0]}") from None


def _quiet_mlflow() -> None:
    # MLflow announces database creation and migrations at INFO; a coordinator's console is for the federation.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _to_container(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if isinstance(cfg, Mapping):
        return {str(k): _to_container(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise TypeError(f"cannot log a {type(cfg).__name__} as a configuration; pass a dataclass, OmegaConf or dict")


def _yaml(tree: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(tree))


def _flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, sep, name))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - len(_TRUNCATED)] + _TRUNCATED
    return text


def _metric_key(key: str) -> str:
    # Site names and metric names come from configs and sites: keep only what MLflow accepts in a key.
    return _BAD_KEY_CHARS.sub("_", key)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-value tensor
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar or 0-d array
        return _number(value.item())
    return None


def _artifacts_beside(uri: str) -> str | None:
    """For a SQLite store: an artifact folder beside the database file. MLflow's own default is ``./mlruns`` in
    whatever folder the process started from, which would scatter a federation's artifacts. Servers choose their
    own artifact store (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()
