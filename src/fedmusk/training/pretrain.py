"""Continued domain pretraining of MUSK with its own objectives, on a site's ``pretrain/`` folder, through LoRA.

Each optimiser step takes one batch per enabled objective and minimises their weighted sum:

- MLM (stage 1 of the paper): whole-word masking of unpaired text, cross-entropy through a head tied to the frozen
  text embedding (only its bias trains);
- MIM (stage 1): block-wise masking of unpaired tiles, masked patches replaced by the mask token; the targets are
  the frozen base model's patch features (LoRA disabled), or the codes of a visual tokenizer if one is given;
- CLIP (stage 2): symmetric contrastive loss on image-caption pairs, plus the auxiliary MLM of masked captions
  through a cross-attention decoder over the image's tokens, at ``aux_mlm_weight``.

The paper runs the stages one after the other over the whole corpus; here they run side by side in every step, so
that a federated round of a few steps moves the adapter on all of a site's data, and a site without pairs (or text,
or tiles) still contributes what it has. The prediction heads are task heads of the adapter, so they are averaged
with the LoRA tensors; which heads exist follows from the configuration only (never from a site's data), so every
site exchanges the same tensor names.

``PretrainTrainer`` has the outcome trainer's interface (``fedmusk.training.session.Trainer``), so the same
``TrainingSession`` runs pretraining rounds and outcome rounds. ``carry_lora`` moves the LoRA tensors of a
pretraining adapter into an outcome adapter (the heads differ between the phases).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmusk.config import ConfigError, FedMuskConfig
from fedmusk.data.errors import SiteDataError
from fedmusk.musk_model.lora import AdapterStateError, adapter_state, apply_lora, load_adapter_state, task_heads
from fedmusk.musk_model.losses import (
    VISUAL_TOKENIZER_CODES,
    CrossAttentionDecoder,
    MimHead,
    MlmHead,
    clip_loss,
    masked_logits,
    mim_loss,
    mlm_loss,
    teacher_patch_features,
)
from fedmusk.musk_model.masking import block_mask, whole_word_mask
from fedmusk.musk_model.roles import is_lora
from fedmusk.musk_model.transforms import musk_transform
from fedmusk.precision import BFLOAT16, resolve_precision
from fedmusk.runtime import seed_everything
from fedmusk.training import augment
from fedmusk.training.outcome import lora_settings
from fedmusk.training.pretrain_data import PRETRAIN_DIR, PretrainData, PretrainImage, read_pretrain_folder

StateDict = dict[str, Tensor]
OBJECTIVES = ("mlm", "mim", "clip")
EVAL_SPLITS = ("train", "val", "test")
# Held-out shares of pretraining items. Smaller than the outcome splits (train.val_fraction, train.test_fraction):
# unlabelled data is plentiful, and a loss on a few dozen held-out items is enough to watch for overfitting.
VAL_FRACTION, TEST_FRACTION = 0.05, 0.05


def site_pretrain_data(site_root: str | Path, cfg: FedMuskConfig, max_words: int, warn=None) -> PretrainData:
    """A site's pretraining data: its ``pretrain/`` folder when it has one, else the tiles, reports and slide-report
    pairs of its training cases (``fedmusk.training.pretrain_cases``)."""
    if (Path(site_root) / PRETRAIN_DIR).is_dir():
        return read_pretrain_folder(site_root, max_words=max_words)
    from fedmusk.training.pretrain_cases import case_pretrain_data

    return case_pretrain_data(site_root, cfg, max_words, warn)


# -- moving LoRA between phases ----------------------------------------------------------------------------------------


def lora_only(state: StateDict) -> StateDict:
    """The LoRA tensors of an adapter state (``...lora_A.weight``, ``...lora_B.weight``), without task heads."""
    return {n: t for n, t in state.items() if is_lora(n)}


def carry_lora(pretrained: StateDict, target: StateDict) -> StateDict:
    """``target`` (e.g. an outcome trainer's ``adapter_state()``) with its LoRA tensors taken from ``pretrained``
    (a pretraining adapter); target's own heads are kept. Load the result with ``load_adapter_state``.

    Both phases name LoRA tensors identically when they share the LoRA settings. Pretrained LoRA the target does
    not hold is left behind: the outcome model trains only the experts that can learn there (e.g. not the vision
    expert on cached features, ``learnable_experts``). AdapterStateError names the tensors that differ otherwise
    (target LoRA the pretraining lacks, other rank or targets).
    """
    source, wanted = lora_only(pretrained), lora_only(target)
    missing = sorted(set(wanted) - set(source))
    shapes = [n for n in sorted(set(source) & set(wanted)) if source[n].shape != wanted[n].shape]
    if missing or shapes:
        raise AdapterStateError(
            f"the pretraining adapter's LoRA does not fit: missing {missing}, other shapes {shapes} "
            "(same train.lora settings?)"
        )
    return {**target, **{n: source[n] for n in wanted}}


# -- what the configuration alone decides: objectives and heads -------------------------------------------------------


def enabled_objectives(cfg: FedMuskConfig) -> list[str]:
    """The objectives with weight > 0, in OBJECTIVES order (``fedmusk.config.check_config`` refuses negative
    weights and a pretraining configuration without any)."""
    p = cfg.train.pretrain
    weights = {"mlm": p.mlm_weight, "mim": p.mim_weight, "clip": p.clip_weight}
    return [o for o in OBJECTIVES if weights[o] > 0]


def pretrain_heads(cfg: FedMuskConfig, base_model, visual_tokenizer=None) -> dict[str, torch.nn.Module]:
    """The prediction heads of the enabled objectives, seeded with ``cfg.seed`` so that they start identical at
    every site (and at a coordinator, which builds them from the configuration alone to lay out the adapter)."""
    p, mc = cfg.train.pretrain, base_model.config
    enabled = enabled_objectives(cfg)
    torch.manual_seed(cfg.seed)
    heads: dict[str, torch.nn.Module] = {}
    if "mlm" in enabled:
        heads["mlm"] = MlmHead(mc.embed_dim, mc.vocab_size, tie_to=base_model.beit3.text_embed)
    if "mim" in enabled:
        codes = None
        if visual_tokenizer is not None:
            codes = int(getattr(visual_tokenizer, "n_codes", VISUAL_TOKENIZER_CODES))
        heads["mim"] = MimHead(mc.embed_dim, codes)
    if "clip" in enabled and p.aux_mlm_weight > 0:
        heads["aux_decoder"] = CrossAttentionDecoder(mc.embed_dim, mc.num_heads, layers=1)
        heads["aux_mlm"] = MlmHead(mc.embed_dim, mc.vocab_size, tie_to=base_model.beit3.text_embed)
    return heads


# -- the visual tokenizer ----------------------------------------------------------------------------------------------


def load_visual_tokenizer(path: str | None, device) -> torch.nn.Module:
    """A visual tokenizer for ``mim_target=codes``: a module that maps MUSK-normalised images (b, 3, img_size,
    img_size) to integer codes (b, patches), saved with ``torch.export.save`` (.pt2, batch dimension dynamic) or as
    TorchScript (``torch.jit.save``). Its ``n_codes`` attribute, when present, is the codebook size (default 8192,
    as MUSK's). Raises ConfigError when none is configured or the file loads as neither.

    MUSK's own tokenizer (VQ-KD distilled from a pathology teacher) was not released; a consortium exports the
    tokenizer it agrees on so that every site loads the same one.
    """
    if not path:
        raise ConfigError(
            "train.pretrain.mim_target=codes needs a visual tokenizer: set train.pretrain.visual_tokenizer to an "
            "exported (.pt2) or TorchScript checkpoint, or use mim_target=teacher"
        )
    if not Path(path).is_file():
        raise ConfigError(f"train.pretrain.visual_tokenizer: no such file: {path}")
    errors = []
    try:
        return torch.export.load(str(path)).module().to(device)
    except Exception as err:  # noqa: BLE001 - not an exported program; try TorchScript
        errors.append(f"torch.export: {_first_line(err)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # noqa: BLE001
        errors.append(f"TorchScript: {_first_line(err)}")
    raise ConfigError(f"train.pretrain.visual_tokenizer: {path} cannot be loaded ({'; '.join(errors)})")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# -- the trainer -------------------------------------------------------------------------------------------------------


class _Batches:
    """Endless shuffled passes over ``n`` items: each call gives the next ``size`` indices (reshuffled per pass)."""

    def __init__(self, n: int, size: int, generator: torch.Generator):
        self.n, self.size, self.generator = n, max(1, min(size, n)), generator
        self.order: list[int] = []

    def restart(self) -> None:
        self.order = []

    def next(self) -> list[int]:
        if len(self.order) < self.size:
            self.order += torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.order = self.order[: self.size], self.order[self.size :]
        return batch


class PretrainTrainer:
    """Continued pretraining of one MUSK (``base_model``, consumed: wrapped by peft) on the pretrain/ folders of
    ``site_roots``; a session's ``Trainer`` as ``OutcomeTrainer`` is (``fedmusk.training.session``).

    A site without a ``pretrain/`` folder pretrains on its own training cases instead (``site_pretrain_data``).
    Items are split into train/val/test as cases are (``assign_split`` by file name or text, 5% val, 5% test);
    training uses the train items. Raises ConfigError for a bad objective setup and SiteDataError when
    the folders cannot be read or hold nothing for any enabled objective.
    """

    def __init__(
        self, cfg: FedMuskConfig, base_model, tokenizer, site_roots: Sequence[str | Path], device, warn=None
    ):
        p = cfg.train.pretrain
        self.enabled = enabled_objectives(cfg)
        self.weights = {"mlm": p.mlm_weight, "mim": p.mim_weight, "clip": p.clip_weight}
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, torch.device(device)
        self.max_len = cfg.model.max_text_len
        self.data = PretrainData()
        for root in site_roots:
            self.data = self.data + site_pretrain_data(root, cfg, max_words=max(8, self.max_len // 2), warn=warn)
        self.train_data = self._split("train")
        if not any(self._items(self.train_data, o) for o in self.enabled):
            raise SiteDataError(
                f"no pretraining data for the enabled objectives ({', '.join(self.enabled)}): neither a pretrain/ "
                "folder nor training cases with tissue tiles or reports; this site sits the pretraining rounds out"
            )

        mc = base_model.config
        self.img_size, self.grid = mc.img_size, mc.grid_size
        self.visual_tokenizer = None
        if "mim" in self.enabled and p.mim_target == "codes":
            self.visual_tokenizer = load_visual_tokenizer(p.visual_tokenizer, self.device)
            self.n_codes = int(getattr(self.visual_tokenizer, "n_codes", VISUAL_TOKENIZER_CODES))
        self.use_aux = "clip" in self.enabled and p.aux_mlm_weight > 0
        heads = pretrain_heads(cfg, base_model, self.visual_tokenizer)
        self.model = apply_lora(base_model, lora_settings(cfg), extra_trainable=heads)
        self.model.to(self.device)
        self.net = self.model.get_base_model()  # the MuskModel with LoRA inside; self.model for peft's switches
        self.net.set_activation_checkpointing(True)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=cfg.train.weight_decay)
        self.to_tensor = musk_transform(self.img_size)
        self.tile_augment = augment.masked_modelling(self.img_size, stain=p.stain_augmentation)
        self.pair_augment = augment.alignment(self.img_size, stain=p.stain_augmentation)
        # every draw of training (batches, masks, augmentation) comes from this one generator, so reseeding it
        # (as a federated site does each round) makes the round reproducible
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches = {
            o: _Batches(len(self._items(self.train_data, o)), p.batch_size, self.generator)
            for o in self.enabled
            if self._items(self.train_data, o)
        }
        # bf16 where the hardware has it (model.precision=auto), as the paper trains on GPUs
        self.autocast = resolve_precision(cfg.model.precision, self.device) == BFLOAT16
        self.steps_done = 0

    # -- the exchanged state -----------------------------------------------------------------------------------------

    def adapter_state(self) -> StateDict:
        return adapter_state(self.model)

    def load_adapter_state(self, state: StateDict) -> None:
        load_adapter_state(self.model, state)

    @property
    def num_train_items(self) -> int:
        """Training items of the enabled objectives (tiles + text segments + pairs): a site's weight in FedAvg."""
        return sum(len(self._items(self.train_data, o)) for o in self.enabled)

    # -- data --------------------------------------------------------------------------------------------------------

    def _split(self, name: str) -> PretrainData:
        return self.data.split(name, self.cfg.seed, VAL_FRACTION, TEST_FRACTION)

    @staticmethod
    def _items(data: PretrainData, objective: str) -> list:
        return {"mlm": data.texts, "mim": data.images, "clip": data.pairs}[objective]

    def _pixels(self, images: list[PretrainImage], recipe: augment.Augmentation | None) -> Tensor:
        """Tiles -> (b, 3, img_size, img_size) normalised; augmented by ``recipe`` (training) or resized and
        centre-cropped as MUSK's inference preprocessing (evaluation)."""
        out = []
        for image in images:
            rgb = image.read()
            out.append(self.to_tensor(recipe(rgb, self.generator) if recipe is not None else rgb))
        return torch.stack(out).to(self.device)

    def _text(self, texts: list[str], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids, padding, masked ids, labels) for a batch of texts, whole-word masked."""
        ids, pad, starts = self.tokenizer.encode_batch_with_word_starts(texts, max_len=self.max_len)
        masked, labels = whole_word_mask(
            ids, starts, mask_token_id=self.tokenizer.mask_token_id, vocab_size=self.tokenizer.vocab_size,
            generator=generator, mask_prob=self.cfg.train.pretrain.mlm_probability,
        )  # fmt: skip
        return ids.to(self.device), pad.to(self.device), masked.to(self.device), labels.to(self.device)

    # -- objectives --------------------------------------------------------------------------------------------------

    def _mlm(self, texts: list[str], generator: torch.Generator) -> Tensor:
        _, pad, masked, labels = self._text(texts, generator)
        hidden = self.net.encode(text=masked, padding_mask=pad)
        return mlm_loss(*masked_logits(task_heads(self.model)["mlm"], hidden, labels))

    def _mim(self, pixels: Tensor, generator: torch.Generator) -> Tensor:
        mask = block_mask(
            pixels.shape[0], self.grid, generator=generator, mask_ratio=self.cfg.train.pretrain.mask_ratio
        ).to(self.device)
        if self.visual_tokenizer is not None:
            with torch.no_grad():
                target = self.visual_tokenizer(pixels).long()
            if tuple(target.shape) != tuple(mask.shape):
                raise ConfigError(
                    f"the visual tokenizer gave codes of shape {tuple(target.shape)}, expected {tuple(mask.shape)} "
                    "(one code per patch)"
                )
            if target.min() < 0 or target.max() >= self.n_codes:
                raise ConfigError(f"the visual tokenizer gave codes outside [0, {self.n_codes})")
        else:
            target = teacher_patch_features(self.model, pixels)
        hidden = self.net.encode(image=pixels, image_mask=mask)[:, 1:]  # patch states, CLS dropped
        return mim_loss(task_heads(self.model)["mim"](hidden), target, mask)

    def _clip(self, pixels: Tensor, captions: list[str], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(contrastive loss, unweighted auxiliary MLM loss; zero without the decoder)."""
        ids, pad, masked, labels = self._text(captions, generator)
        image_hidden = self.net.encode(image=pixels)
        text_hidden = self.net.encode(text=ids, padding_mask=pad)
        loss = clip_loss(
            self.net.vision_head(image_hidden[:, 0]), self.net.language_head(text_hidden[:, 0]), self.net.logit_scale
        )
        if not self.use_aux:
            return loss, loss.new_zeros(())
        heads = task_heads(self.model)
        masked_hidden = self.net.encode(text=masked, padding_mask=pad)
        decoded = heads["aux_decoder"](masked_hidden, image_hidden)
        return loss, mlm_loss(*masked_logits(heads["aux_mlm"], decoded, labels))

    def _losses(self, data: PretrainData, pick, generator: torch.Generator, train: bool) -> tuple[dict, int]:
        """Loss tensors of every enabled objective that has data (keys mlm, mim, clip, aux_mlm) and the number of
        items used; ``pick(objective, n_items)`` chooses the indices of the batch."""
        losses: dict[str, Tensor] = {}
        used = 0
        for objective in self.enabled:
            items = self._items(data, objective)
            if not items:
                continue
            batch = [items[i] for i in pick(objective, len(items))]
            used += len(batch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                if objective == "mlm":
                    losses["mlm"] = self._mlm(batch, generator)
                elif objective == "mim":
                    pixels = self._pixels(batch, self.tile_augment if train else None)
                    losses["mim"] = self._mim(pixels, generator)
                else:
                    pixels = self._pixels([b.image for b in batch], self.pair_augment if train else None)
                    losses["clip"], losses["aux_mlm"] = self._clip(pixels, [b.caption for b in batch], generator)
        return losses, used

    def _total(self, losses: dict[str, Tensor]) -> Tensor:
        p = self.cfg.train.pretrain
        total = sum(self.weights[o] * losses[o] for o in self.enabled if o in losses)
        if "aux_mlm" in losses:
            total = total + self.weights["clip"] * p.aux_mlm_weight * losses["aux_mlm"]
        return total

    # -- training ----------------------------------------------------------------------------------------------------

    def train_epoch(self, proximal=None) -> dict[str, float]:
        """``train.pretrain.steps`` optimiser steps, each on one batch of every enabled objective that has data.
        ``proximal(model) -> Tensor`` adds a FedProx term.

        Returns mean losses over the steps: "loss" (the weighted sum), "mlm", "mim", "clip", "aux_mlm" (NaN for an
        objective without data here) and "cases", the number of examples used (an item counts each time it is used).
        """
        self.model.train()
        for batches in self.batches.values():
            batches.restart()
        sums: dict[str, list[float]] = {k: [] for k in ("loss", *OBJECTIVES, "aux_mlm")}
        seen = 0
        for _ in range(self.cfg.train.pretrain.steps):
            losses, used = self._losses(self.train_data, lambda o, n: self.batches[o].next(), self.generator, True)
            loss = self._total(losses)
            if proximal is not None:
                loss = loss + proximal(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.steps_done += 1
            seen += used
            sums["loss"].append(float(loss.detach()))
            for name, value in losses.items():
                sums[name].append(float(value.detach()))
        return {**{k: float(np.mean(v)) if v else float("nan") for k, v in sums.items()}, "cases": seen}

    # -- evaluation --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str | None = None) -> dict[str, float]:
        """Objective losses on a fixed batch of ``split`` (default "val"): its first ``batch_size`` items of each
        objective, no augmentation, masks drawn from a generator seeded with ``cfg.seed``, so two calls on the same
        adapter give the same numbers. Keys as ``train_epoch`` (NaN where the split has no data for an objective)
        plus "n", the number of items evaluated."""
        split = split or "val"
        if split not in EVAL_SPLITS:
            raise ValueError(f"split={split!r}: choose one of {list(EVAL_SPLITS)}")
        self.model.eval()
        size = self.cfg.train.pretrain.batch_size
        generator = torch.Generator().manual_seed(self.cfg.seed)
        losses, used = self._losses(self._split(split), lambda o, n: range(min(size, n)), generator, False)
        out = {k: float(losses[k]) if k in losses else float("nan") for k in (*OBJECTIVES, "aux_mlm")}
        out["loss"] = float(self._total(losses)) if losses else float("nan")
        return {**out, "n": used}
