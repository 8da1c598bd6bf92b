"""Outcome prediction from slides and reports: MUSK with LoRA, gated-attention MIL over tiles, fusion with the
report's language features, and a survival or response head. The same ``OutcomeTrainer`` runs inside a federated
round, a pooled (centralized) baseline and a single-site baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from fedmusk.config import FedMuskConfig, learnable_experts
from fedmusk.data.prepare.pipeline import TilingSettings
from fedmusk.evaluation.binary import response_metrics
from fedmusk.evaluation.survival import survival_metrics
from fedmusk.musk_model.heads import (
    CaseFusion,
    ResponseHead,
    SurvivalHead,
    bins_to_risk,
    discretize_times,
    pad_bags,
    survival_curve,
)
from fedmusk.musk_model.lora import LoraSettings, adapter_state, apply_lora, load_adapter_state, task_heads
from fedmusk.musk_model.losses import binary_response_loss, cox_partial_likelihood, discrete_time_nll
from fedmusk.musk_model.roles import EXPERTS
from fedmusk.precision import FLOAT32, autocast, resolve_precision
from fedmusk.training.cohort import CaseRecord
from fedmusk.training.features import FeatureStore, TileReader

OUTCOME_TASKS = ("survival", "response")
log = logging.getLogger(__name__)
_SAID: set[str] = set()  # what has been logged once in this process


@dataclass
class Predictions:
    """Per-case model outputs of one evaluation, aligned with ``cases``."""

    cases: list[CaseRecord]
    risk: np.ndarray  # survival: higher = earlier event; response: logit of response
    survival: np.ndarray | None  # (n, len(eval_times)) S(t) for the Brier score, discrete-time model only
    eval_times: np.ndarray | None

    @property
    def time(self) -> np.ndarray:
        return np.array([c.time for c in self.cases], dtype=float)

    @property
    def event(self) -> np.ndarray:
        return np.array([c.event for c in self.cases], dtype=int)

    @property
    def response(self) -> np.ndarray:
        return np.array([c.response for c in self.cases], dtype=int)


def lora_settings(cfg: FedMuskConfig, experts: tuple[str, ...] | None = None) -> LoraSettings:
    """The configured LoRA (``train.lora``); ``experts`` replaces the configured experts when given."""
    lc = cfg.train.lora
    return LoraSettings(
        rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
        experts=tuple(lc.experts) if experts is None else experts, ffa=lc.ffa, seed=cfg.seed,
    )  # fmt: skip


def outcome_lora_settings(cfg: FedMuskConfig) -> LoraSettings:
    """The outcome model's LoRA: the configured settings on the experts that can learn (``learnable_experts``;
    ``fedmusk.config.check_config`` refuses a configuration where none can); the others are neither trained nor
    exchanged, and the log says so once."""
    experts, dropped = learnable_experts(cfg)
    for expert, reason in dropped.items():
        message = (
            f"LoRA on the {EXPERTS[expert]} expert ({expert}) is neither trained nor exchanged: {reason}"
        )
        if message not in _SAID:
            _SAID.add(message)
            log.warning(message)
    return lora_settings(cfg, experts)


def time_edges(cfg: FedMuskConfig) -> torch.Tensor:
    """The discrete-time survival bins' edges: 0, the configured ``train.time_bins``, infinity."""
    return torch.tensor([0.0, *sorted(cfg.train.time_bins), float("inf")])


def outcome_model(cfg: FedMuskConfig, base_model):
    """``base_model`` (consumed) with the outcome model's LoRA, fusion and outcome head: what ``OutcomeTrainer``
    trains, and what a coordinator builds from the configuration alone to lay out the global adapter.

    ValueError for a task that is not an outcome task (pretraining has its own heads)."""
    t = cfg.train
    if t.task not in OUTCOME_TASKS:
        raise ValueError(f"train.task={t.task!r} is not an outcome task; choose one of {list(OUTCOME_TASKS)}")
    embed_dim = base_model.config.embed_dim
    tile_dim = embed_dim * (2 if cfg.model.ms_aug else 1)  # raw CLS, or 1x + 2x scales
    fusion = CaseFusion(tile_dim, embed_dim, dim=t.hidden_dim, mode=t.fusion, dropout=t.dropout)
    if t.task == "survival" and t.survival_loss == "nll":
        head = SurvivalHead(fusion.out_dim, n_bins=len(time_edges(cfg)) - 1)
    else:  # cox: one risk score per case; response: one logit
        head = ResponseHead(fusion.out_dim)
    torch.manual_seed(cfg.seed)  # heads start identical at every site
    return apply_lora(base_model, outcome_lora_settings(cfg), extra_trainable={"fusion": fusion, "outcome": head})


