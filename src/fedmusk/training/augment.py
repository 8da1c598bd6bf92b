"""Image augmentation for continued pretraining, on uint8 RGB arrays before ``MuskTransform``.

MUSK's recipe: stage 1 (masked modelling) uses stain augmentation (RandStainNA), colour jitter 0.2, flips and mixed
magnification (10x/20x/40x views) cropped to the model's size; stage 2 (image-text alignment) uses random resized
crops (0.5-1 of the area), flips, jitter and blur. ``Augmentation`` composes these; ``masked_modelling`` and
``alignment`` give the two recipes.

Every random draw comes from the ``numpy.random.Generator`` passed in (a ``torch.Generator`` is accepted and turned
into one), so the same generator state gives the same pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from skimage.color import lab2rgb, rgb2lab

# Region side relative to the tile: half a tile blown up (40x view of a 20x tile), the tile (20x), two tiles (10x).
MAGNIFICATION_SCALES = (0.5, 1.0, 2.0)
# RandStainNA-like perturbation in CIE-LAB: per-channel mean shift (LAB units) and log-scale of the std, each a
# normal draw truncated at +-2 standard deviations. L spans 0-100 and a, b roughly -60..60 in H&E; these widths
# are of the order of the stain variation between scanners and labs that RandStainNA fits on its data.
STAIN_MEAN_SD = (5.0, 3.0, 3.0)
STAIN_LOG_STD_SD = (0.1, 0.1, 0.1)
TRUNCATE = 2.0

Generator = np.random.Generator | torch.Generator


def numpy_rng(generator: Generator) -> np.random.Generator:
    """A numpy generator from ``generator``: itself, or one seeded by a draw from a torch generator."""
    if isinstance(generator, np.random.Generator):
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return np.random.default_rng(seed)


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {array.dtype} of shape {array.shape}")
    return array


def _truncated_normal(rng: np.random.Generator, sd, size: int = 3) -> np.ndarray:
    return np.clip(rng.standard_normal(size), -TRUNCATE, TRUNCATE) * np.asarray(sd, dtype=np.float64)


# -- colour ----------------------------------------------------------------------------------------------------------


def stain_augment(
    image, rng: np.random.Generator, mean_sd=STAIN_MEAN_SD, log_std_sd=STAIN_LOG_STD_SD
) -> np.ndarray:
    """A RandStainNA-like stain perturbation: in CIE-LAB, each channel c of the image is standardised with its own
    mean and std and mapped to a new mean mu_c + d_c and std sigma_c * exp(e_c), with d_c ~ N(0, mean_sd[c]) and
    e_c ~ N(0, log_std_sd[c]) truncated at 2 sd. So the mean of each LAB channel moves by at most 2 * mean_sd[c]
    (before clipping to the RGB gamut). Returns uint8 RGB of the same shape."""
    rgb = _rgb(image)
    lab = rgb2lab(rgb).reshape(-1, 3)
    mean, std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-6)
    new_mean = mean + _truncated_normal(rng, mean_sd)
    new_std = std * np.exp(_truncated_normal(rng, log_std_sd))
    lab = (lab - mean) / std * new_std + new_mean
    lab[:, 0] = np.clip(lab[:, 0], 0.0, 100.0)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, which skimage reports as a warning
        warnings.simplefilter("ignore")
        out = lab2rgb(lab.reshape(rgb.shape))
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def colour_jitter(image, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor uniform in [1 - strength, 1 + strength] (in that
    order, as torchvision's ColorJitter defines each). No hue jitter: stain augmentation moves hue the way stains do.
    """
    rgb = _rgb(image).astype(np.float64)
    if strength <= 0:
        return rgb.astype(np.uint8)
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    grey = lambda x: x @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L" mode
    x = np.clip(rgb * b, 0, 255)
    x = np.clip((x - grey(x).mean()) * c + grey(x).mean(), 0, 255)
    g = grey(x)[..., None]
    x = np.clip((x - g) * s + g, 0, 255)
    return np.rint(x).astype(np.uint8)


def gaussian_blur(image, rng: np.random.Generator, sigma=(0.1, 2.0)) -> np.ndarray:
    """Gaussian blur with a radius (sigma, pixels) uniform in ``sigma``."""
    radius = float(rng.uniform(*sigma))
    return np.asarray(Image.fromarray(_rgb(image)).filter(ImageFilter.GaussianBlur(radius)))


