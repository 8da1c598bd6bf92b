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
import logging
import math
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmusk.wire import (
    OUTCOME,
    PRETRAIN,
    AdapterLayout,
    config_from_yaml,
    phase_round,
    round_phase,
    round_roles,
)
from fedmusk.config import ConfigError, FedMuskConfig, to_yaml
from fedmusk.server.checkpoint import list_rounds, load_latest, save_round
from fedmusk.strategies.aggregation import (
    SECURE_SUM_WEIGHT_KEY,
    SHARED_ROLES,
    StateDict,
    aggregate,
    finish_secure_sum,
    secure_sum_error_bound,
    tensor_role,
)
from fedmusk.strategies.privacy import RdpAccountant, add_gaussian_noise
from fedmusk.strategies.robust import coordinate_median, trimmed_mean
from fedmusk.strategies.server_opt import build_server_optimizer

CHECKPOINT_DIR = "checkpoints"
ROUNDS_FILE = "rounds.json"
ROBUST_RULES = ("none", "median", "trimmed_mean")


class RoundFailed(RuntimeError):
    """A round that could not produce a new global adapter; the message says which round and why."""


# --- configuration checks and the initial adapter --------------------------------------------------------------


def check_federation_config(cfg: FedMuskConfig) -> None:
    """Refuse settings that cannot work together, before any site is contacted. Raises ConfigError naming the key."""
    fed = cfg.federation

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"federation.{key}: {why}")

    if fed.strategy not in SHARED_ROLES:
        raise bad("strategy", f"{fed.strategy!r}; choose one of {sorted(SHARED_ROLES)}")
    if fed.strategy == "ffa" and not cfg.train.lora.ffa:
        raise ConfigError("federation.strategy=ffa needs train.lora.ffa=true (A frozen at the shared seed)")
    if fed.strategy == "rolora" and cfg.train.lora.ffa:
        raise ConfigError("federation.strategy=rolora trains A in every other round: set train.lora.ffa=false")
    if fed.rounds < 1 or fed.local_epochs < 1:
        raise bad("rounds", f"rounds and local_epochs must be >= 1, got {fed.rounds}, {fed.local_epochs}")
    if fed.pretrain_rounds < 0:
        raise bad("pretrain_rounds", f"{fed.pretrain_rounds}; use 0 (no pretraining phase) or more rounds")
    if fed.pretrain_rounds and cfg.train.task == PRETRAIN:
        raise ConfigError(
            "federation.pretrain_rounds: train.task=pretrain has no outcome phase; set a survival or response task"
        )
    if fed.pretrain_rounds:
        from fedmusk.training.pretrain import enabled_objectives

        enabled_objectives(cfg)  # ConfigError names a bad train.pretrain objective setup
    if not 0 < fed.fraction <= 1:
        raise bad("fraction", f"{fed.fraction}; use a share in (0, 1]")
    if fed.min_replies < 1 or fed.min_sites < fed.min_replies:
        raise bad("min_replies", f"need 1 <= min_replies <= min_sites, got {fed.min_replies}, {fed.min_sites}")
    if fed.wait_for_sites_s <= 0 or fed.reply_timeout_s <= 0:
        raise bad("wait_for_sites_s", "wait_for_sites_s and reply_timeout_s must be positive: never wait forever")
    if fed.robust not in ROBUST_RULES:
        raise bad("robust", f"{fed.robust!r}; choose one of {list(ROBUST_RULES)}")
    if fed.robust != "none" and fed.secure_aggregation:
        raise bad("robust", "robust rules need every site's update, which SecAgg+ hides; set secure_aggregation=false")
    if fed.dp_noise_multiplier < 0 or fed.dp_clip < 0:
        raise bad("dp_noise_multiplier", "dp_noise_multiplier and dp_clip must be >= 0")
    if fed.dp_noise_multiplier > 0 and fed.dp_clip <= 0:
        raise bad("dp_clip", "DP noise needs a clipping norm (dp_clip > 0): noise is calibrated to it")
    if fed.dp_noise_multiplier > 0 and fed.robust != "none":
        raise bad("robust", "robust rules and DP noise cannot be combined (the DP sum is not robust)")
    if fed.secure_aggregation:
        if fed.secagg_num_shares < 3 or fed.secagg_num_shares % 2 == 0:
            raise bad("secagg_num_shares", f"{fed.secagg_num_shares}; SecAgg+ needs an odd number >= 3")
        if not 2 <= fed.secagg_reconstruction_threshold < fed.secagg_num_shares:
            raise bad("secagg_reconstruction_threshold", "must be >= 2 and below secagg_num_shares")
        if fed.min_sites < 2:
            raise bad("min_sites", "SecAgg+ needs at least 2 sites in a round")
        # raises ValueError when the integer sum would wrap around the modulus
        try:
            secure_sum_error_bound(fed.secagg_clipping_range, fed.secagg_quantization_range, fed.min_sites)
        except ValueError as err:
            raise bad("secagg_quantization_range", str(err)) from None
    build_server_optimizer(fed.server_optimizer, eta=fed.server_lr)  # ValueError names a bad optimiser


