"""Procedural H&E tissue for the synthetic cohort.

A section is rendered in optical density (Beer-Lambert): every pixel holds a hematoxylin and an eosin concentration,
and the site's stain vectors turn them into RGB, so a site's colour shift acts the way a real staining protocol or
scanner does. What the renderer shows follows the case's biology:

- grade: nuclear size, pleomorphism (size spread, elongation, irregular contour), hyperchromasia and crowding rise
  with grade, and gland lumens (white spaces inside tumour nests) give way to solid sheets;
- necrosis: pale, homogeneous eosinophilic areas holding nuclear debris, a set fraction of the tumour area;
- tumour-infiltrating lymphocytes: small, round, dark nuclei in the stroma, inside nests and in dense aggregates;
- stroma: streaked pink collagen with sparse spindle-shaped fibroblast nuclei.

Tissue lies on white glass as one or a few irregular fragments, so tissue detection and tiling have work to do.
Sizes are physical (micrometres), so a 0.25 um/px site draws nuclei twice as large in pixels as a 0.5 um/px site.
Every call draws from the generator it is given and nothing else, so the same generator state gives the same pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Label map values returned with every rendering (used for tile captions and tests).
BACKGROUND, STROMA, TUMOUR, NECROSIS, LYMPHOID, LUMEN = range(6)
LABEL_NAMES = ("background", "stroma", "tumour", "necrosis", "lymphoid", "lumen")


@dataclass(frozen=True)
class Stain:
    """A site's staining and scanning: unit optical-density vectors and strengths of hematoxylin and eosin."""

    hematoxylin: tuple[float, float, float] = (0.56, 0.72, 0.41)
    eosin: tuple[float, float, float] = (0.22, 0.80, 0.56)
    h_strength: float = 1.0
    e_strength: float = 1.0
    glass: tuple[float, float, float] = (0.03, 0.03, 0.04)  # optical density of the empty slide (off-white)


@dataclass(frozen=True)
class TissueBiology:
    """What a section shows: grade 1-3, necrosis as a fraction of tumour area, TIL score 0-1, tumour share."""

    grade: int = 2
    necrosis: float = 0.05
    til: float = 0.3
    tumour_fraction: float = 0.55


