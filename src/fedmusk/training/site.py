"""One site's (or a pooled set of sites') training session: what a federated client runs each round and what the
centralized and local baselines run, through the same code.

The session owns the model, the data and the optimizer; the outside world only moves adapter states in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedmusk.config import FedMuskConfig
from fedmusk.data.prepare import TilingSettings
from fedmusk.runtime import load_model, load_tokenizer, model_precision, resolve_device, seed_everything
from fedmusk.training.cohort import CaseRecord, load_site_cases, split_cases
from fedmusk.training.features import FeatureStore
from fedmusk.training.outcome import OutcomeTrainer

StateDict = dict[str, torch.Tensor]


class SiteSession:
    """Outcome training on the cases of ``site_roots`` (one hospital, or several pooled for a centralized baseline).

    ``progress`` is called with a short, identifier-free message while slides are being prepared.
    """

    def __init__(
        self,
        cfg: FedMuskConfig,
        site_roots: Sequence[str | Path],
        device: str | torch.device | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.site_roots = [Path(s) for s in site_roots]
        cases: list[CaseRecord] = []
        for root in self.site_roots:
            cases += load_site_cases(root, cfg.seed, cfg.train.val_fraction, cfg.train.test_fraction)
        self.splits = split_cases(cases)
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
        self.trainer = OutcomeTrainer(cfg, base, load_tokenizer(cfg.model), features, self.device)

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