def adapter_trainer(cfg: FedMuskConfig):
    """An OutcomeTrainer built from the configuration alone (no site data): the model that holds the adapter.

    Base weights never enter the adapter, so the base is built without them (randomly, seeded).
    """
    from fedmusk.musk_model import create_model
    from fedmusk.runtime import load_tokenizer, seed_everything
    from fedmusk.training.outcome import OutcomeTrainer

    seed_everything(cfg.seed)
    changes = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    base = create_model(cfg.model.preset, weights=None, device="cpu", **changes)
    return OutcomeTrainer(cfg, base, load_tokenizer(cfg.model), None, "cpu")  # heads sized from the config


def initial_adapter_state(cfg: FedMuskConfig, phase: str = OUTCOME) -> StateDict:
    """The adapter every site starts ``phase`` from, built from the configuration alone (the coordinator has no
    data): the outcome adapter, or for ``phase="pretrain"`` LoRA with the pretraining heads.

    LoRA A factors are seeded by layer name and B starts at zero, so they equal the sites' own; the heads are
    whatever this seeded build gives, and the phase's first round sends them to every site.
    """
    if phase == PRETRAIN:
        from fedmusk.training.pretrain import pretrain_adapter_state

        return pretrain_adapter_state(cfg)
    return adapter_trainer(cfg).adapter_state()


def outcome_start_state(cfg: FedMuskConfig, pretrained: StateDict) -> StateDict:
    """The outcome phase's starting adapter after pretraining: the seeded outcome adapter with the pretrained
    global LoRA tensors in place of its own (AdapterStateError when the LoRA layouts differ)."""
    from fedmusk.training.pretrain import carry_lora

    return carry_lora(pretrained, initial_adapter_state(cfg, OUTCOME))


def save_global_adapter(
    cfg: FedMuskConfig, global_state: StateDict, out_dir: str | os.PathLike, lineage=None
) -> Path:
    """Write ``global_state`` in peft's format (``fedmusk.musk_model.lora.save_adapter``) with the model's
    configuration, fingerprints and model card (``fedmusk.training.bundle``), and return the folder.

    Under FedSA this is the shared part (A factors) with the initial B and heads: each site's personalised B and
    heads stay at the site."""
    from fedmusk.musk_model.lora import save_adapter
    from fedmusk.training.bundle import Lineage, reference_base_and_tokenizer, save_bundle

    trainer = adapter_trainer(cfg)
    trainer.load_adapter_state(global_state)
    out = save_adapter(trainer.model, out_dir)
    base, tokenizer = reference_base_and_tokenizer(cfg)
    return save_bundle(out, cfg, lineage or Lineage(arm="federated"), base, tokenizer)


# --- one round's record ----------------------------------------------------------------------------------------


@dataclass
class RoundRecord:
    """What happened in one round (``rounds.json`` holds one per round, and the checkpoint carries them)."""

    round: int
    phase: str = OUTCOME  # "pretrain": the metrics are objective losses (val_loss, val_mlm, ...), not C-index
    sampled: int = 0
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    train_loss: dict[str, float] = field(default_factory=dict)  # per site
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation metrics per site
    aggregated: dict[str, float] = field(default_factory=dict)  # evaluation metrics, case-weighted over sites
    eval_failures: list[str] = field(default_factory=list)
    update_norm: float = 0.0  # L2 norm of the aggregated update (before the server optimiser)
    dp_epsilon: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_per_client: float = 0.0
    seconds: float = 0.0


COUNT_METRICS = ("n", "n_events", "n_positive")  # summed over sites; the other metrics are averaged
# One INFO line per finished round (``round_line``); simulations and the demo print it, nothing else does by default.
ROUND_LOG = logging.getLogger("fedmusk.rounds")


