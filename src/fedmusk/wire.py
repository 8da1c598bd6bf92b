"""The contract between a federation's coordinator and its sites: what both sides must agree on.

A coordinator sends each round's run with a run configuration (``RUN_*`` keys: the fedmusk configuration as plain
YAML, the base model's fingerprint, the output folder and resume flag), and each SuperNode knows its site from its
node configuration (``NODE_*`` keys). Both sides derive the round's phase (``PRETRAIN`` or ``OUTCOME``) and the
tensor roles that travel from the configuration alone. Adapter tensors travel as float32 arrays in the fixed
order of ``AdapterLayout``; a site answers a round with a ``FitReply`` and reports the evaluation metrics named in
``EVAL_METRICS`` (``PRETRAIN_EVAL_METRICS`` in a pretraining round).

The configuration is parsed from text as plain data (no interpolation, no temporary file): a site never resolves
anything the coordinator sends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from fedmusk.config import ConfigError, FedMuskConfig, to_yaml
from fedmusk.site_settings import model_fingerprint, parse_config_data, parse_coordinator_config, without_site_local
from fedmusk.strategies.aggregation import SECURE_SUM_WEIGHT_KEY, StateDict, shared_roles, tensor_role

# --- the run configuration (set by the coordinator) and node configuration (set by the site) -------------------

RUN_CONFIG = "fedmusk-config"  # the resolved configuration as YAML (run-config values are scalars)
RUN_SITE_ROOTS = "site-roots"  # simulation only: JSON list of site folders, indexed by the node's partition-id
RUN_OUT_DIR = "out-dir"  # the coordinator's output folder (checkpoints, MLflow store)
RUN_RESUME = "resume"  # continue from the last checkpoint in out-dir
RUN_BASE_MODEL = "base-model"  # JSON: preset and sha256 of the weights and tokenizer every site must have
RUN_SITE_SETTINGS = "site-settings"  # simulation only: JSON of the site-local settings (deployed sites have a file)

NODE_SITE_ROOT = "site-root"  # the site folder
NODE_POLICY = "policy"  # the site's policy file; default <site folder>/site-policy.yaml when present
NODE_SITE_NAME = "site-name"  # the name the coordinator sees; default the policy's site_name or the folder name
NODE_SETTINGS = "settings"  # the site's settings file; default <site folder>/site-settings.yaml when present
NODE_COORDINATOR = "coordinator"  # who the site believes it sends to, checked against allowed_recipients
NODE_PARTITION = "partition-id"  # simulation only


# What a site reports from an evaluation (with the confidence limits of each): case counts and the metrics.
EVAL_METRICS = ("n", "n_events", "n_positive", "c_index", "c_index_uno", "td_auc", "ibs", "auc", "auprc")
# ...and in a pretraining round: the objectives' losses on a fixed held-out batch, and the items evaluated.
PRETRAIN_EVAL_METRICS = ("n", "loss", "mlm", "mim", "clip", "aux_mlm")

# The two phases of a federation: rounds 1..federation.pretrain_rounds continue MUSK's pretraining (LoRA plus the
# pretraining heads travel), the federation.rounds after them train the outcome model (LoRA plus the outcome heads).
PRETRAIN, OUTCOME = "pretrain", "outcome"


def round_phase(cfg: FedMuskConfig, round: int) -> str:
    """The phase of ``round``, from the configuration alone (coordinator and sites derive it alike)."""
    return PRETRAIN if round <= cfg.federation.pretrain_rounds else OUTCOME


def phase_round(cfg: FedMuskConfig, round: int) -> int:
    """``round`` counted within its phase from 1 (RoLoRA alternates its factors by this count)."""
    return round if round_phase(cfg, round) == PRETRAIN else round - cfg.federation.pretrain_rounds


def round_roles(cfg: FedMuskConfig, round: int) -> frozenset[str]:
    """The tensor roles ("A", "B", "head") that leave a site in ``round`` under ``federation.strategy``."""
    return shared_roles(cfg.federation.strategy, phase_round(cfg, round))


def config_from_yaml(text: str) -> FedMuskConfig:
    """A configuration written by ``to_yaml`` (a checkpoint's, a run's), read as plain data against the schema.

    Raises ConfigError naming the key for unknown keys, bad values and interpolation."""
    return parse_config_data(text, f"run config '{RUN_CONFIG}'")


def config_from_run_config(run_config: Mapping[str, Any]) -> FedMuskConfig:
    """The FedMuskConfig a coordinator sent with a run (site-local keys at their defaults); ConfigError when the
    run config lacks it or it is not plain data (see ``fedmusk.site_settings.parse_coordinator_config``)."""
    if RUN_CONFIG not in run_config or not str(run_config[RUN_CONFIG]).strip():
        raise ConfigError(f"the run config has no '{RUN_CONFIG}' (the fedmusk configuration as YAML)")
    return parse_coordinator_config(str(run_config[RUN_CONFIG]), f"the coordinator's run config '{RUN_CONFIG}'")


def wire_run_config(cfg: FedMuskConfig) -> dict[str, str]:
    """What a coordinator (or a simulation) sends about ``cfg``: the configuration without site-local settings and
    the fingerprint of the base model every site must train. Raises ConfigError for an unreadable model file."""
    return {RUN_CONFIG: to_yaml(without_site_local(cfg)), RUN_BASE_MODEL: json.dumps(model_fingerprint(cfg))}


# --- what travels: adapter tensors as arrays in a fixed order ---------------------------------------------------


class AdapterLayout:
    """Tensor names and shapes in the order they travel as arrays (sorted names, as ``adapter_state`` gives them).

    Coordinator and sites build the same layout from the same configuration; ``fingerprint`` lets a site check that
    before it trains.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]]):
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names but {len(shapes)} shapes")
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> AdapterLayout:
        names = sorted(state)
        return cls(names, [tuple(state[n].shape) for n in names])

    @property
    def fingerprint(self) -> str:
        text = "\n".join(f"{n}:{list(s)}" for n, s in zip(self.names, self.shapes, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_arrays(self, state: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
        """float32 numpy arrays in layout order; ValueError names a missing tensor or a wrong shape."""
        arrays = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            if name not in state:
                raise ValueError(f"state lacks {name!r}")
            value = state[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"{name!r} has shape {tuple(value.shape)}, the layout says {shape}")
            arrays.append(value.detach().cpu().to(torch.float32).numpy().copy())
        return arrays

    def from_arrays(self, arrays: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> StateDict:
        """The state dict of arrays in layout order; ValueError when their number or shapes do not fit."""
        if len(arrays) != len(self.names):
            raise ValueError(f"got {len(arrays)} arrays for a layout of {len(self.names)} tensors")
        state = {}
        for name, shape, array in zip(self.names, self.shapes, arrays, strict=True):
            if tuple(array.shape) != shape:
                raise ValueError(f"array for {name!r} has shape {tuple(array.shape)}, the layout says {shape}")
            state[name] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
        return state

    def update_layout(self, strategy: str, secure: bool, round: int | None = None) -> AdapterLayout:
        """What a site sends in ``strategy`` (RoLoRA: in ``round`` of the phase): the shared tensors, then under
        SecAgg+ the one-value weight."""
        shared = shared_roles(strategy, round)
        pairs = [(n, s) for n, s in zip(self.names, self.shapes, strict=True) if tensor_role(n) in shared]
        if secure:
            pairs.append((SECURE_SUM_WEIGHT_KEY, (1,)))
        return AdapterLayout([n for n, _ in pairs], [s for _, s in pairs])


class FitReply(NamedTuple):
    """What a site returns from a round: the arrays in ``update_layout`` order, the example count Flower sees
    (1 under SecAgg+), and scrubbed scalar metrics."""

    arrays: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float | int | str]
