"""``fedmusk prepare``: validate a site, cut every slide into tissue tiles and (optionally) embed them with a frozen
MUSK into a per-slide cache.

The cache lives inside the site (``<site_root>/.fedmusk/``) and never leaves it. Each slide's entry is written
atomically and records the tile coordinates and a fingerprint of everything that shaped its features (model weights,
image size, multi-scale flag, tiling settings), so a killed prepare resumes where it stopped and a stale cache is
detected instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedmusk.data.errors import SiteDataError
from fedmusk.data.slides import open_slide
from fedmusk.data.tiles import TileCoord, read_tile, tile_grid

CACHE_DIRNAME = ".fedmusk"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class TilingSettings:
    target_mpp: float = 0.5
    tile_size: int = 384
    min_tissue: float = 0.5


@dataclass
class PrepareResult:
    """What a prepare run did: slides embedded now, found up to date, and skipped with the reason."""

    prepared: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason)
    tiles: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def slide_key(relative_slide: str) -> str:
    """A stable file name for a slide's cache entry (a hash, so no path or name appears in file names)."""
    return hashlib.sha256(relative_slide.encode()).hexdigest()[:24]


def cache_dir(site_root: Path) -> Path:
    return Path(site_root) / CACHE_DIRNAME / "tiles"


def model_fingerprint(model: torch.nn.Module | None, ms_aug: bool, tiling: TilingSettings) -> str:
    """sha256 over the model's tensors (names, dtypes, bytes) and every setting that changes the features."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "tiling": asdict(tiling), "ms_aug": ms_aug}, sort_keys=True).encode())
    if model is not None:
        h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CachedSlide:
    """One slide's cache entry: tile coordinates (n, 4: level, x, y, size) and, when embedded, features (n, dim)."""

    coords: torch.Tensor
    features: torch.Tensor | None
    fingerprint: str
    mpp: float

    def tile_coords(self) -> list[TileCoord]:
        return [TileCoord(int(l), int(x), int(y), int(s), self.mpp) for l, x, y, s in self.coords.tolist()]


def read_cache(site_root: Path, relative_slide: str) -> CachedSlide | None:
    """The slide's cache entry, or None when there is none (or it is unreadable: it will be rebuilt)."""
    path = cache_dir(site_root) / f"{slide_key(relative_slide)}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return CachedSlide(tensors["coords"], tensors.get("features"), meta.get("fingerprint", ""), float(meta["mpp"]))
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply rebuilt
        return None


def _write_cache(site_root: Path, relative_slide: str, coords, features, fingerprint: str, mpp: float) -> None:
    out = cache_dir(site_root)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{slide_key(relative_slide)}.safetensors"
    tmp = final.with_suffix(".tmp")
    tensors = {"coords": coords}
    if features is not None:
        tensors["features"] = features.contiguous()
    save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "mpp": repr(mpp), "format": str(CACHE_FORMAT)})
    os.replace(tmp, final)  # atomic: a killed prepare leaves either the old entry or the new one


def iter_tile_batches(slide, coords: list[TileCoord], transform: Callable, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(coords), batch_size):
        chunk = coords[start : start + batch_size]
        yield torch.stack([transform(read_tile(slide, c)) for c in chunk])


@torch.no_grad()
def embed_tiles(model, slide, coords: list[TileCoord], transform, batch_size: int, ms_aug: bool) -> torch.Tensor:
    """Raw CLS features (no head, no norm) of each tile: (n, dim), or (n, 2 * dim) with multi-scale features."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for batch in iter_tile_batches(slide, coords, transform, batch_size):
        feats, _ = model(image=batch.to(device, dtype), with_head=False, out_norm=False, ms_aug=ms_aug)
        out.append(feats.float().cpu())
    dim = model.config.embed_dim * (2 if ms_aug else 1)
    return torch.cat(out) if out else torch.zeros(0, dim)


def prepare_slide(
    site_root: Path,
    relative_slide: str,
    tiling: TilingSettings,
    fingerprint: str,
    model=None,
    transform=None,
    batch_size: int = 32,
    ms_aug: bool = False,
) -> tuple[bool, int]:
    """Tile (and embed) one slide unless its cache is current. Returns (was_done_now, number_of_tiles).

    Raises SiteDataError (SlideError) when the slide cannot be read.
    """
    cached = read_cache(site_root, relative_slide)
    if cached is not None and cached.fingerprint == fingerprint:
        return False, cached.coords.shape[0]
    with open_slide(Path(site_root) / relative_slide) as slide:
        coords = tile_grid(slide, tiling.target_mpp, tiling.tile_size, tiling.min_tissue)
        features = embed_tiles(model, slide, coords, transform, batch_size, ms_aug) if model is not None else None
    table = torch.tensor([[c.level, c.x, c.y, c.size] for c in coords], dtype=torch.int64).reshape(-1, 4)
    _write_cache(site_root, relative_slide, table, features, fingerprint, tiling.target_mpp)
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
) -> PrepareResult:
    """Prepare every slide in ``slides`` (paths relative to the site root); a slide that fails is recorded with its
    reason and the others go on."""
    fingerprint = model_fingerprint(model, ms_aug, tiling)
    result = PrepareResult()
    for rel in slides:
        try:
            done, n = prepare_slide(site_root, rel, tiling, fingerprint, model, transform, batch_size, ms_aug)
        except SiteDataError as err:
            result.failed.append((rel, err.message if hasattr(err, "message") else str(err)))
        else:
            (result.prepared if done else result.up_to_date).append(rel)
            result.tiles += n
        if progress is not None:
            progress(rel)
    return result