def round_line(record: RoundRecord, total_rounds: int) -> str:
    """One line per round for a console: phase, replies, the validation metric, traffic and time."""
    agg = record.aggregated
    if record.phase == PRETRAIN:
        metric = f"val loss {agg['val_loss']:.3f}" if "val_loss" in agg else "val n/a"
    elif "val_c_index" in agg:
        metric = f"val C-index {agg['val_c_index']:.3f}"
    elif "val_auc" in agg:
        metric = f"val AUROC {agg['val_auc']:.3f}"
    else:
        metric = "val n/a"
    return (
        f"round {record.round}/{total_rounds} {record.phase}: {record.replies}/{record.sampled} replies, {metric} "
        f"(site mean), {record.bytes_up / 1e6:.2f} MB up, {record.bytes_down / 1e6:.2f} MB down, {record.seconds:.1f} s"
    )


def weighted_site_mean(per_site: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Across sites: each ``<split>_<metric>`` averaged over the sites that report it, weighted by their
    ``<split>_n`` cases; case counts (``<split>_n``, ``_n_events``, ``_n_positive``, ``excluded_<reason>``) summed;
    confidence limits (``_lo``/``_hi``) left out (they do not average)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in per_site.values():
        for key, value in metrics.items():
            if key.endswith(("_lo", "_hi")) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            split, _, metric = key.partition("_")
            count = metric in COUNT_METRICS or split == "excluded"  # excluded_<reason>: cases, summed
            w = 1.0 if count else float(metrics.get(f"{split}_n", 0) or 0)
            if w > 0:
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + (0.0 if count else w)
    return {k: sums[k] / weights[k] if weights[k] else sums[k] for k in sorted(sums)}


def site_error_text(reason: str) -> str:
    """A site's own (scrubbed) error message out of an error reply, without the runtime's wrapping (Flower's
    "Exception ... occurred. Message: ..." and, in simulation, Ray's traceback)."""
    found = re.findall(r"Message: (.+)", reason)
    text = found[-1] if found else (reason.strip().splitlines() or [""])[0]
    return text.strip()[:500]


def unique_site_names(names: Iterable[str]) -> list[str]:
    """Site names as reported, with "#2", "#3" added to repeats so that no site's metrics overwrite another's."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


# --- the controller --------------------------------------------------------------------------------------------


class RoundController:
    """The coordinator's state across rounds (see the module docstring).

    ``out_dir`` receives ``checkpoints/``, ``rounds.json`` and, by default, the MLflow store. ``resume`` continues
    from the newest checkpoint there (ConfigError when there is none); without it, a folder that already holds
    checkpoints is refused rather than overwritten. ``initial_state`` (the first round's phase's adapter) defaults
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
        check_federation_config(cfg)
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
        if resume:
            ckpt = load_latest(self.checkpoint_dir)
            if ckpt is None:
                raise ConfigError(f"cannot resume: {self.checkpoint_dir} holds no complete checkpoint")
            if "config" in ckpt.extra:
                check_resume_compatible(config_from_yaml(ckpt.extra["config"]), cfg)
            self._restore(ckpt)
            run_id = ckpt.extra.get("mlflow_run_id")
        else:
            if list_rounds(self.checkpoint_dir):
                raise ConfigError(
                    f"{self.out_dir} already holds a federation's checkpoints: resume it or choose another folder"
                )
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


# Sections that must not change when a federation resumes (rounds, waits and tracking may).
_FIXED_ON_RESUME = ("seed", "model", "data", "train")
_FIXED_FEDERATION_KEYS = (
    "strategy", "local_epochs", "pretrain_rounds", "secure_aggregation", "server_optimizer", "server_lr",
    "proximal_mu", "robust", "trim_fraction", "dp_noise_multiplier", "dp_clip",
)  # fmt: skip


def check_resume_compatible(saved: FedMuskConfig, cfg: FedMuskConfig) -> None:
    """ConfigError listing the settings that differ from the checkpointed run's and would change its results."""
    changed = [s for s in _FIXED_ON_RESUME if asdict_or_value(getattr(saved, s)) != asdict_or_value(getattr(cfg, s))]
    changed += [
        f"federation.{k}" for k in _FIXED_FEDERATION_KEYS if getattr(saved.federation, k) != getattr(cfg.federation, k)
    ]
    if changed:
        raise ConfigError(f"cannot resume: these settings differ from the checkpointed run: {', '.join(changed)}")


def asdict_or_value(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value
