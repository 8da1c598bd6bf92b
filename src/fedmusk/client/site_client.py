"""A site's part in a federated round, without Flower: train on the global adapter, decide what may leave, pack it.

``SiteClient.fit`` is one round at one hospital: load the global adapter (plus, for FedSA, the site's own B factors
and heads kept from its last round), train ``federation.local_epochs`` epochs (FedProx when ``proximal_mu`` > 0),
take the update ``new - global``, keep what the strategy says stays home, clip it for DP when configured, let the
site policy refuse or clip it, and pack what is sent: under SecAgg+ the update pre-multiplied by the site's weight
plus the weight itself (``prepare_for_secure_sum``), reported with ``num_examples=1`` so that the example count
never travels in the clear. Every send and refusal is written to the site's audit log first.

Everything random in a round (batch order, tile bags, dropout, and SecAgg+'s stochastic rounding, which draws from
numpy's global generator right after ``fit`` returns) is seeded from ``(seed, site name, round)``: a round replayed
after a coordinator restart sends exactly the same update.

What the coordinator shares with the site (run- and node-config keys, round phases, ``AdapterLayout``, ``FitReply``)
is ``fedmusk.wire``; this module reads the site's address, policy and configuration from it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedmusk.client.audit import AuditLog
from fedmusk.client.policy import EgressRefused, SitePolicy
from fedmusk.config import ConfigError, FedMuskConfig
from fedmusk.data.site.scrub import Scrubber
from fedmusk.musk_model.roles import lora_factor
from fedmusk.runtime import seed_everything
from fedmusk.site_settings import (
    SITE_SETTINGS_FILE,
    check_model_fingerprint,
    load_site_settings,
    with_site_settings,
)
from fedmusk.strategies.aggregation import StateDict, partition, prepare_for_secure_sum, proximal_term, state_delta
from fedmusk.strategies.privacy import clip_update
from fedmusk.wire import (
    EVAL_METRICS,
    NODE_COORDINATOR,
    NODE_PARTITION,
    NODE_POLICY,
    NODE_SETTINGS,
    NODE_SITE_NAME,
    NODE_SITE_ROOT,
    OUTCOME,
    PRETRAIN,
    PRETRAIN_EVAL_METRICS,
    RUN_BASE_MODEL,
    RUN_SITE_ROOTS,
    RUN_SITE_SETTINGS,
    AdapterLayout,
    FitReply,
    config_from_run_config,
    phase_round,
    round_phase,
    round_roles,
)

log = logging.getLogger("fedmusk.site")

SITE_POLICY_FILE = "site-policy.yaml"
LOCAL_STATE_DIR = Path(".fedmusk") / "federations"  # FedSA: B factors and heads that never leave the site

# Under SecAgg+ a site's example count travels inside the masked sum as ``cases / cap``, with a public cap that
# keeps the weight in (0, 1] (sites with more cases count as ``cap`` cases). The cap should be near the sites'
# real counts: the unmasked mean is divided by the mean weight, so a cap far above them magnifies SecAgg+'s
# quantisation error. ``federation.secagg_weight_cap`` sets it where the schema has that key.


def site_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any], address: SiteAddress) -> FedMuskConfig:
    """The configuration this site trains with: the coordinator's, completed with the site's own settings (a
    deployed site's ``site-settings.yaml`` or node config ``settings``; in simulation the researcher's, carried as
    ``site-settings``), after checking that the site's base model is the run's.

    Raises ConfigError naming the key or file that does not fit."""
    cfg = config_from_run_config(run_config)
    if NODE_SITE_ROOT in node_config:  # deployed: the site's own file, never anything the coordinator sends
        if RUN_SITE_SETTINGS in run_config:
            raise ConfigError(f"the coordinator's run config carries '{RUN_SITE_SETTINGS}': a site chooses its own")
        settings = load_site_settings(address.settings)
    else:
        settings = json.loads(str(run_config.get(RUN_SITE_SETTINGS, "{}")))
    cfg = with_site_settings(cfg, settings)
    if RUN_BASE_MODEL in run_config:
        check_model_fingerprint(json.loads(str(run_config[RUN_BASE_MODEL])), cfg)
    return cfg


@dataclass(frozen=True)
class SiteAddress:
    """Where a SuperNode's site lives and what it calls itself, from its node config (simulation: run config)."""

    root: Path
    policy: Path | None
    name: str | None
    recipient: str | None
    settings: Path | None = None  # the site's site-settings.yaml (deployment)


