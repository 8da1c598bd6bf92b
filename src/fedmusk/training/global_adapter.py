"""The global adapter a coordinator holds, built from the configuration alone (a coordinator has no site data).

A federation starts each phase from an adapter every site can rebuild: LoRA A factors are seeded by layer name and
B starts at zero, so they equal the sites' own; the heads are whatever a build seeded with ``cfg.seed`` gives, and
the phase's first round sends them to every site. Nothing here trains, so no optimiser is built; base weights never
enter the adapter, so the base model is built without them (randomly, seeded).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmusk.config import FedMuskConfig
from fedmusk.strategies.aggregation import StateDict


def _seeded_base(cfg: FedMuskConfig):
    """The base model of ``cfg``'s preset, randomly initialised after seeding with ``cfg.seed``, on the CPU."""
    from fedmusk.musk_model import create_model
    from fedmusk.runtime import seed_everything

    seed_everything(cfg.seed)
    changes = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    return create_model(cfg.model.preset, weights=None, device="cpu", **changes)


def outcome_adapter_model(cfg: FedMuskConfig):
    """The outcome model (LoRA, fusion and outcome head, ``fedmusk.training.outcome.outcome_model``) on a seeded
    random base, on the CPU: the same tensors an ``OutcomeTrainer`` built from ``cfg`` starts with."""
    from fedmusk.training.outcome import outcome_model

    return outcome_model(cfg, _seeded_base(cfg))  # heads sized from the config


def initial_adapter_state(cfg: FedMuskConfig, phase: str = "outcome") -> StateDict:
    """The adapter every site starts ``phase`` from (the federation's phases, ``fedmusk.wire``): the outcome
    adapter, or for ``phase="pretrain"`` LoRA with the pretraining heads."""
    from fedmusk.musk_model.lora import adapter_state

    if phase == "pretrain":
        return pretrain_adapter_state(cfg)
    return adapter_state(outcome_adapter_model(cfg))


def pretrain_adapter_state(cfg: FedMuskConfig) -> StateDict:
    """The adapter of a pretraining round (LoRA + ``pretrain_heads``) from the configuration alone, on the CPU: what
    a federation's coordinator starts its pretraining phase from. Base weights never enter the adapter, so the
    base is built without them."""
    from fedmusk.musk_model.lora import adapter_state, apply_lora
    from fedmusk.training.outcome import lora_settings
    from fedmusk.training.pretrain import enabled_objectives, load_visual_tokenizer, pretrain_heads

    enabled = enabled_objectives(cfg)
    base = _seeded_base(cfg)
    tokenizer = None
    if "mim" in enabled and cfg.train.pretrain.mim_target == "codes":
        tokenizer = load_visual_tokenizer(cfg.train.pretrain.visual_tokenizer, "cpu")
    model = apply_lora(base, lora_settings(cfg), extra_trainable=pretrain_heads(cfg, base, tokenizer))
    return adapter_state(model)


def outcome_start_state(cfg: FedMuskConfig, pretrained: StateDict) -> StateDict:
    """The outcome phase's starting adapter after pretraining: the seeded outcome adapter with the pretrained
    global LoRA tensors in place of its own (AdapterStateError when the LoRA layouts differ)."""
    from fedmusk.training.pretrain import carry_lora

    return carry_lora(pretrained, initial_adapter_state(cfg))


def save_global_adapter(
    cfg: FedMuskConfig, global_state: StateDict, out_dir: str | os.PathLike, lineage=None
) -> Path:
    """Write ``global_state`` in peft's format (``fedmusk.musk_model.lora.save_adapter``) with the model's
    configuration, fingerprints and model card (``fedmusk.training.bundle``), and return the folder.

    Under FedSA this is the shared part (A factors) with the initial B and heads: each site's personalised B and
    heads stay at the site."""
    from fedmusk.musk_model.lora import load_adapter_state, save_adapter
    from fedmusk.training.bundle import Lineage, reference_base_and_tokenizer, save_bundle

    model = outcome_adapter_model(cfg)
    load_adapter_state(model, global_state)
    out = save_adapter(model, out_dir)
    base, tokenizer = reference_base_and_tokenizer(cfg)
    return save_bundle(out, cfg, lineage or Lineage(arm="federated"), base, tokenizer)