class OutcomeTrainer:
    """Trains and evaluates one outcome model on a list of cases (one site's, or several sites' pooled).

    The trainable state is exactly ``adapter_state()``: LoRA tensors of the configured experts plus the fusion and
    outcome heads. ``base_model`` is consumed (wrapped by peft). ``train_epoch`` and ``evaluate`` work on ``splits``,
    the cases by split ("train", "val", "test"; the training session's), ``predict`` on any cases.
    """

    def __init__(
        self, cfg: FedMuskConfig, base_model, tokenizer, features: FeatureStore | None, device,
        splits: Mapping[str, list[CaseRecord]] = MappingProxyType({}),
    ):  # fmt: skip
        t = cfg.train
        self.splits = splits
        self.cfg, self.tokenizer, self.features, self.device = cfg, tokenizer, features, torch.device(device)
        self.model = outcome_model(cfg, base_model)
        self.edges = time_edges(cfg)
        self.model.to(self.device)
        # MUSK's forward in training runs at model.precision; evaluation stays float32
        self.precision = resolve_precision(cfg.model.precision, self.device)
        if t.features == "end2end":
            self.model.base_model.model.set_activation_checkpointing(True)
            self.tiles = TileReader(base_model.config.img_size, TilingSettings.from_config(cfg.data))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_done = 0

    # -- the exchanged state -----------------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state)

    @property
    def num_train_items(self) -> int:
        """The training cases this task learns from: a site's weight in FedAvg."""
        return len(self.usable_cases(self.splits["train"]))

    # -- inputs ------------------------------------------------------------------------------------------------------

    def usable_cases(self, cases: list[CaseRecord]) -> list[CaseRecord]:
        """The cases this task learns from: all for survival, those with a response label for response."""
        if self.cfg.train.task == "response":
            return [c for c in cases if c.response is not None]
        return list(cases)

    def _bag(self, case: CaseRecord, train: bool) -> torch.Tensor:
        """All tile features of a case (its slides together); in training a random bag of bag_size per slide."""
        k = self.cfg.train.bag_size if train else self.cfg.data.max_tiles_per_slide
        parts = []
        for slide in case.slides:
            if self.cfg.train.features == "cached":
                feats = self.features.get(case.site_root, slide)
                if train and feats.shape[0] > k:
                    feats = feats[torch.randperm(feats.shape[0], generator=self.generator)[:k]]
                parts.append(feats.to(self.device))
            else:
                n = len(self.tiles.coords(case.site_root, slide))
                order = torch.randperm(n, generator=self.generator) if train else torch.arange(n)
                pixels = self.tiles.pixels(case.site_root, slide, order[:k].tolist()).to(self.device)
                with self._autocast(train):
                    feats, _ = self.model(image=pixels, with_head=False, out_norm=False, ms_aug=self.cfg.model.ms_aug)
                parts.append(feats.float())
        return torch.cat(parts)

    def _forward(self, cases: list[CaseRecord], train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads = task_heads(self.model)
        tiles = padding = report = None
        if self.cfg.train.fusion != "report":
            tiles, padding = pad_bags([self._bag(c, train) for c in cases])
        if self.cfg.train.fusion != "image":
            ids, pad = self.tokenizer.encode_batch([c.report for c in cases], max_len=self.cfg.model.max_text_len)
            with self._autocast(train):
                _, report = self.model(
                    text=ids.to(self.device), padding_mask=pad.to(self.device), with_head=False, out_norm=False
                )
            report = report.float()
        embedding, attention = heads["fusion"](tiles, padding, report)
        return heads["outcome"](embedding), attention

    def _autocast(self, train: bool):
        return autocast(self.device, self.precision if train else FLOAT32)

    def _loss(self, logits: torch.Tensor, cases: list[CaseRecord]) -> torch.Tensor:
        t = self.cfg.train
        if t.task == "response":
            target = torch.tensor([c.response for c in cases], dtype=torch.float32, device=logits.device)
            return binary_response_loss(logits, target)
        time = torch.tensor([c.time for c in cases], dtype=torch.float32)
        event = torch.tensor([c.event for c in cases], dtype=torch.float32)
        if t.survival_loss == "cox":
            return cox_partial_likelihood(logits, time.to(logits.device), event.to(logits.device))
        bins, _ = discretize_times(time, event, edges=self.edges)
        return discrete_time_nll(logits, bins.to(logits.device), event.to(logits.device))

    # -- training ----------------------------------------------------------------------------------------------------

    def train_epoch(self, proximal=None) -> dict[str, float]:
        """One pass over the training cases in shuffled mini-batches. ``proximal(model) -> Tensor`` adds a FedProx
        term.

        Returns the mean loss and the number of cases seen."""
        cases = self.usable_cases(self.splits["train"])
        self.model.train()
        order = torch.randperm(len(cases), generator=self.generator).tolist()
        losses, seen = [], 0
        size = self.cfg.train.batch_cases
        for start in range(0, len(order), size):
            batch = [cases[i] for i in order[start : start + size]]
            logits, _ = self._forward(batch, train=True)
            loss = self._loss(logits, batch)
            if proximal is not None:
                loss = loss + proximal(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], self.cfg.train.grad_clip
                )
            self.optimizer.step()
            self.steps_done += 1
            losses.append(float(loss.detach()))
            seen += len(batch)
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "cases": seen}

    # -- evaluation --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, cases: list[CaseRecord], labelled_only: bool = True) -> Predictions:
        """Outputs for ``cases`` (by default only those this task has labels for; ``labelled_only=False`` scores
        every case, e.g. new cases without outcomes)."""
        if labelled_only:
            cases = self.usable_cases(cases)
        t = self.cfg.train
        if not cases:  # no cases in this split (a site without test cases, say): empty, not an error
            nll = t.task == "survival" and t.survival_loss == "nll"
            times = np.array(sorted(t.time_bins), dtype=np.float32) if nll else None
            return Predictions([], np.zeros(0), np.zeros((0, len(t.time_bins))) if nll else None, times)
        self.model.eval()
        risks, logits_all = [], []
        size = self.cfg.train.batch_cases
        for start in range(0, len(cases), size):
            logits, _ = self._forward(cases[start : start + size], train=False)
            logits_all.append(logits.float().cpu())
        logits = torch.cat(logits_all)
        survival = eval_times = None
        if t.task == "survival" and t.survival_loss == "nll":
            risks = bins_to_risk(logits)
            eval_times = torch.tensor(sorted(t.time_bins), dtype=torch.float32)
            survival = survival_curve(logits, eval_times, self.edges).numpy()
            eval_times = eval_times.numpy()
        else:
            risks = logits
        return Predictions(cases, risks.numpy().astype(float), survival, eval_times)

    def evaluate(self, split: str = "val") -> dict:
        """Metrics of this model on the cases of ``split``: C-index (Harrell, Uno), time-dependent AUC and integrated
        Brier score for survival (IPCW weights from the training cases); AUROC/AUPRC for response; bootstrap
        confidence intervals. ``auc`` is null for survival and ``c_index`` null for response."""
        return metrics_for(self.predict(self.splits[split]), self.cfg, self.splits["train"])