def render_section(
    height: int,
    width: int,
    mpp: float,
    biology: TissueBiology,
    stain: Stain,
    rng: np.random.Generator,
    with_background: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one H&E section.

    Returns (rgb, labels): rgb is (height, width, 3) uint8; labels is (height, width) uint8 with the compartment of
    each pixel (BACKGROUND ... LUMEN). Without background the whole field is tissue (used for pretraining tiles).
    """
    um = 1.0 / mpp  # pixels per micrometre
    shape = (height, width)
    # Compartments and ground substance are worked out on a grid of about 1 um per cell (cheap), then enlarged;
    # the tissue outline and the nuclei are drawn at full resolution.
    f = max(1, int(round(1.0 / mpp)))
    coarse_shape = (-(-height // f), -(-width // f))
    tissue = _tissue_shape(shape, rng) if with_background else np.ones(shape, bool)
    coarse_labels = _compartments(coarse_shape, um / f, tissue[::f, ::f], biology, rng)
    coarse_hema, coarse_eosin, fibre_angle = _ground_substance(coarse_labels, um / f, rng)
    # soften compartment borders to about a micrometre, as optics and section thickness do
    coarse_hema = ndimage.gaussian_filter(coarse_hema, 0.8)
    coarse_eosin = ndimage.gaussian_filter(coarse_eosin, 0.8)

    labels = _enlarge(coarse_labels, f, shape)
    labels[~tissue] = BACKGROUND
    hema = upsample(coarse_hema, f)[:height, :width]
    eosin = upsample(coarse_eosin, f)[:height, :width]
    hema[~tissue] = 0.0
    eosin[~tissue] = 0.0
    _nuclei(hema, labels, um, biology, fibre_angle, rng)
    return _to_rgb(hema, eosin, stain, rng), labels


def _enlarge(labels: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour enlargement of a label map by ``f``, cropped to ``shape``."""
    if f == 1:
        return labels.copy()
    h, w = labels.shape
    big = np.broadcast_to(labels[:, None, :, None], (h, f, w, f)).reshape(h * f, w * f)
    return np.ascontiguousarray(big[: shape[0], : shape[1]])


def _to_rgb(hema: np.ndarray, eosin: np.ndarray, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert: transmitted light per channel from the two stain concentrations, plus grey sensor noise."""
    noise = 0.012 * rng.standard_normal(hema.shape, dtype=np.float32)
    rgb = np.empty((*hema.shape, 3), np.uint8)
    minus_od = np.empty(hema.shape, np.float32)
    scratch = np.empty(hema.shape, np.float32)
    for c in range(3):
        np.multiply(hema, np.float32(-stain.h_strength * stain.hematoxylin[c]), out=minus_od)
        np.multiply(eosin, np.float32(stain.e_strength * stain.eosin[c]), out=scratch)
        minus_od -= scratch
        minus_od += noise
        np.exp(minus_od, out=minus_od)
        minus_od *= np.float32(255.0 * np.exp(-stain.glass[c]))  # the glass dims every pixel alike
        np.minimum(minus_od, 255.0, out=minus_od)
        rgb[..., c] = minus_od
    return rgb


# --- smooth random fields ---------------------------------------------------------------------------------------


def smooth_field(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Roughly N(0, 1) noise with correlation length ``scale_px``: coarse Gaussian noise, blurred and upsampled."""
    step = max(2, int(round(scale_px / 2)))
    coarse = rng.standard_normal((shape[0] // step + 3, shape[1] // step + 3)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 1.0, mode="wrap")
    coarse /= coarse.std() + 1e-6
    return upsample(coarse, step)[: shape[0], : shape[1]]


def upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear enlargement of a float field by an integer factor, pixel centres aligned (edges clamped)."""
    if factor == 1:
        return field.astype(np.float32, copy=True)
    out = field.astype(np.float32, copy=False)
    for axis in (0, 1):
        n = out.shape[axis]
        x = (np.arange(n * factor, dtype=np.float32) + 0.5) / factor - 0.5
        i0 = np.clip(np.floor(x).astype(np.int64), 0, n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        t = np.clip(x - i0, 0.0, 1.0)
        shape = (-1, 1) if axis == 0 else (1, -1)
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
        hi -= lo
        hi *= t.reshape(shape)
        lo += hi
        out = lo
    return out


def _quantile_mask(field: np.ndarray, where: np.ndarray, fraction: float) -> np.ndarray:
    """The top ``fraction`` of ``field`` within ``where`` (exact share, whatever the field's distribution)."""
    if fraction <= 0 or not where.any():
        return np.zeros_like(where)
    values = field[where][::5]
    threshold = np.quantile(values, 1.0 - min(fraction, 1.0))
    return where & (field > threshold)


def _tissue_shape(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One to three irregular fragments covering roughly 35-60% of the field, never touching the border."""
    h, w = shape
    step = 8
    ch, cw = h // step + 1, w // step + 1
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    score = np.full((ch, cw), -1.0, np.float32)
    n_fragments = int(rng.choice([1, 1, 2, 3]))
    for _ in range(n_fragments):
        cy, cx = rng.uniform(0.3, 0.7) * ch, rng.uniform(0.3, 0.7) * cw
        ry, rx = rng.uniform(0.36, 0.5) * ch, rng.uniform(0.36, 0.5) * cw
        ry, rx = ry / n_fragments**0.35, rx / n_fragments**0.35
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        score = np.maximum(score, 1.0 - (u / rx) ** 2 - (v / ry) ** 2)
    score += 0.45 * smooth_field((ch, cw), max(ch, cw) / 6, rng) + 0.15 * smooth_field((ch, cw), 6, rng)
    # fade out towards the slide's edge (a rounded falloff, not a straight cut), and keep the last cells empty
    edge = np.minimum(np.minimum(yy, ch - 1 - yy), np.minimum(xx, cw - 1 - xx)) / (0.12 * min(ch, cw))
    score -= 1.5 * np.clip(1.0 - edge, 0.0, 1.0) ** 2
    margin = 2
    score[:margin], score[-margin:], score[:, :margin], score[:, -margin:] = -1, -1, -1, -1
    full = upsample(score, step)[:h, :w]
    return full > 0


def _compartments(shape, um: float, tissue: np.ndarray, bio: TissueBiology, rng) -> np.ndarray:
    labels = np.where(tissue, STROMA, BACKGROUND).astype(np.uint8)
    nests = 0.75 * smooth_field(shape, 220 * um, rng) + 0.35 * smooth_field(shape, 45 * um, rng)
    tumour = _quantile_mask(nests, tissue, bio.tumour_fraction)
    labels[tumour] = TUMOUR

    necrosis = _quantile_mask(smooth_field(shape, 120 * um, rng) + nests, tumour, bio.necrosis)
    labels[necrosis] = NECROSIS

    # lymphoid aggregates sit in the stroma, more of them with more TILs
    stroma = labels == STROMA
    aggregates = _quantile_mask(smooth_field(shape, 70 * um, rng), stroma, 0.01 + 0.12 * bio.til**1.5)
    labels[aggregates] = LYMPHOID

    # gland lumens inside viable tumour: many in well differentiated, nearly none in solid high grade
    viable = labels == TUMOUR
    lumen_share = {1: 0.22, 2: 0.10, 3: 0.015}[int(bio.grade)]
    lumens = _quantile_mask(smooth_field(shape, 22 * um, rng), viable, lumen_share)
    lumens = ndimage.binary_erosion(lumens, iterations=max(1, int(2 * um)))  # keep a rim of epithelium
    labels[lumens] = LUMEN
    return labels


def _ground_substance(labels: np.ndarray, um: float, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """Everything that is not a nucleus: collagen, cytoplasm, necrotic haze, empty lumens.

    Returns hematoxylin and eosin concentration maps on the label grid and the direction of the collagen fibres
    (radians), along which fibroblast nuclei lie."""
    shape = labels.shape
    # collagen streaks: noise blurred much more along one axis than the other
    horizontal = rng.random() < 0.5
    sigma = (1.0 * um, 4.0 * um) if horizontal else (4.0 * um, 1.0 * um)
    streak = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    streak /= streak.std() + 1e-6
    loose = np.clip(smooth_field(shape, 30 * um, rng) - 1.2, 0, None)  # oedematous, paler patches of stroma
    grain = smooth_field(shape, 3 * um, rng)

    #                 background stroma tumour necrosis lymphoid lumen
    e_base = np.array([0.00, 0.62, 0.36, 0.34, 0.25, 0.04], np.float32)
    e_streak = np.array([0.0, 0.11, 0.0, 0.0, 0.0, 0.0], np.float32)
    e_loose = np.array([0.0, -0.25, 0.0, 0.0, 0.0, 0.0], np.float32)
    e_grain = np.array([0.0, 0.0, 0.06, 0.05, 0.0, 0.0], np.float32)
    h_base = np.array([0.00, 0.04, 0.12, 0.10, 0.10, 0.01], np.float32)
    h_grain = np.array([0.0, 0.0, 0.03, 0.04, 0.0, 0.0], np.float32)
    eosin = e_base[labels] + e_streak[labels] * streak + e_loose[labels] * loose + e_grain[labels] * grain
    np.clip(eosin, 0.0, None, out=eosin)
    hema = h_base[labels] + h_grain[labels] * grain
    return hema, eosin, 0.0 if horizontal else np.pi / 2


# --- nuclei -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NucleusKind:
    spacing_um: float  # grid cell size: at most one nucleus per cell
    radius_um: float  # mean radius (geometric mean of the two axes)
    size_cv: float  # spread of radius between nuclei
    elongation: float  # mean (major/minor - 1)
    irregularity: float  # contour roughness
    darkness: float  # hematoxylin concentration at the centre
    texture: float  # chromatin clumping


def _tumour_kind(grade: int) -> _NucleusKind:
    g = int(grade) - 1  # 0, 1, 2
    return _NucleusKind(
        spacing_um=(13.0, 12.0, 11.0)[g],
        radius_um=(3.6, 4.4, 5.3)[g],
        size_cv=(0.08, 0.16, 0.28)[g],
        elongation=(0.25, 0.35, 0.45)[g],
        irregularity=(0.05, 0.15, 0.35)[g],
        darkness=(0.85, 1.0, 1.2)[g],
        texture=(0.10, 0.20, 0.40)[g],
    )


_LYMPHOCYTE = _NucleusKind(spacing_um=8.0, radius_um=2.8, size_cv=0.08, elongation=0.08, irregularity=0.03,
                           darkness=1.45, texture=0.05)  # fmt: skip
_FIBROBLAST = _NucleusKind(spacing_um=22.0, radius_um=2.6, size_cv=0.15, elongation=2.2, irregularity=0.05,
                           darkness=0.95, texture=0.05)  # fmt: skip
_DEBRIS = _NucleusKind(spacing_um=6.0, radius_um=1.2, size_cv=0.35, elongation=0.6, irregularity=0.40,
                       darkness=1.25, texture=0.10)  # fmt: skip


def _by_label(**density: float) -> np.ndarray:
    """Nucleus density per compartment (index = label value), zero where not given."""
    out = np.zeros(len(LABEL_NAMES), np.float32)
    for name, value in density.items():
        out[LABEL_NAMES.index(name)] = value
    return out


def _nuclei(hema: np.ndarray, labels: np.ndarray, um: float, bio: TissueBiology, fibre_angle: float, rng) -> None:
    til = float(bio.til)
    kind = _tumour_kind(bio.grade)
    # two grids offset by half a cell, so tumour nuclei crowd and overlap instead of sitting on a lattice;
    # higher grade crowds more
    _stamp(hema, labels, _by_label(tumour=0.5 + 0.1 * (int(bio.grade) - 1)), kind, um, rng, offset=0.0)
    _stamp(hema, labels, _by_label(tumour=0.5), kind, um, rng, offset=0.5)
    _stamp(hema, labels, _by_label(stroma=0.35), _FIBROBLAST, um, rng, offset=0.0, orientation=fibre_angle)
    _stamp(hema, labels, _by_label(necrosis=0.45), _DEBRIS, um, rng, offset=0.0)
    lymphocytes = _by_label(stroma=0.02 + 0.55 * til, tumour=0.01 + 0.28 * til, lymphoid=0.9, necrosis=0.02)
    _stamp(hema, labels, lymphocytes, _LYMPHOCYTE, um, rng, offset=0.0)


def _stamp(
    hema: np.ndarray,
    labels: np.ndarray,
    density_by_label: np.ndarray,
    kind: _NucleusKind,
    um: float,
    rng: np.random.Generator,
    offset: float,
    orientation: float | None = None,
) -> None:
    """Draw nuclei of one kind: at most one per grid cell, anywhere in its cell, present with the density of the
    compartment under its centre.

    Each nucleus is drawn in a patch twice the cell size centred on its cell, so nuclei may cross cell borders and no
    lattice shows. Patches of cells two apart never overlap, so the cells are done in four interleaved classes, each
    written at once through a block view of the canvas; the cost follows the number of nuclei, not of pixels.
    """
    cell = 2 * max(3, int(round(kind.spacing_um * um / 2)))
    pad = cell // 2
    h, w = hema.shape
    shift = int(round(offset * cell))
    ny, nx = (h + shift) // cell + 1, (w + shift) // cell + 1
    # every cell draws its numbers whatever the density, so the layout never depends on another layer's occupancy
    u = rng.random((ny, nx), dtype=np.float32)
    cy, cx = rng.random((2, ny, nx), dtype=np.float32) * cell
    size = rng.standard_normal((ny, nx), dtype=np.float32)
    shape_draws = rng.random((3, ny, nx), dtype=np.float32)
    bank = _noise_bank(2 * cell)

    gy = np.clip((np.arange(ny)[:, None] * cell - shift + cy).astype(np.int64), 0, h - 1)
    gx = np.clip((np.arange(nx)[None, :] * cell - shift + cx).astype(np.int64), 0, w - 1)
    present = u < density_by_label[labels[gy, gx]]
    if not present.any():
        return

    # canvas row = image row + shift + cell; cell iy spans canvas rows [(iy + 1) * cell, (iy + 2) * cell)
    canvas = np.zeros(((ny + 4) * cell, (nx + 4) * cell), np.float32)
    canvas[shift + cell : shift + cell + h, shift + cell : shift + cell + w] = hema
    max_r = pad / 1.3  # contour roughness may push the rim out by up to 1.3x
    local = np.arange(2 * cell, dtype=np.float32) - pad
    for py in (0, 1):
        for px in (0, 1):
            iy, ix = np.nonzero(present[py::2, px::2])  # block indices k, l; the cell is (2k + py, 2l + px)
            if iy.size == 0:
                continue
            cyy, cxx = 2 * iy + py, 2 * ix + px
            r = kind.radius_um * um * np.clip(1 + kind.size_cv * size[cyy, cxx], 0.5, 2.5)
            elong = 1 + kind.elongation * (0.5 + shape_draws[0, cyy, cxx])
            a = np.minimum(r * np.sqrt(elong), max_r)  # semi-major axis
            b = np.minimum(r / np.sqrt(elong), max_r)
            if orientation is None:
                theta = np.pi * shape_draws[1, cyy, cxx]
            else:
                theta = orientation + 0.4 * (shape_draws[1, cyy, cxx] - 0.5)
            dark = kind.darkness * (0.85 + 0.3 * shape_draws[2, cyy, cxx])

            dy = local[None, :, None] - cy[cyy, cxx][:, None, None]
            dx = local[None, None, :] - cx[cyy, cxx][:, None, None]
            cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
            along = dx * cos + dy * sin
            across = -dx * sin + dy * cos
            d2 = (along / a[:, None, None]) ** 2 + (across / b[:, None, None]) ** 2
            pick = (7 * cyy + 13 * cxx) % len(bank)
            d2 *= np.clip(1 + kind.irregularity * bank[pick], 0.6, 1.6)
            edge = np.clip((1.0 - d2) * 4.0, 0.0, 1.0)  # soft rim about a quarter radius wide
            chromatin = 1 + kind.texture * bank[(pick + 1) % len(bank)]
            patch = (edge * chromatin * dark[:, None, None]).astype(np.float32)

            top, left = (py + 1) * cell - pad, (px + 1) * cell - pad
            ky, kx = (ny - py + 1) // 2, (nx - px + 1) // 2
            view = canvas[top : top + 2 * cell * ky, left : left + 2 * cell * kx].reshape(ky, 2 * cell, kx, 2 * cell)
            view[iy, :, ix, :] = np.maximum(view[iy, :, ix, :], patch)
    hema[...] = canvas[shift + cell : shift + cell + h, shift + cell : shift + cell + w]


@functools.lru_cache(maxsize=64)
def _noise_bank(size: int, n: int = 8) -> np.ndarray:
    """A few smooth (size, size) noise patches that nuclei pick from for contour and chromatin.

    Fixed per size (its own seed) and cached: making them is costly and they need no variety beyond the pick."""
    raw = np.random.default_rng(size).standard_normal((n, size, size)).astype(np.float32)
    smooth = ndimage.gaussian_filter(raw, (0, max(1.0, size / 20), max(1.0, size / 20)))
    smooth /= smooth.std(axis=(1, 2), keepdims=True) + 1e-6
    smooth.flags.writeable = False
    return smooth
