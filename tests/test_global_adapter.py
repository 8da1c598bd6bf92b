"""The coordinator's initial global adapter, built without a trainer, is bit for bit what a site's trainer starts
with: the same seeds, the same LoRA factors and heads."""

import torch

from fedmusk.config import load_config
from fedmusk.musk_model import create_model
from fedmusk.runtime import load_tokenizer, seed_everything
from fedmusk.training.global_adapter import initial_adapter_state
from fedmusk.training.outcome import OutcomeTrainer


def trainer_adapter_state(cfg) -> dict[str, torch.Tensor]:
    """What the outcome trainer built from the configuration alone (seeded random base, no data) holds."""
    seed_everything(cfg.seed)
    base = create_model(cfg.model.preset, weights=None, device="cpu")
    return OutcomeTrainer(cfg, base, load_tokenizer(cfg.model), None, "cpu").adapter_state()


def test_initial_global_adapter_is_bit_identical_to_the_trainers():
    for overrides in (["seed=3"], ["seed=5", "train.features=end2end", "train.fusion=gated", "train.lora.ffa=true",
                                   "federation.strategy=ffa"]):  # fmt: skip
        cfg = load_config(["configs/demo.yaml"], overrides)
        initial, trained = initial_adapter_state(cfg), trainer_adapter_state(cfg)
        assert sorted(initial) == sorted(trained)
        assert all(torch.equal(initial[name], trained[name]) for name in initial), overrides
