"""Where the tissue is on a slide thumbnail.

Stained tissue is coloured; the glass around it is near-white and unsaturated. We threshold saturation with Otsu's
method, but clamp the threshold to a band that only makes sense for H&E-like stains, so that a thumbnail that is all
tissue (a single tile, say) or all glass is not split into two arbitrary halves. Then we drop what is coloured but
is not tissue: very dark pixels (black slide borders, dust, black marker) and green-to-blue hues (marker pens and
tissue-marking dye; haematoxylin is purple, so its hue lies outside that band). Morphology removes specks and fills
small holes.
"""

from __future__ import annotations

import numpy as np

# Saturation threshold band: below 0.05 is glass and scanner noise; a threshold above 0.15 would drop pale eosin.
_MIN_SAT_THRESHOLD = 0.05
_MAX_SAT_THRESHOLD = 0.15
_DARK_VALUE = 0.16  # brightness below which a pixel is a border, debris or black ink, not stained tissue
_GREY_DARK_VALUE = 0.45  # dark *and* nearly unsaturated is black/grey ink or shadow, not stain
_GREY_SATURATION = 0.12
_PEN_HUES = (65.0, 235.0)  # degrees: green, cyan and azure (pens, dyes); H&E lies in the red-purple range
_PEN_SATURATION = 0.18


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """A boolean (H, W) mask that is True where ``thumbnail`` (H, W, 3) uint8 RGB shows stained tissue.

    White background, black borders and debris, and green/blue pen or dye marks are False. Works on any scale, but is
    meant for thumbnails of roughly 512 to 4096 pixels on the longer side.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgb = np.asarray(thumbnail)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hue, sat, val = _hsv(rgb[..., :3])

    not_tissue = (val < _DARK_VALUE) | ((val < _GREY_DARK_VALUE) & (sat < _GREY_SATURATION))
    not_tissue |= (hue >= _PEN_HUES[0]) & (hue <= _PEN_HUES[1]) & (sat > _PEN_SATURATION)

    candidates = sat[~not_tissue]
    threshold = _MAX_SAT_THRESHOLD
    if candidates.size and float(candidates.max()) > float(candidates.min()):
        threshold = float(threshold_otsu(candidates))
    threshold = min(max(threshold, _MIN_SAT_THRESHOLD), _MAX_SAT_THRESHOLD)
    mask = (sat > threshold) & ~not_tissue

    # Morphology sizes follow the thumbnail's size so the result does not depend on how big a thumbnail was asked for.
    area = mask.size
    radius = max(1, round(max(mask.shape) / 512))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    # Pad by replicating the edge so closing does not eat the image border (a tile that is all tissue stays so).
    padded = np.pad(mask, radius, mode="edge")
    mask = ndimage.binary_closing(padded, structure=xx**2 + yy**2 <= radius**2)[radius:-radius, radius:-radius]
    mask = _drop_small_components(mask, max(8, int(area * 5e-5)))
    holes = _drop_small_components(~mask, max(8, int(area * 5e-4)))
    return ~holes & ~not_tissue


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0..1) in float32: a quarter of the memory skimage's float64 needs."""
    c = rgb.astype(np.float32) / 255.0
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    val = c.max(axis=-1)
    delta = val - c.min(axis=-1)
    sat = np.where(val > 0, delta / np.maximum(val, 1e-6), 0.0).astype(np.float32)
    d = np.maximum(delta, 1e-6)
    hue = np.where(val == r, ((g - b) / d) % 6.0, np.where(val == g, (b - r) / d + 2.0, (r - g) / d + 4.0)) * 60.0
    return np.where(delta > 0, hue, 0.0).astype(np.float32), sat, val


def _drop_small_components(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_size`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]


def tissue_fraction(thumbnail: np.ndarray) -> float:
    """The share (0..1) of ``thumbnail`` covered by tissue."""
    return float(tissue_mask(thumbnail).mean())
