"""``fedmusk prepare``: validate a site, cut every slide into tissue tiles and (optionally) embed them with a frozen
MUSK into a per-slide cache.

The cache lives inside the site (``<site_root>/.fedmusk/``) and never leaves it. Each slide's entry is written
atomically and records the tile coordinates and a fingerprint of everything that shaped its features (model weights,
image size, multi-scale flag, tiling settings), so a killed prepare resumes where it stopped and a stale cache is
detected instead of silently reused. The compute precision of the embedding (``model.precision``, see
``fedmusk.precision``) is part of that fingerprint: bf16 features are not float32 features. It also records a
fingerprint of the tiling alone: a tiles-only prepare keeps an entry whose tiles are current (with whatever features
it holds), and an embedding run reuses its coordinates.

Tiles can be read by DataLoader worker processes (``num_workers > 0``): each worker opens the slide itself, and the
batches arrive in grid order whatever the number of workers, so features do not depend on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmusk.data.errors import SiteDataError
from fedmusk.data.slides import Slide, open_slide
from fedmusk.data.slides.tile_loader import iter_tile_batches
from fedmusk.data.slides.tiles import LEVEL_MPP_SLACK, TileCoord, tile_grid
from fedmusk.precision import FLOAT32, autocast

CACHE_DIRNAME = ".fedmusk"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class TilingSettings:
    target_mpp: float = 0.5
    tile_size: int = 384
    min_tissue: float = 0.5

    @classmethod
    def from_config(cls, data) -> TilingSettings:
        """The tiling a DataConfig (``cfg.data``) asks for."""
        return cls(data.target_mpp, data.tile_size, data.min_tissue)


@dataclass
class PrepareResult:
    """What a prepare run did: slides embedded now, found up to date, and skipped with the reason."""

    prepared: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (slide, note): no tissue, upscaled tiles
    tiles: int = 0  # tiles of every slide that is ready now (prepared or up to date)
    tiles_computed: int = 0  # tiles read (and embedded) by this run

    @property
    def ok(self) -> bool:
        return not self.failed


def slide_key(relative_slide: str) -> str:
    """A stable file name for a slide's cache entry (a hash, so no path or name appears in file names)."""
    return hashlib.sha256(relative_slide.encode()).hexdigest()[:24]


def cache_dir(site_root: Path) -> Path:
    return Path(site_root) / CACHE_DIRNAME / "tiles"


def tiling_fingerprint(tiling: TilingSettings) -> str:
    """sha256 over the settings that decide which tiles a slide has."""
    settings = json.dumps({"format": CACHE_FORMAT, "tiling": asdict(tiling)}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()


def model_fingerprint(
    model: torch.nn.Module | None, ms_aug: bool, tiling: TilingSettings, precision: str = FLOAT32
) -> str:
    """sha256 over the model's tensors (names, dtypes, bytes) and every setting that changes the features,
    including the resolved compute ``precision`` (float32 entries keep the fingerprint they had before it counted)."""
    h = hashlib.sha256()
    settings = {"format": CACHE_FORMAT, "tiling": asdict(tiling), "ms_aug": ms_aug}
    if precision != FLOAT32:
        settings["precision"] = precision
    h.update(json.dumps(settings, sort_keys=True).encode())
    if model is not None:
        h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CachedSlide:
    """One slide's cache entry: tile coordinates (n, 4: level, x, y, size) and, when embedded, features (n, dim).

    ``fingerprint`` is the model fingerprint the entry was made with, ``tiling`` the tiling fingerprint ("" for
    entries written before it was recorded).
    """

    coords: torch.Tensor
    features: torch.Tensor | None
    fingerprint: str
    mpp: float
    tiling: str = ""

    def tile_coords(self) -> list[TileCoord]:
        return [TileCoord(int(l), int(x), int(y), int(s), self.mpp) for l, x, y, s in self.coords.tolist()]


def read_cache(site_root: Path, relative_slide: str) -> CachedSlide | None:
    """The slide's cache entry, or None when there is none (or it is unreadable: it will be rebuilt)."""
    path = cache_dir(site_root) / f"{slide_key(relative_slide)}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            coords = f.get_tensor("coords")
            features = f.get_tensor("features") if "features" in names else None
        return CachedSlide(coords, features, meta.get("fingerprint", ""), float(meta["mpp"]), meta.get("tiling", ""))
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply rebuilt
        return None


def is_current(cached: CachedSlide | None, fingerprint: str, tiling: TilingSettings, features: bool) -> bool:
    """Whether ``cached`` can be used as is: for features, made by the same model and settings; for tiles only,
    cut with the same tiling (any features it holds are kept)."""
    if cached is None:
        return False
    if features:
        return cached.fingerprint == fingerprint and cached.features is not None
    return cached.tiling == tiling_fingerprint(tiling) or cached.fingerprint == fingerprint


class CacheWriteError(SiteDataError):
    """The tile cache cannot be written (permissions, a full disk): a problem of the site folder, not of one slide,
    so preparing stops; the slides finished so far are kept."""

    @classmethod
    def from_error(cls, folder: Path, err: BaseException) -> CacheWriteError:
        text = str(err)
        errno_ = getattr(err, "errno", None)
        if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission denied" in text or "Read-only" in text:
            why = ("permission denied: the site folder is read-only for this account, or the cache was written by "
                   "another account; run as the account that owns it, or fix its permissions")  # fmt: skip
        elif errno_ == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
            why = "the disk is full: free some space and run again (slides finished so far are kept)"
        else:
            why = f"{type(err).__name__}: {_first_line(text)}"
        return cls(f"cannot write the tile cache: {why}", path=folder)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _write_cache(site_root: Path, relative_slide: str, coords, features, fingerprint: str, tiling: TilingSettings):
    out = cache_dir(site_root)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheWriteError.from_error(out, err) from None
    final = out / f"{slide_key(relative_slide)}.safetensors"
    tmp = final.with_suffix(".tmp")  # a leftover from a killed run has this very name and is simply overwritten
    tensors = {"coords": coords}
    if features is not None:
        tensors["features"] = features.contiguous()
    meta = {"fingerprint": fingerprint, "tiling": tiling_fingerprint(tiling), "mpp": repr(tiling.target_mpp),
            "format": str(CACHE_FORMAT)}  # fmt: skip
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, final)  # atomic: a killed prepare leaves either the old entry or the new one
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error wrapping one
        tmp.unlink(missing_ok=True)
        raise CacheWriteError.from_error(out, err) from None