def metrics_for(pred: Predictions, cfg: FedMuskConfig, train_cases: list[CaseRecord] | None = None) -> dict:
    t = cfg.train
    n_boot, seed = t.bootstrap, cfg.seed
    if t.task == "response":
        m = response_metrics(pred.response, pred.risk, n_boot=n_boot, seed=seed) if pred.cases else {}
        return {"c_index": None, "auc": m.get("auc"), "n": len(pred.cases), **m}
    if not pred.cases:
        return {"c_index": None, "auc": None, "n": 0}
    train_time = train_event = None
    if train_cases:
        train_time = np.array([c.time for c in train_cases])
        train_event = np.array([c.event for c in train_cases])
    inside = _times_inside_followup(pred.eval_times, pred.time, train_time)
    # The integrated Brier score needs survival curves at two or more times inside the follow-up.
    brier = pred.survival is not None and inside.sum() >= 2
    m = survival_metrics(
        pred.time, pred.event, pred.risk,
        survival_prob=pred.survival[:, inside] if brier else None,
        times=pred.eval_times[inside] if inside.any() else None,
        train_time=train_time, train_event=train_event, n_boot=n_boot, seed=seed,
    )
    return {**m, "auc": None}


def _times_inside_followup(times, test_time, train_time) -> np.ndarray:
    """IPCW metrics are defined only at times before the last follow-up of both test and training data."""
    if times is None:
        return np.zeros(0, dtype=bool)
    limit = test_time.max() if train_time is None else min(test_time.max(), train_time.max())
    return np.asarray(times) < limit