# -- geometry --------------------------------------------------------------------------------------------------------


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def magnification_crop(
    image, rng: np.random.Generator, out_size: int, scales=MAGNIFICATION_SCALES, tile_px: int | None = None
) -> np.ndarray:
    """A mixed-magnification view: a square region of side s * tile_px, s drawn from ``scales``, at a random place,
    resized to ``out_size`` (bicubic, antialiased when shrinking). With tiles cut at 20x, s = 0.5, 1, 2 give 40x,
    20x and 10x views.

    ``tile_px`` defaults to the image's shorter side. A region larger than the image (s = 2 on a single tile) is
    completed by mirroring the image at its edges: the tile itself is the centre of the view and tissue texture
    continues plausibly, while cells appear at half the size as at 10x. Store tiles with context (larger than
    tile_px) to get real 10x views instead.
    """
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    base = tile_px or min(h, w)
    side = max(1, int(round(float(rng.choice(np.asarray(scales, dtype=np.float64))) * base)))
    pad_y, pad_x = max(0, side - h), max(0, side - w)
    if pad_y or pad_x:
        rgb = np.pad(rgb, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), "symmetric")
        h, w = rgb.shape[:2]
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return _resize(np.ascontiguousarray(rgb[top : top + side, left : left + side]), out_size)


def random_resized_crop(
    image, rng: np.random.Generator, out_size: int, area=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """A region of ``area`` (fraction of the image, uniform) and aspect ratio (log-uniform in ``ratio``), resized
    to out_size x out_size; the whole image, centred, when ten tries find no fitting region."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(np.ascontiguousarray(rgb[top : top + ch, left : left + cw]), out_size)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(np.ascontiguousarray(rgb[top : top + side, left : left + side]), out_size)


def random_flips(image, rng: np.random.Generator) -> np.ndarray:
    """Horizontal and vertical flips, each with probability 1/2 (tissue has no up or left)."""
    rgb = _rgb(image)
    horizontal, vertical = rng.random(2) < 0.5
    if horizontal:
        rgb = rgb[:, ::-1]
    if vertical:
        rgb = rgb[::-1]
    return np.ascontiguousarray(rgb)


# -- recipes ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """An augmentation pipeline: crop to img_size, flips, stain, jitter, blur. Call it with an image (PIL or uint8
    array) and a generator; it returns (img_size, img_size, 3) uint8 for ``MuskTransform``.

    crop: "magnification" (mixed-magnification views, ``scales``), "resized" (random resized crop of ``area``).
    blur: probability of a Gaussian blur.
    """

    img_size: int
    crop: str = "magnification"
    scales: tuple[float, ...] = MAGNIFICATION_SCALES
    area: tuple[float, float] = (0.5, 1.0)
    flips: bool = True
    stain: bool = True
    jitter: float = 0.2
    blur: float = 0.0

    def __post_init__(self) -> None:
        if self.crop not in ("magnification", "resized"):
            raise ValueError(f"crop={self.crop!r}: choose 'magnification' or 'resized'")

    def __call__(self, image, generator: Generator) -> np.ndarray:
        rng = numpy_rng(generator)
        if self.crop == "magnification":
            x = magnification_crop(image, rng, self.img_size, self.scales)
        else:
            x = random_resized_crop(image, rng, self.img_size, self.area)
        if self.flips:
            x = random_flips(x, rng)
        if self.stain:
            x = stain_augment(x, rng)
        if self.jitter > 0:
            x = colour_jitter(x, rng, self.jitter)
        if self.blur > 0 and rng.random() < self.blur:
            x = gaussian_blur(x, rng)
        return x


def masked_modelling(img_size: int, stain: bool = True) -> Augmentation:
    """Stage 1 (MIM on unpaired tiles): mixed magnification 10x/20x/40x, flips, stain augmentation, jitter 0.2."""
    return Augmentation(img_size, crop="magnification", stain=stain)


def alignment(img_size: int, stain: bool = True) -> Augmentation:
    """Stage 2 (image-caption pairs): random resized crop of 0.5-1 of the area (a caption describes the whole tile,
    so no zooming out), flips, stain augmentation, jitter 0.2, blur half of the time."""
    return Augmentation(img_size, crop="resized", stain=stain, blur=0.5)
