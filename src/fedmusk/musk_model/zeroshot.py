"""Image-text similarity with MUSK's contrastive heads (zero-shot classification and retrieval)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fedmusk.musk_model.model import MuskModel
from fedmusk.musk_model.transforms import musk_transform


@torch.no_grad()
def image_text_similarity(
    model: MuskModel,
    tokenizer,
    images: Sequence[Image.Image | np.ndarray],
    texts: Sequence[str],
    max_text_len: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (n_images, n_texts) of head-projected, L2-normalised features, and the per-image
    probabilities over the texts (softmax of similarities times the learned ``logit_scale.exp()``)."""
    device = next(model.parameters()).device
    transform = musk_transform(model.config.img_size)
    pixels = torch.stack([transform(im) for im in images]).to(device)
    ids, pad = tokenizer.encode_batch(list(texts), max_len=max_text_len)
    vision, _ = model(image=pixels, with_head=True, out_norm=True)
    _, language = model(text=ids.to(device), padding_mask=pad.to(device), with_head=True, out_norm=True)
    sims = (vision @ language.T).float().cpu()
    probs = (model.logit_scale.exp().float().cpu() * sims).softmax(dim=-1)
    return sims, probs
