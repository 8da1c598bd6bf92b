"""MUSK in plain torch: configuration, model, tokenizer, transforms and weight loading. No Flower here."""

from fedmusk.musk_model.config import MuskConfig
from fedmusk.musk_model.model import MuskModel

__all__ = ["MuskConfig", "MuskModel"]
