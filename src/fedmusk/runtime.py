"""From a resolved configuration to live objects: device, MUSK model, tokenizer. No Flower here."""

from __future__ import annotations

import random

import numpy as np
import torch

from fedmusk.config import ConfigError, ModelConfig, check_model_config
from fedmusk.musk_model import MuskModel, create_model
from fedmusk.musk_model.tokenizer import MuskTokenizer, tiny_tokenizer


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but this machine has no CUDA GPU")
    return device


def model_precision(cfg: ModelConfig, device: torch.device | str) -> str:
    """``cfg.precision`` resolved on ``device``: "float32" or "bfloat16" (ConfigError for an unknown setting)."""
    from fedmusk.precision import resolve_precision

    return resolve_precision(cfg.precision, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> MuskModel:
    """The configured MUSK: the release checkpoint when ``cfg.weights`` is set, else a seeded random model.

    A large model without weights is refused: a random MUSK-large is never what a hospital wants.
    """
    changes = {"img_size": cfg.img_size} if cfg.img_size else {}
    if cfg.weights is None and cfg.preset != "tiny":
        check_model_config(cfg)
    torch.manual_seed(seed)
    try:
        return create_model(cfg.preset, weights=cfg.weights, device=device, **changes)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def load_tokenizer(cfg: ModelConfig) -> MuskTokenizer:
    """The release tokenizer named by ``cfg.tokenizer``, or fedmusk's tiny tokenizer for the tiny preset."""
    if cfg.tokenizer:
        return MuskTokenizer(cfg.tokenizer)
    if cfg.preset != "tiny":
        raise ConfigError(f"model.preset={cfg.preset} needs the release tokenizer: set model.tokenizer")
    return tiny_tokenizer()
