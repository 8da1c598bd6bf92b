"""Building MUSK models from a preset name or config, optionally with a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fedmusk.musk_model.config import MuskConfig
from fedmusk.musk_model.model import MuskModel
from fedmusk.musk_model.weights import load_musk_weights


def create_model(
    config: str | MuskConfig = "large",
    weights: str | os.PathLike | Mapping | None = None,
    *,
    strict: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **changes,
) -> MuskModel:
    """A MUSK model in eval mode: ``config`` is a preset name ("large", "tiny") or a MuskConfig; ``changes``
    override config fields (e.g. ``img_size=224``). With ``weights`` the checkpoint is loaded through
    ``load_musk_weights`` (strict by default: a mismatch raises ``WeightsMismatchError`` naming every tensor)."""
    cfg = MuskConfig.preset(config, **changes) if isinstance(config, str) else config
    if weights is not None and strict:
        # Skip random initialisation of 675M parameters that the checkpoint replaces anyway.
        with torch.device("meta"):
            model = MuskModel(cfg)
        load_musk_weights(model, weights, strict=True)
    else:
        model = MuskModel(cfg)
        if weights is not None:
            load_musk_weights(model, weights, strict=False)
    return model.to(device=device, dtype=dtype).eval()
