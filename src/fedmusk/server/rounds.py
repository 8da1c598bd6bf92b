"""The coordinator's round control, without Flower: the global adapter and everything a round decides about it.

``RoundController`` owns the global adapter state, the server optimiser, the DP accountant, the run record
(MLflow through ``fedmusk.tracking``) and the checkpoints. The Flower strategy only unpacks replies into state dicts
and calls it. What it guarantees:

- a round never waits forever: ``wait_for_sites`` polls with a deadline, replies are bounded by the workflow;
- a round never silently does nothing: fewer replies than ``min_replies`` raise RoundFailed, and so does a round
  whose aggregation never happened (SecAgg+ halts without raising; ``check_fit_done`` turns that into an error);
- after each round a checkpoint (global adapter, optimiser and accountant state, history, MLflow run id, phase) is
  written, and ``resume`` continues from the last one with the same results as an uninterrupted run (sites derive
  their randomness from (seed, site, round); only DP noise is drawn fresh, on purpose).

With ``federation.pretrain_rounds`` = P > 0, rounds 1..P continue MUSK's pretraining (the adapter is LoRA plus the
pretraining heads) and rounds P+1..P+R train the outcome model. ``begin_round`` switches phase at round P+1: the
outcome adapter is built from the configuration (seeded heads, the same at every site) and the pretrained global
LoRA tensors are carried into it (``carry_lora``); the server optimiser starts afresh, the DP accountant goes on.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedmusk.config import ConfigError, FedMuskConfig, check_resume_compatible, to_yaml
from fedmusk.server.checkpoint import CHECKPOINT_DIR, resume_point, save_round
from fedmusk.server.records import ROUND_LOG, RoundRecord, round_line, weighted_site_mean
from fedmusk.strategies.aggregation import (
    SECURE_SUM_WEIGHT_KEY,
    SHARED_ROLES,
    StateDict,
    aggregate,
    finish_secure_sum,
    tensor_role,
)
from fedmusk.strategies.privacy import RdpAccountant, add_gaussian_noise
from fedmusk.strategies.robust import coordinate_median, trimmed_mean
from fedmusk.strategies.server_opt import build_server_optimizer
from fedmusk.training.global_adapter import initial_adapter_state, outcome_start_state
from fedmusk.wire import OUTCOME, PRETRAIN, AdapterLayout, config_from_yaml, phase_round, round_phase, round_roles

ROUNDS_FILE = "rounds.json"


class RoundFailed(RuntimeError):
    """A round that could not produce a new global adapter; the message says which round and why."""


# --- the controller --------------------------------------------------------------------------------------------


class RoundController:
    """The coordinator's state across rounds (see the module docstring).

    ``out_dir`` receives ``checkpoints/``, ``rounds.json`` and, by default, the MLflow store. ``resume`` continues
    from the newest checkpoint there; ``fedmusk.server.checkpoint.resume_point`` refuses a resume with nothing to
    resume and a fresh start in a folder that already holds checkpoints (ConfigError). ``cfg`` is a loaded one
    (``fedmusk.config.check_config`` has run). ``initial_state`` (the first round's phase's adapter) defaults
    to ``initial_adapter_state(cfg, phase of round 1)``.
    """

    def __init__(
        self,
        cfg: FedMuskConfig,
        out_dir: str | os.PathLike,
        resume: bool = False,
        initial_state: StateDict | None = None,
        tracker_factory: Callable[..., Any] | None = None,
    ):
        self.cfg = cfg
        self.fed = cfg.federation
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.optimizer = build_server_optimizer(self.fed.server_optimizer, eta=self.fed.server_lr)
        self.accountant = RdpAccountant() if self.fed.dp_noise_multiplier > 0 else None
        self.history: list[RoundRecord] = []
        self.completed_round = 0
        self._aggregated_round = 0
        self._current: RoundRecord | None = None
        self._available = 0
        self._round_started = 0.0
        run_id = None
        ckpt = resume_point(self.out_dir, resume)
        if ckpt is not None:
            if "config" in ckpt.extra:
                check_resume_compatible(config_from_yaml(ckpt.extra["config"]), cfg)
            self._restore(ckpt)
            run_id = ckpt.extra.get("mlflow_run_id")
        else:
            self.phase = round_phase(cfg, 1)
            self.global_state = initial_state if initial_state is not None else initial_adapter_state(cfg, self.phase)
            self.federation_id = secrets.token_hex(8)
        self._set_shared_names()
        if tracker_factory is None:
            from fedmusk.tracking import Tracker

            tracker_factory = Tracker
        self.tracker = tracker_factory(
            self.out_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
            run_name=f"federation-{self.federation_id}", run_id=run_id, announce=False,
            parent_run_id=cfg.tracking.parent_run_id, tags={"fedmusk.arm": "federated", "mlflow.note.content": (
                f"{self.fed.strategy} federation, secure aggregation {'on' if self.fed.secure_aggregation else 'off'}"
                f", {self.fed.pretrain_rounds} pretraining + {self.fed.rounds} outcome rounds, last round tested"
            )},
        )  # fmt: skip
        self.tracker.log_config(cfg, arm="federated")
        self.tracker.set_tags({
            "fedmusk.federation_id": self.federation_id, "fedmusk.strategy": self.fed.strategy,
            "fedmusk.secure_aggregation": self.fed.secure_aggregation,
        })  # fmt: skip

    # -- before a round ----------------------------------------------------------------------------------------------

    @property
    def total_rounds(self) -> int:
        """Pretraining rounds plus outcome rounds."""
        return self.fed.pretrain_rounds + self.fed.rounds

    def rounds_to_run(self) -> range:
        """The rounds still to run: after the last checkpoint up to ``pretrain_rounds + rounds``."""
        return range(self.completed_round + 1, self.total_rounds + 1)

    def begin_round(self, round: int) -> str:
        """Make the global adapter ``round``'s phase's (idempotent; ``select_sites`` calls it too) and return the
        phase. At the first outcome round after pretraining: the seeded outcome adapter with the pretrained global
        LoRA carried in, and a fresh server optimiser (its moments belong to the other phase's tensors)."""
        phase = round_phase(self.cfg, round)
        if phase != self.phase:
            if (self.phase, phase) != (PRETRAIN, OUTCOME):
                raise RoundFailed(f"round {round}: cannot go from the {self.phase} phase back to {phase}")
            self.global_state = outcome_start_state(self.cfg, self.global_state)
            self.optimizer = build_server_optimizer(self.fed.server_optimizer, eta=self.fed.server_lr)
            self.phase = phase
            self._set_shared_names()
        return phase

    def _set_shared_names(self) -> None:
        shared = SHARED_ROLES[self.fed.strategy]
        self.shared_names = sorted(n for n in self.global_state if tensor_role(n) in shared)  # what rounds move
        if self.fed.strategy == "rolora":
            self.optimizer.expect(self.shared_names)  # each round moves one factor of them (round_names)

    def wait_for_sites(
        self,
        count_sites: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 1.0,
    ) -> int:
        """Poll ``count_sites()`` until ``min_sites`` are connected; RoundFailed after ``wait_for_sites_s``."""
        deadline = clock() + self.fed.wait_for_sites_s
        while True:
            n = count_sites()
            if n >= self.fed.min_sites:
                return n
            if clock() >= deadline:
                raise RoundFailed(
                    f"only {n} of the {self.fed.min_sites} sites needed (federation.min_sites) connected within "
                    f"{self.fed.wait_for_sites_s:g} s (federation.wait_for_sites_s)"
                )
            sleep(min(poll_s, max(deadline - clock(), 0.0)))

    def select_sites(self, round: int, available: Sequence[Any]) -> list[Any]:
        """The sites asked in ``round``: ``fraction`` of those connected (at least min_sites), drawn from a seeded
        generator so that a replayed round asks the same share. RoundFailed when fewer than min_sites are there."""
        if len(available) < self.fed.min_sites:
            raise RoundFailed(
                f"round {round}: {len(available)} sites connected, federation.min_sites is {self.fed.min_sites}"
            )
        k = max(self.fed.min_sites, math.ceil(self.fed.fraction * len(available)))
        chosen = sorted(available)
        if k < len(chosen):
            chosen = sorted(random.Random(f"{self.cfg.seed}:{round}").sample(chosen, k))
        phase = self.begin_round(round)
        self._current = RoundRecord(round=round, phase=phase, sampled=len(chosen))
        self._available = len(available)
        self._round_started = time.monotonic()
        return chosen

    def fit_config(self, round: int) -> dict[str, int | str]:
        """What every site is told with the global adapter: the round, its phase ("pretrain" or "outcome"; the
        sites derive it too and check), the federation (its local-state folder and audit entries), and the adapter
        layout's fingerprint."""
        layout = AdapterLayout.of(self.global_state).fingerprint
        phase = round_phase(self.cfg, round)
        return {"round": round, "phase": phase, "federation-id": self.federation_id, "layout": layout}

    # -- aggregation -------------------------------------------------------------------------------------------------

    def aggregate_plain(
        self, round: int, updates: Sequence[StateDict], weights: Sequence[float], sites: Sequence[str]
    ) -> StateDict:
        """Plain mode: every site's update in the clear. DP: noised sum / sites asked; robust rules: unweighted;
        otherwise the strategy's example-weighted mean. Returns the new global state."""
        self._check_replies(round, len(updates))
        if self.accountant is not None:
            total = {k: sum(u[k].double() for u in updates) for k in updates[0]}
            mean = self._noised_mean(total)
        elif self.fed.robust == "median":
            mean = coordinate_median(updates)
        elif self.fed.robust == "trimmed_mean":
            mean = trimmed_mean(updates, self.fed.trim_fraction)
        else:
            mean = aggregate(updates, weights, self.fed.strategy, phase_round(self.cfg, round))
        return self._step(round, mean, sites)

    def aggregate_secure(self, round: int, uniform_mean: StateDict, replies: int, sites: Sequence[str]) -> StateDict:
        """SecAgg+ mode: ``uniform_mean`` is what the workflow unmasks, the plain mean over the ``replies`` sites of
        their prepared vectors ``[w * delta, w]``. Without DP the weighted mean is ``sum(w delta) / sum(w)``; with DP
        (every w = 1) the noised sum is divided by the number of sites asked. Returns the new global state."""
        self._check_replies(round, replies)
        if SECURE_SUM_WEIGHT_KEY not in uniform_mean:
            raise RoundFailed(f"round {round}: the secure sum carries no weight; did the sites run SecAgg+?")
        if self.accountant is not None:
            total = {k: v.double() * replies for k, v in uniform_mean.items() if k != SECURE_SUM_WEIGHT_KEY}
            mean = self._noised_mean(total)
        else:
            mean = finish_secure_sum(uniform_mean)
        return self._step(round, mean, sites)

    def _check_replies(self, round: int, replies: int) -> None:
        if replies < self.fed.min_replies:
            missing = self._record().sampled - replies
            raise RoundFailed(
                f"round {round}: {replies} sites replied and {missing} failed or timed out; federation.min_replies "
                f"is {self.fed.min_replies}, so the round cannot produce a global adapter"
            )

    def _noised_mean(self, total: Mapping[str, torch.Tensor]) -> StateDict:
        record = self._record()
        noised = add_gaussian_noise(
            {k: v.float() for k, v in total.items()}, self.fed.dp_noise_multiplier, self.fed.dp_clip
        )  # a fresh, unpredictable seed: DP noise must not be replayable
        sampling = "full" if record.sampled >= self._available else "fixed_size"
        self.accountant.step(self.fed.dp_noise_multiplier, sampling, record.sampled / self._available)
        record.dp_epsilon = self.accountant.report(self.fed.dp_delta).epsilon
        return {k: v / record.sampled for k, v in noised.items()}

    def round_names(self, round: int) -> list[str]:
        """The global tensors ``round`` moves (all of ``shared_names``, or for RoLoRA the factor of the round)."""
        roles = round_roles(self.cfg, round)
        return [n for n in self.shared_names if tensor_role(n) in roles]

    def _step(self, round: int, mean: StateDict, sites: Sequence[str]) -> StateDict:
        expected = set(self.round_names(round))
        if set(mean) != expected:
            raise RoundFailed(f"round {round}: the aggregate holds {sorted(set(mean) ^ expected)[:3]} unexpectedly")
        bad = [k for k, v in mean.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise RoundFailed(f"round {round}: the aggregated update has NaN or infinite values in {bad[:3]}")
        record = self._record()
        record.replies = len(sites)
        record.update_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in mean.values()))
        mean = {k: v.to(self.global_state[k].dtype) for k, v in mean.items()}
        self.global_state = self.optimizer.step(self.global_state, mean)
        self._aggregated_round = round
        return self.global_state

    # -- after a round -----------------------------------------------------------------------------------------------

    def check_fit_done(self, round: int, errors: Sequence[str] = ()) -> None:
        """RoundFailed unless ``round``'s aggregation happened: SecAgg+ halts without raising when too few sites
        remain, and the round would otherwise keep the old adapter silently."""
        if self._aggregated_round == round:
            return
        why = f"; site errors: {' | '.join(errors[:3])}" if errors else ""
        sampled = self._record().sampled
        cause = (
            "SecAgg+ halts when fewer sites than secagg_reconstruction_threshold stay in the round"
            if self.fed.secure_aggregation
            else "no site update reached the coordinator"
        )
        raise RoundFailed(
            f"round {round}: no new global adapter: the aggregation did not complete ({cause}; {sampled} sites "
            f"were asked){why}"
        )

    def record_fit(self, round: int, train_loss: Mapping[str, float], failures: Sequence[str]) -> None:
        """Keep the sites' training losses and the (scrubbed) errors of the sites that failed, once each."""
        record = self._record()
        record.train_loss = dict(train_loss)
        record.failures = list(dict.fromkeys(failures))

    def record_evaluation(
        self, round: int, per_site: Mapping[str, Mapping[str, float]], failures: Sequence[str] = ()
    ) -> dict[str, float]:
        """Store each site's evaluation metrics and their case-weighted mean (a site whose evaluation failed is
        listed in ``eval_failures``; the round still counts); returns the mean."""
        record = self._record()
        record.eval_failures = list(failures)
        record.per_site = {name: dict(m) for name, m in per_site.items()}
        record.aggregated = weighted_site_mean(per_site)
        return record.aggregated

    def finish_round(self, round: int, bytes_up: int, bytes_down: int, uploading_sites: int) -> RoundRecord:
        """Close ``round``: traffic, run record, ``rounds.json`` and the checkpoint (atomically, last)."""
        record = self._record()
        record.bytes_up, record.bytes_down = int(bytes_up), int(bytes_down)
        record.bytes_up_per_client = bytes_up / uploading_sites if uploading_sites else 0.0
        record.seconds = time.monotonic() - self._round_started
        self.history.append(record)
        self._current = None
        self.completed_round = round
        losses = [v for v in record.train_loss.values() if math.isfinite(v)]
        aggregated = {**record.aggregated, "update_norm": record.update_norm}
        if losses:
            aggregated["train_loss"] = sum(losses) / len(losses)
        if record.dp_epsilon is not None:
            aggregated["dp_epsilon"] = record.dp_epsilon
        per_site = {
            name: {**m, **({"train_loss": record.train_loss[name]} if name in record.train_loss else {})}
            for name, m in record.per_site.items()
        }
        self.tracker.log_round(
            round, aggregated, per_site, record.bytes_up, record.bytes_down, record.seconds, phase=record.phase
        )
        self._write_rounds()
        ROUND_LOG.info(round_line(record, self.total_rounds))
        save_round(
            self.checkpoint_dir, round, self.global_state,
            strategy_state={
                "server_optimizer": self.optimizer.state_dict(),
                "accountant": None if self.accountant is None else self.accountant.state_dict(),
            },
            extra={
                "federation_id": self.federation_id, "mlflow_run_id": self.tracker.run_id, "phase": self.phase,
                "tracking_uri": self.tracker.tracking_uri, "seed": self.cfg.seed, "config": to_yaml(self.cfg),
                "history": [asdict(r) for r in self.history],
            },
        )  # fmt: skip
        return record

    def publish(self, adapter_dir: Path) -> list[Path]:
        """Attach the federation's results to its MLflow run: the final adapter (peft format), ``rounds.json`` and
        round curves of the aggregated validation metrics and training loss. Returns the plot files."""
        from fedmusk.training.plots import plot_round_curves

        series: dict[str, list] = {}
        for record in self.history:
            values = {**record.aggregated}
            losses = [v for v in record.train_loss.values() if math.isfinite(v)]
            values["train_loss"] = sum(losses) / len(losses) if losses else None
            for key in ("val_c_index", "val_auc", "val_loss", "train_loss"):
                series.setdefault(key, []).append(values.get(key))
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        plots = []
        for key, values in series.items():
            plots.append(plot_round_curves({key: values}, self.out_dir / f"rounds_{key}.png", "Federation", key))
        for path in [self.out_dir / ROUNDS_FILE, *plots]:
            self.tracker.log_artifact(path)
        self.tracker.log_dir(adapter_dir, "adapter")
        return plots

    def lineage(self):
        """Where the global adapter comes from, for its model card and registry tags (no paths, no case ids)."""
        from fedmusk.training.bundle import Lineage

        sites = sorted({name for r in self.history for name in (*r.per_site, *r.train_loss)})
        eps = [r.dp_epsilon for r in self.history if r.dp_epsilon is not None]
        return Lineage(
            arm="federated", sites=sites, federation_id=self.federation_id, rounds=self.completed_round,
            strategy=self.fed.strategy, secure_aggregation=self.fed.secure_aggregation,
            dp_epsilon=eps[-1] if eps else None, dp_delta=self.fed.dp_delta if eps else None,
        )  # fmt: skip

    def close(self, failed: bool = False) -> None:
        """End the MLflow run: FINISHED, or FAILED after an error."""
        self.tracker.finish("FAILED" if failed else "FINISHED")

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _record(self) -> RoundRecord:
        if self._current is None:
            raise RuntimeError("no round in progress: call select_sites first")
        return self._current

    def _restore(self, ckpt) -> None:
        extra = ckpt.extra
        self.global_state = dict(ckpt.global_state)
        self.federation_id = extra["federation_id"]
        # the phase of the checkpointed state; the next round's begin_round switches when that round's differs
        self.phase = extra.get("phase", round_phase(self.cfg, max(ckpt.round, 1)))
        self.completed_round = ckpt.round
        self._aggregated_round = ckpt.round
        self.history = [RoundRecord(**r) for r in extra.get("history", [])]
        state = ckpt.strategy_state
        self.optimizer.load_state_dict(state["server_optimizer"])
        if self.accountant is not None:
            if state.get("accountant") is None:
                raise ConfigError("cannot resume with DP: the checkpoint was written by a run without DP")
            self.accountant.load_state_dict(state["accountant"])

    def _write_rounds(self) -> None:
        path = self.out_dir / ROUNDS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in self.history], indent=1) + "\n")
        os.replace(tmp, path)

