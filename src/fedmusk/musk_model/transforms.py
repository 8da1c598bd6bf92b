"""The reference preprocessing of MUSK: short side to img_size (bicubic, antialiased), centre crop, [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MUSK_MEAN = (0.5, 0.5, 0.5)
MUSK_STD = (0.5, 0.5, 0.5)


class MuskTransform:
    """PIL image or (H, W, 3) uint8 array -> (3, img_size, img_size) float tensor, as MUSK's release preprocesses.

    Equal to torchvision's Resize(img_size, bicubic, antialias) + CenterCrop + ToTensor + Normalize(0.5, 0.5) on a
    PIL image, written without torchvision (whose PyPI wheels do not import beside every torch build).
    """

    def __init__(self, img_size: int = 384):
        self.img_size = img_size

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.img_size:
            new_long = int(self.img_size * long / short)
            size = (self.img_size, new_long) if w <= h else (new_long, self.img_size)
            image = image.resize(size, Image.BICUBIC)  # PIL's bicubic filter widens (antialiases) when shrinking
        w, h = image.size
        top = int(round((h - self.img_size) / 2.0))
        left = int(round((w - self.img_size) / 2.0))
        image = image.crop((left, top, left + self.img_size, top + self.img_size))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(MUSK_MEAN).view(3, 1, 1)
        std = torch.tensor(MUSK_STD).view(3, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"MuskTransform(img_size={self.img_size})"


def musk_transform(img_size: int = 384) -> MuskTransform:
    """The release's inference preprocessing at ``img_size`` pixels."""
    return MuskTransform(img_size)
