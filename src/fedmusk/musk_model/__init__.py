"""MUSK in plain torch: configuration, model, tokenizer, transforms and weight loading. No Flower here."""

from fedmusk.musk_model.config import MuskConfig
from fedmusk.musk_model.factory import create_model
from fedmusk.musk_model.model import MuskModel
from fedmusk.musk_model.transforms import MuskTransform, musk_transform
from fedmusk.musk_model.weights import LoadReport, WeightsMismatchError, load_musk_weights, read_state_dict

__all__ = [
    "LoadReport",
    "MuskConfig",
    "MuskModel",
    "MuskTransform",
    "WeightsMismatchError",
    "create_model",
    "load_musk_weights",
    "musk_transform",
    "read_state_dict",
]
