"""One training session: what a federated site runs each round, in the outcome phase and in the pretraining phase,
and what the centralized and local baselines run, through the same code.

The session sets up (seed, device, base model, tokenizer, the sites' data) and owns a trainer; the outside world
only moves adapter states in and out. Outcome training (``OutcomeTrainer``) and continued pretraining
(``PretrainTrainer``) both have the interface of ``Trainer``, so nothing above the session tells them apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from fedmusk.config import FedMuskConfig
from fedmusk.data.prepare.pipeline import TilingSettings
from fedmusk.runtime import load_model, load_tokenizer, model_precision, resolve_device, seed_everything
from fedmusk.training.cohort import CaseRecord, load_site_cases, split_cases
from fedmusk.training.features import EXCLUSION_REASONS, FeatureStore
from fedmusk.training.outcome import OutcomeTrainer
from fedmusk.training.pretrain import PretrainTrainer

StateDict = dict[str, torch.Tensor]
Proximal = Callable[[torch.nn.Module], torch.Tensor]
log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What a session trains: a model whose adapter state is all that is exchanged, and its training data.

    ``generator`` draws every random choice of training and ``optimizer`` holds the moments; a federated site
    reseeds the one and clears the other each round, so that a round is a function of its seed."""

    model: torch.nn.Module
    generator: torch.Generator
    optimizer: torch.optim.Optimizer

    @property
    def num_train_items(self) -> int:
        """The training examples (cases, or pretraining items): a site's weight in FedAvg."""
        ...

    def adapter_state(self) -> StateDict: ...

    def load_adapter_state(self, state: StateDict) -> None: ...

    def train_epoch(self, proximal: Proximal | None = None) -> dict[str, float]:
        """One epoch; ``proximal(model) -> Tensor`` adds a FedProx term. Mean losses and "cases", examples used."""
        ...

    def evaluate(self, split: str = "val") -> dict:
        """Metrics (outcome) or objective losses (pretraining) on ``split`` ("train", "val" or "test")."""
        ...


class TrainingSession:
    """Training on the data of ``site_roots`` (one hospital, or several pooled for a centralized baseline):
    outcome training on their cases, or with ``pretrain=True`` continued pretraining on their pretrain/ folders
    (``fedmusk.training.pretrain``; a site without one pretrains on its training cases).

    ``progress`` is called with a short, identifier-free message while slides are being prepared.

    Outcome training: a slide that cannot be read or yields no tissue tile is left out of its case; a case left
    without any usable slide is excluded from training and evaluation (``excluded`` lists them with the reason,
    ``exclusion_counts`` counts them by reason). ``warn`` receives one message per such slide (and pretraining's
    warnings about its cases); it names the case and the slide, so it is for the site's own console or log only
    (default: this module's logger). With ``train.fusion=report`` no slide is read and no case is excluded.
    ``splits`` holds the cases of each split (empty for pretraining, whose trainer splits its own items).
    """

    def __init__(
        self,
        cfg: FedMuskConfig,
        site_roots: Sequence[str | Path],
        device: str | torch.device | None = None,
        progress: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        pretrain: bool = False,
    ):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.site_roots = [Path(s) for s in site_roots]
        self.splits: dict[str, list[CaseRecord]] = {}
        self.excluded: list[tuple[CaseRecord, str]] = []
        self.trainer: Trainer
        if pretrain:
            base = load_model(cfg.model, self.device, cfg.seed)
            self.trainer = PretrainTrainer(cfg, base, load_tokenizer(cfg.model), self.site_roots, self.device, warn)
        else:
            self.trainer = self._outcome_trainer(progress, warn or log.warning)

    def _outcome_trainer(self, progress, warn) -> OutcomeTrainer:
        cfg = self.cfg
        cases: list[CaseRecord] = []
        for root in self.site_roots:
            cases += load_site_cases(root, cfg.seed, cfg.train.val_fraction, cfg.train.test_fraction)
        base = load_model(cfg.model, self.device, cfg.seed)
        features = None
        if cfg.train.fusion != "report":
            # cached: tile features of the frozen base model; end2end: the tile grid only (pixels are read live)
            embedder = base if cfg.train.features == "cached" else None
            features = FeatureStore(
                embedder, TilingSettings.from_config(cfg.data), cfg.model.ms_aug, cfg.data.batch_size, progress,
                precision=model_precision(cfg.model, self.device),
            )
            for case in cases:
                features.ensure(case.site_root, case.slides)
        cases, self.excluded = _drop_unusable(cases, features, warn)
        self.splits = split_cases(cases)
        return OutcomeTrainer(cfg, base, load_tokenizer(cfg.model), features, self.device, self.splits)

    @property
    def exclusion_counts(self) -> dict[str, int]:
        """Excluded cases by reason (``no_tissue``, ``unreadable``), every reason present (0 when none)."""
        return {reason: sum(r == reason for _, r in self.excluded) for reason in EXCLUSION_REASONS}

    @property
    def num_train_cases(self) -> int:
        """Training cases (outcome) or items (pretraining): the site's weight in FedAvg."""
        return self.trainer.num_train_items

    def adapter_state(self) -> StateDict:
        return self.trainer.adapter_state()

    def load_adapter_state(self, state: StateDict) -> None:
        self.trainer.load_adapter_state(state)

    def train(self, epochs: int = 1, proximal: Proximal | None = None) -> dict[str, float]:
        """``epochs`` epochs (outcome: passes over the training cases; pretraining: ``train.pretrain.steps`` steps
        each); returns the last epoch's mean losses and the examples seen."""
        metrics: dict[str, float] = {}
        for _ in range(epochs):
            metrics = self.trainer.train_epoch(proximal)
        return metrics

    def evaluate(self, split: str = "val") -> dict:
        """Metrics (outcome; IPCW weights from the training cases) or objective losses on the fixed held-out batch
        (pretraining) of ``split``."""
        return self.trainer.evaluate(split)


def _drop_unusable(cases: list[CaseRecord], features: FeatureStore | None, warn: Callable[[str], None]):
    """The cases with their usable slides only, and the excluded cases with their reason. A case whose slides are
    all unusable is excluded for the reason of its first slide."""
    if features is None:  # report-only fusion reads no slide
        return cases, []
    kept, excluded = [], []
    for case in cases:
        problems = {s: features.unusable(case.site_root, s) for s in case.slides}
        usable = [s for s in case.slides if problems[s] is None]
        for slide, problem in problems.items():
            if problem is not None:
                what = "the case is excluded" if not usable else "the slide is left out; the case keeps its others"
                warn(f"case {case.case_id}, slide {slide} ({case.site}): {problem[1]}; {what}")
        if usable:
            kept.append(case if len(usable) == len(case.slides) else replace(case, slides=usable))
        else:
            excluded.append((case, problems[case.slides[0]][0]))
    return kept, excluded
