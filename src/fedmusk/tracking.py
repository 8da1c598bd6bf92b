"""The coordinator's run record in MLflow: resolved configuration, per-round metrics, artifacts.

By default a run lives in a local SQLite store inside the run's output folder (``<out_dir>/mlflow.db``, artifacts
under ``<out_dir>/mlartifacts``), so a federation needs no tracking server; pass ``uri`` to use one. The only line
printed is where to open it. Sites never call this module: their metrics reach it through the coordinator.

Only this module imports mlflow, and only when a Tracker is built: importing fedmusk.tracking stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
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
            run = self._client.create_run(exp_id, run_name=run_name)
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

    def log_config(self, cfg: Any) -> list[str]:
        """Log the resolved configuration (a dataclass, OmegaConf config or mapping) as dotted params
        (``train.lr``) and as ``config.yaml``. Values over MLflow's limit are truncated.

        MLflow params cannot change: on a resumed run, keys already logged are kept, and the keys whose value now
        differs are returned and listed in the tag ``fedmusk.config_changed_on_resume``.
        """
        from mlflow.entities import Param

        tree = _to_container(cfg)
        params = {k: _param_value(v) for k, v in _flatten(tree, ".").items()}
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
    ) -> int:
        """One round at step ``round``: ``aggregated`` under ``global/``, each site's metrics under
        ``site/<site_name>/``, and ``comm/bytes_up``, ``comm/bytes_down``, ``time/round_seconds``."""
        return self.log_metrics(
            {
                "global": aggregated,
                "site": per_site,
                "comm": {"bytes_up": bytes_up, "bytes_down": bytes_down},
                "time": {"round_seconds": seconds},
            },
            step=round,
        )

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