def site_address(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteAddress:
    """The site of this node: ``site-root`` from the node config, or in simulation the ``partition-id``-th entry of
    the run config's ``site-roots``. Raises ConfigError saying which key is missing."""
    if NODE_SITE_ROOT in node_config:
        root = Path(str(node_config[NODE_SITE_ROOT]))
    elif NODE_PARTITION in node_config and RUN_SITE_ROOTS in run_config:
        roots = json.loads(str(run_config[RUN_SITE_ROOTS]))
        index = int(node_config[NODE_PARTITION])
        if not 0 <= index < len(roots):
            raise ConfigError(f"node partition {index} has no entry in the run config's {len(roots)} site roots")
        root = Path(roots[index])
    else:
        raise ConfigError(f"this SuperNode has no '{NODE_SITE_ROOT}' in its node config (--node-config)")
    if not root.is_dir():
        raise ConfigError(f"site folder {root} does not exist")
    policy = node_config.get(NODE_POLICY)
    if policy is None and (root / SITE_POLICY_FILE).is_file():
        policy = root / SITE_POLICY_FILE
    settings = node_config.get(NODE_SETTINGS)
    if settings is None and (root / SITE_SETTINGS_FILE).is_file():
        settings = root / SITE_SETTINGS_FILE
    name = node_config.get(NODE_SITE_NAME)
    recipient = node_config.get(NODE_COORDINATOR, "simulation" if NODE_PARTITION in node_config else None)
    return SiteAddress(
        root, None if policy is None else Path(str(policy)), None if name is None else str(name),
        None if recipient is None else str(recipient), None if settings is None else Path(str(settings)),
    )  # fmt: skip


def site_policy(address: SiteAddress) -> SitePolicy:
    """The site's egress policy: its policy file, or the built-in default (ConfigError names a bad file)."""
    if address.policy is not None:
        return SitePolicy.load(address.policy, address.root)
    return SitePolicy.default(address.root)


def round_seed(seed: int, site: str, round: int) -> int:
    """The seed of everything random in ``site``'s ``round``: a function of the run seed, site and round only."""
    digest = hashlib.sha256(f"fedmusk-round:{seed}:{site}:{round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # numpy's legacy seeding takes 32 bits


def secure_weight_cap(cfg: FedMuskConfig) -> int:
    """The public case count that maps to weight 1 in the secure sum."""
    return int(cfg.federation.secagg_weight_cap)


def secure_weight(train_cases: int, cap: int, dp: bool) -> float:
    """A site's weight inside the secure sum: 1 under DP (counts are private there), else ``cases / cap`` capped
    at 1. Raises ValueError for a site without training cases."""
    if dp:
        return 1.0
    if train_cases < 1:
        raise ValueError("this site has no training cases")
    return min(train_cases / cap, 1.0)


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """The finite numbers of a metrics dict as Flower can carry them (scalars): confidence intervals [lo, hi]
    become ``<key>_lo`` / ``<key>_hi``; None, nested dicts and other lists are left out."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float | np.integer | np.floating):
            if math.isfinite(float(value)):
                out[f"{prefix}{key}"] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            out[f"{prefix}{key}_lo"], out[f"{prefix}{key}_hi"] = float(value[0]), float(value[1])
    return out


class SiteClient:
    """One hospital in a federation: its training session, policy, audit log and FedSA local state.

    ``session`` defaults to a ``TrainingSession`` over ``site_root``, built on first use; it serves the outcome
    rounds. Pretraining rounds (``federation.pretrain_rounds``) use a pretraining ``TrainingSession`` over the
    site's ``pretrain/`` folder, built when the first of them arrives and dropped when the outcome phase begins.
    ``use_round`` (which ``fit`` and ``evaluate`` call) picks the session of a round's phase.
    """

    def __init__(
        self,
        cfg: FedMuskConfig,
        site_root: str | os.PathLike,
        policy: SitePolicy,
        audit: AuditLog,
        site_name: str | None = None,
        recipient: str | None = None,
        session=None,
    ):
        self.cfg = cfg
        self.site_root = Path(site_root)
        self.policy = policy
        self.audit = audit
        self.site_name = site_name or policy.site_name
        self.recipient = recipient
        self._session = session
        self._pretrain_session = None
        self._pretrain_error: Exception | None = None
        self.phase = OUTCOME
        self._scrubber: Scrubber | None = None
        self._layouts: dict[str, AdapterLayout] = {}
        self.model_builds: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_address(cls, cfg: FedMuskConfig, address: SiteAddress) -> SiteClient:
        """The site client of a SuperNode: its policy file (or the default policy) and the policy's audit log."""
        policy = site_policy(address)
        return cls(cfg, address.root, policy, AuditLog(policy.audit_log_path), address.name, address.recipient)

    # -- parts built on first use ------------------------------------------------------------------------------------

    def use_round(self, round: int) -> str:
        """Switch to the session of ``round``'s phase (pretraining or outcome) and return the phase."""
        self.phase = round_phase(self.cfg, round)
        if self.phase == OUTCOME:
            self._pretrain_session = None  # the pretraining phase is over: free its model
        return self.phase

    @property
    def session(self):
        """The training session of the current phase. In a pretraining round, a site without pretraining data
        raises SiteDataError ("no training data ...") every round: it sits the pretraining phase out."""
        if self.phase == PRETRAIN:
            if self._pretrain_session is None:
                if self._pretrain_error is not None:
                    raise self._pretrain_error
                from fedmusk.data.errors import SiteDataError
                from fedmusk.training.session import TrainingSession

                try:
                    self._pretrain_session = TrainingSession(self.cfg, [self.site_root], pretrain=True)
                except SiteDataError as err:
                    self._pretrain_error = err  # not retried each round: the folder does not change mid-run
                    raise
                self._count_build(PRETRAIN)
            return self._pretrain_session
        if self._session is None:
            from fedmusk.training.session import TrainingSession

            self._session = TrainingSession(self.cfg, [self.site_root])
            self._count_build(OUTCOME)
        return self._session

    def _count_build(self, phase: str) -> None:
        """Count and log a model build: a warm site builds each phase's model once per run."""
        self.model_builds[phase] += 1
        log.info("site %s: %s model built (%d in this run)", self.site_name, phase, self.model_builds[phase])

    @property
    def scrubber(self) -> Scrubber:
        if self._scrubber is None:
            self._scrubber = Scrubber.from_site(self.site_root)
        return self._scrubber

    @property
    def layout(self) -> AdapterLayout:
        """The layout of the global adapter of the current phase as this site's model has it."""
        if self.phase not in self._layouts:
            self._layouts[self.phase] = AdapterLayout.of(self.session.adapter_state())
        return self._layouts[self.phase]

    def scrub_error(self, err: BaseException) -> str:
        """An error as it may leave the site: its type and scrubbed message."""
        return f"site {self.site_name}: {type(err).__name__}: {self.scrubber.text(str(err))}"

    # -- a round -----------------------------------------------------------------------------------------------------

    def fit(self, global_state: Mapping[str, torch.Tensor], round: int, federation_id: str = "") -> FitReply:
        """Train one round from ``global_state`` and return what leaves the site.

        Raises EgressRefused (after recording the refusal in the audit log) when the site policy refuses the
        update, ValueError when a secure-sum value would exceed ``secagg_clipping_range``.
        """
        fed = self.cfg.federation
        self.use_round(round)
        start = self.adapter_for_round(global_state, round, federation_id)
        self._begin_round(round)
        self.session.load_adapter_state(start)
        if fed.strategy == "rolora":  # only this round's factor trains; the other stays the shared global one
            _train_only(self.session.trainer.model, round_roles(self.cfg, round))
        proximal = None
        if fed.proximal_mu > 0:
            proximal = _proximal_to_current(self.session.trainer.model, fed.proximal_mu)
        train = self.session.train(fed.local_epochs, proximal)
        trained = self.session.adapter_state()
        shared, _ = partition(state_delta(trained, start), fed.strategy, phase_round(self.cfg, round))
        if fed.dp_clip > 0:
            shared, _ = clip_update(shared, fed.dp_clip)  # the norm before clipping stays here
        try:
            released = self.policy.enforce(shared, round, self.recipient)
        except EgressRefused as refusal:
            self.audit.record_refusal(federation_id, round, self.recipient, refusal.reasons)
            raise
        cases = self.session.num_train_cases
        if fed.secure_aggregation:
            weight = secure_weight(cases, secure_weight_cap(self.cfg), dp=fed.dp_noise_multiplier > 0)
            wire = prepare_for_secure_sum(released, weight, fed.secagg_clipping_range)
            num_examples = 1  # the count travels masked, inside the sum
        else:
            wire, num_examples = released, cases
        layout = self.layout.update_layout(fed.strategy, fed.secure_aggregation, phase_round(self.cfg, round))
        arrays = layout.to_arrays(wire)
        self.audit.record_send(federation_id, round, self.recipient, {n: wire[n] for n in layout.names})
        if fed.strategy == "fedsa":
            _, local = partition(trained, "fedsa")
            save_local_state(self.site_root, _phase_id(federation_id, self.phase), round, local)
        metrics = scalar_metrics(self.scrubber.metrics({"loss": train.get("loss")}))
        return FitReply(arrays, int(num_examples), {"site": self.site_name, **metrics})

    def evaluate(
        self, global_state: Mapping[str, torch.Tensor], round: int = 0, federation_id: str = ""
    ) -> tuple[int, dict[str, float | int | str]]:
        """Validation and test metrics of the adapter this site would use now (FedSA: the global A with its own B
        and heads): ``(validation cases, {"site", "val_c_index", "val_auc", "test_c_index", ...})``. After a
        pretraining round: the objectives' losses instead (``val_loss``, ``val_mlm``, ..., ``val_n`` items)."""
        self.use_round(round)
        state = self.adapter_for_round(global_state, round + 1, federation_id)
        self.session.load_adapter_state(state)
        metrics: dict[str, float | int | str] = {"site": self.site_name}  # the operator's public name
        n_val = 0
        reported = PRETRAIN_EVAL_METRICS if self.phase == PRETRAIN else EVAL_METRICS
        for split in ("val", "test"):
            result = self.session.evaluate(split)
            shared = {k: v for k, v in result.items() if k.removesuffix("_ci") in reported}
            metrics.update(scalar_metrics(self.scrubber.metrics(shared), prefix=f"{split}_"))
            if split == "val":
                n_val = int(result.get("n", 0))
        if self.phase == OUTCOME:
            metrics.update(self.case_counts())
        return n_val, metrics

    def case_counts(self) -> dict[str, int]:
        """Cases excluded from this site's training and evaluation, by reason (``excluded_no_tissue``,
        ``excluded_unreadable``), and in plain mode the training cases used (``train_n``; under SecAgg+ the case
        count travels only masked, inside the sum)."""
        counts: dict[str, int] = {}
        if not self.cfg.federation.secure_aggregation:
            counts["train_n"] = int(self.session.num_train_cases)
        for reason, n in getattr(self.session, "exclusion_counts", {}).items():
            counts[f"excluded_{reason}"] = int(n)
        return counts

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _begin_round(self, round: int) -> None:
        """Make the round a function of (seed, site, round): reseed every generator, forget optimiser moments."""
        trainer = self.session.trainer  # built first: building a session reseeds the global generators
        seed = round_seed(self.cfg.seed, self.site_name, round)
        seed_everything(seed)
        trainer.generator.manual_seed(seed)
        trainer.optimizer.state.clear()

    def adapter_for_round(
        self, global_state: Mapping[str, torch.Tensor], round: int, federation_id: str
    ) -> StateDict:
        """The adapter this site starts ``round`` from: the global state, with FedSA's site-local tensors (B factors,
        heads) replaced by the site's own from its latest earlier round of the same phase (none yet: the shared
        initialisation; at the first outcome round after pretraining, the site's own pretrained B factors)."""
        state = {k: v.clone() for k, v in global_state.items()}
        if self.cfg.federation.strategy == "fedsa":
            phase = self.phase  # of the state being loaded (evaluation passes round + 1)
            local = latest_local_state(self.site_root, _phase_id(federation_id, phase), before_round=round)
            if local is None and phase == OUTCOME and self.cfg.federation.pretrain_rounds:
                pretrained = latest_local_state(self.site_root, _phase_id(federation_id, PRETRAIN), round)
                if pretrained is not None:
                    local = {k: v for k, v in pretrained.items() if lora_factor(k) == "B" and k in state}
            if local is not None:
                unknown = sorted(set(local) - set(state))
                if unknown:
                    raise ValueError(f"saved local state holds tensors the global adapter lacks: {unknown[:3]}")
                state.update(local)
        return state


def _phase_id(federation_id: str, phase: str) -> str:
    """The local-state folder name of a phase: pretraining keeps its own (its heads differ from the outcome's)."""
    return f"{federation_id or 'default'}-pretrain" if phase == PRETRAIN else federation_id


def local_state_path(site_root: str | os.PathLike, federation_id: str, round: int) -> Path:
    """Where FedSA keeps a site's local tensors after ``round`` of a federation (inside the site folder)."""
    return Path(site_root) / LOCAL_STATE_DIR / (federation_id or "default") / f"round-{round:04d}.safetensors"


def save_local_state(site_root: str | os.PathLike, federation_id: str, round: int, local: StateDict) -> Path:
    path = local_state_path(site_root, federation_id, round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in local.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def latest_local_state(site_root: str | os.PathLike, federation_id: str, before_round: int) -> StateDict | None:
    """The local state saved by the latest round before ``before_round`` (a replayed round never sees its own),
    or None when the site has none yet."""
    folder = local_state_path(site_root, federation_id, 0).parent
    if not folder.is_dir():
        return None
    earlier = sorted(
        p for p in folder.glob("round-*.safetensors") if int(p.stem.removeprefix("round-")) < before_round
    )
    return load_file(str(earlier[-1])) if earlier else None


def _train_only(model: torch.nn.Module, roles: frozenset[str]) -> None:
    """Let the optimiser move only the adapter tensors of ``roles`` this round: the LoRA factors of other roles are
    frozen (no gradient, so AdamW leaves them alone). Base weights and FFA's frozen A (a buffer) are untouched."""
    for name, param in model.named_parameters():
        role = lora_factor(name)
        if role is not None:
            param.requires_grad_(role in roles)


def _proximal_to_current(model: torch.nn.Module, mu: float):
    """FedProx's term against the trainable parameters as they are now (the round's starting point)."""
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def proximal(current_model: torch.nn.Module) -> torch.Tensor:
        current = {n: p for n, p in current_model.named_parameters() if n in reference}
        return proximal_term(current, reference, mu)

    return proximal
