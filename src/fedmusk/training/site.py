"""One site's (or a pooled set of sites') training session: what a federated client runs each round and what the
centralized and local baselines run, through the same code.

The session owns the model, the data and the optimizer; the outside world only moves adapter states in and out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fedmusk.config import FedMuskConfig
from fedmusk.data.prepare.pipeline import TilingSettings
from fedmusk.runtime import load_model, load_tokenizer, model_precision, resolve_device, seed_everything
from fedmusk.training.cohort import CaseRecord, load_site_cases, split_cases
from fedmusk.training.features import EXCLUSION_REASONS, FeatureStore
from fedmusk.training.outcome import OutcomeTrainer

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


class SiteSession:
    """Outcome training on the cases of ``site_roots`` (one hospital, or several pooled for a centralized baseline).

    ``progress`` is called with a short, identifier-free message while slides are being prepared.

    A slide that cannot be read or yields no tissue tile is left out of its case; a case left without any usable
    slide is excluded from training and evaluation (``excluded`` lists them with the reason, ``exclusion_counts``
    counts them by reason). ``warn`` receives one message per such slide; it names the case and the slide, so it
    is for the site's own console or log only (default: this module's logger). With ``train.fusion=report`` no
    slide is read and no case is excluded.
    """

    def __init__(
        self,
        cfg: FedMuskConfig,
        site_roots: Sequence[str | Path],
        device: str | torch.device | None = None,
        progress: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.site_roots = [Path(s) for s in site_roots]
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
        cases, self.excluded = _drop_unusable(cases, features, warn or log.warning)
        self.splits = split_cases(cases)
        self.trainer = OutcomeTrainer(cfg, base, load_tokenizer(cfg.model), features, self.device)

    @property
    def exclusion_counts(self) -> dict[str, int]:
        """Excluded cases by reason (``no_tissue``, ``unreadable``), every reason present (0 when none)."""
        return {reason: sum(r == reason for _, r in self.excluded) for reason in EXCLUSION_REASONS}

    @property
    def num_train_cases(self) -> int:
        return len(self.trainer.usable_cases(self.splits["train"]))

    def adapter_state(self) -> StateDict:
        return self.trainer.adapter_state()

    def load_adapter_state(self, state: StateDict) -> None:
        self.trainer.load_adapter_state(state)

    def train(self, epochs: int = 1, proximal=None) -> dict[str, float]:
        """``epochs`` passes over the training cases; returns the last epoch's mean loss and the cases seen."""
        metrics: dict[str, float] = {}
        for _ in range(epochs):
            metrics = self.trainer.train_epoch(self.splits["train"], proximal)
        return metrics

    def evaluate(self, split: str = "val") -> dict:
        """Metrics on ``split`` (IPCW weights from this session's training cases)."""
        return self.trainer.evaluate(self.splits[split], self.splits["train"])


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