# -- reading tiles ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_tiles(
    model,
    slide: Slide | str | Path,
    coords: list[TileCoord],
    transform,
    batch_size: int,
    ms_aug: bool,
    num_workers: int = 0,
    on_tiles: Callable[[int], None] | None = None,
    precision: str = FLOAT32,
) -> torch.Tensor:
    """Raw CLS features (no head, no norm) of each tile: (n, dim), or (n, 2 * dim) with multi-scale features, float32
    whatever the compute ``precision`` ("float32" or "bfloat16", resolved).

    ``slide`` is an open Slide or a path (needed for ``num_workers > 0``, see :func:`iter_tile_batches`);
    ``on_tiles(k)`` is called after each batch of ``k`` tiles. Raises SlideError when the slide cannot be read.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for batch in iter_tile_batches(slide, coords, transform, batch_size, num_workers, device):
        with autocast(device, precision):
            feats, _ = model(image=batch.to(dtype), with_head=False, out_norm=False, ms_aug=ms_aug)
        out.append(feats.float().cpu())
        if on_tiles is not None:
            on_tiles(batch.shape[0])
    dim = model.config.embed_dim * (2 if ms_aug else 1)
    return torch.cat(out) if out else torch.zeros(0, dim)


# -- preparing slides ------------------------------------------------------------------------------------------------


def prepare_slide(
    site_root: Path,
    relative_slide: str,
    tiling: TilingSettings,
    fingerprint: str,
    model=None,
    transform=None,
    batch_size: int = 32,
    ms_aug: bool = False,
    *,
    num_workers: int = 0,
    on_tiles: Callable[[int], None] | None = None,
    notes: list[str] | None = None,
    precision: str = FLOAT32,
) -> tuple[bool, int]:
    """Tile (and, with a model, embed) one slide unless its cache is current. Returns (was_done_now, tiles).

    Tiles only (``model=None``): an entry cut with the same tiling is current, and its features are kept.
    With a model, coordinates of an entry with the same tiling are reused and only the features are computed.
    ``on_tiles(k)`` reports progress in tiles; ``notes`` receives a warning when the slide's finest level is
    coarser than ``target_mpp`` (its tiles are enlarged). Raises SiteDataError (SlideError) when the slide cannot
    be read.
    """
    cached = read_cache(site_root, relative_slide)
    if is_current(cached, fingerprint, tiling, features=model is not None):
        return False, cached.coords.shape[0]
    path = Path(site_root) / relative_slide
    coords = None
    if cached is not None and cached.tiling == tiling_fingerprint(tiling):
        coords = cached.tile_coords()
    features = None
    with open_slide(path) as slide:
        if notes is not None and slide.mpp > tiling.target_mpp * (1 + LEVEL_MPP_SLACK):
            notes.append(upscale_warning(slide.mpp, tiling.target_mpp))
        if coords is None:
            coords = tile_grid(slide, tiling.target_mpp, tiling.tile_size, tiling.min_tissue)
        if model is not None and num_workers == 0:
            features = embed_tiles(model, slide, coords, transform, batch_size, ms_aug, on_tiles=on_tiles,
                                   precision=precision)  # fmt: skip
    if model is not None and num_workers > 0:  # workers open the slide themselves; this handle is closed first
        features = embed_tiles(model, path, coords, transform, batch_size, ms_aug, num_workers, on_tiles, precision)
    if model is None and on_tiles is not None:
        on_tiles(len(coords))
    table = torch.tensor([[c.level, c.x, c.y, c.size] for c in coords], dtype=torch.int64).reshape(-1, 4)
    _write_cache(site_root, relative_slide, table, features, fingerprint, tiling)
    return True, len(coords)


def prepare_site(
    site_root: Path,
    slides: list[str],
    tiling: TilingSettings,
    model=None,
    transform=None,
    batch_size: int = 32,
    ms_aug: bool = False,
    progress: Callable[[str], None] | None = None,
    *,
    num_workers: int = 0,
    on_tiles: Callable[[int], None] | None = None,
    precision: str = FLOAT32,
) -> PrepareResult:
    """Prepare every slide in ``slides`` (paths relative to the site root); a slide that fails is recorded with its
    reason (paths inside it relative to the site root) and the others go on.

    ``progress(message)`` is called after each slide with an identifier-free message ("slide 3 of 10");
    ``on_tiles(k)`` after every ``k`` tiles read. ``num_workers`` DataLoader processes read tiles for embedding;
    ``precision`` (resolved: "float32" or "bfloat16") is the embedding's compute precision.
    """
    fingerprint = model_fingerprint(model, ms_aug, tiling, precision)
    result = PrepareResult()
    for i, rel in enumerate(slides, 1):
        counted = 0

        def count(k: int) -> None:
            nonlocal counted
            counted += k
            if on_tiles is not None:
                on_tiles(k)

        notes: list[str] = []
        try:
            done, n = prepare_slide(site_root, rel, tiling, fingerprint, model, transform, batch_size, ms_aug,
                                    num_workers=num_workers, on_tiles=count, notes=notes,
                                    precision=precision)  # fmt: skip
        except CacheWriteError:
            raise  # the next slide would fail the same way
        except SiteDataError as err:
            result.failed.append((rel, _reason(site_root, rel, err)))
        else:
            if n == 0:
                notes.append(NO_TISSUE_WARNING)
            result.warnings += [(rel, note) for note in notes]
            (result.prepared if done else result.up_to_date).append(rel)
            result.tiles += n
            result.tiles_computed += n if done else 0
        if progress is not None:
            progress(f"slide {i} of {len(slides)}")
    return result


NO_TISSUE_WARNING = (
    "no tissue tile was found (blank or very pale scan, or data.min_tissue too high); a case whose slides are all "
    "like this is excluded from training and evaluation"
)


def upscale_warning(slide_mpp: float, target_mpp: float) -> str:
    """The note for a slide whose finest level is coarser than the tiles asked for."""
    return (f"the finest level is {slide_mpp:.3g} um/px, coarser than data.target_mpp={target_mpp:g}: its tiles are "
            f"enlarged {slide_mpp / target_mpp:.2g}x and show less detail than they claim")  # fmt: skip


def _reason(site_root: Path, slide: str, err: SiteDataError) -> str:
    """The error's message with paths relative to the site root, naming the file inside a slide folder (one file
    of a DICOM series, say) when that is where the problem is."""
    roots = {str(Path(site_root)).rstrip("/\\"), str(Path(site_root).resolve()).rstrip("/\\")}
    message = err.message
    for root in roots:
        message = message.replace(root + "/", "").replace(root + "\\", "")
    try:
        where = Path(err.path).resolve().relative_to(Path(site_root).resolve()).as_posix() if err.path else None
    except (ValueError, OSError):
        where = None
    return f"{where}: {message}" if where and where != slide else message
