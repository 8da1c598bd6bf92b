"""Reading a slide's tiles as model-ready batches: adjacent tiles read as one strip, optional worker processes that
each open the slide themselves, batches in grid order, pixels moved as uint8."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from fedmusk.data.errors import SiteDataError, SlideError
from fedmusk.data.slides import Slide, open_slide
from fedmusk.data.slides.tiles import TileCoord, read_tile, region_extent
from fedmusk.musk_model.transforms import MUSK_MEAN, MUSK_STD, MuskTransform

_MAX_RUN = 16  # grid tiles read as one strip, at most


def read_tile_batch(slide: Slide, coords: list[TileCoord], transform: Callable) -> torch.Tensor:
    """(b, 3, H, W): the very values of ``torch.stack([transform(read_tile(slide, c)) for c in coords])``, faster.

    Adjacent grid tiles of a row that need no resampling are read as one strip (one decoder call instead of one per
    tile, which is most of the cost of small tiles from DICOM), and tiles already at MuskTransform's size are
    normalised as one uint8 batch instead of one PIL round trip each. Raises SlideError when the file is damaged.
    """
    return _model_input(_tile_pixels(slide, coords, transform))


def _tile_pixels(slide: Slide, coords: list[TileCoord], transform: Callable) -> torch.Tensor:
    """The tiles as one uint8 (b, H, W, 3) batch when they are at MuskTransform's size (normalised later, where the
    batch is used: it travels between processes and to a GPU at a quarter of the float size); otherwise the
    transformed float (b, 3, H, W) batch."""
    if getattr(slide, "image_boxes", None) is not None:  # a folder of tile images: each tile is read on its own
        tiles = [read_tile(slide, c) for c in coords]
    else:
        tiles, i = [], 0
        while i < len(coords):
            c, extent = coords[i], region_extent(slide, coords[i])
            if extent != c.size:
                tiles.append(read_tile(slide, c))
                i += 1
                continue
            run = 1
            while run < _MAX_RUN and i + run < len(coords) and coords[i + run] == TileCoord(
                c.level, c.x + run * extent, c.y, c.size, c.mpp
            ):
                run += 1
            strip = slide.read_region(c.level, c.x, c.y, run * extent, extent)
            tiles += [strip[:, k * extent : (k + 1) * extent] for k in range(run)]
            i += run
    size = getattr(transform, "img_size", None)
    if isinstance(transform, MuskTransform) and all(t.shape == (size, size, 3) for t in tiles):
        return torch.from_numpy(np.stack(tiles))
    return torch.stack([transform(np.ascontiguousarray(t)) for t in tiles])


def _model_input(batch: torch.Tensor) -> torch.Tensor:
    """MuskTransform's normalisation of a uint8 (b, H, W, 3) batch, on the batch's device (resizing and cropping
    are no-ops at the model's size); a float batch is already transformed."""
    if batch.dtype != torch.uint8:
        return batch
    x = batch.permute(0, 3, 1, 2).contiguous().float()  # reorder the bytes, not the floats: 4x less to move
    mean = torch.tensor(MUSK_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(MUSK_STD, device=batch.device).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


class SlideTileBatches(torch.utils.data.Dataset):
    """Batches of tiles of one slide, for a DataLoader with ``batch_size=None``: item ``i`` holds tiles
    ``i * batch_size ...`` as uint8 pixels or transformed floats (see ``_tile_pixels``).

    The slide is opened lazily, once per process, so each DataLoader worker reads through its own handle. A slide
    error is returned as the item (not raised) so that the main process re-raises it unchanged; a worker would
    otherwise wrap it in its traceback text.
    """

    def __init__(self, path: str | Path, coords: list[TileCoord], transform: Callable, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path, self.coords, self.transform, self.batch_size = str(path), list(coords), transform, batch_size
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return -(-len(self.coords) // self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor | SiteDataError:
        chunk = self.coords[index * self.batch_size : (index + 1) * self.batch_size]
        try:
            if self._slide is None:
                self._slide = open_slide(self.path)
            return _tile_pixels(self._slide, chunk, self.transform)
        except SiteDataError as err:
            return err

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self) -> dict:  # never ship an open handle to a worker
        return {**self.__dict__, "_slide": None}


def iter_tile_batches(
    slide: Slide | str | Path,
    coords: list[TileCoord],
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """(b, 3, H, W) batches of ``transform(read_tile(slide, c))`` in the order of ``coords`` (see read_tile_batch),
    on ``device`` (default: the CPU).

    ``slide`` is an open Slide (read in this process) or a slide path; with a path and ``num_workers > 0``,
    ``num_workers`` DataLoader processes read the tiles, each through its own handle. Raises SlideError (naming the
    file) when the slide cannot be read, also when a reader process dies on a damaged file.
    """
    device = torch.device(device or "cpu")
    for batch in _raw_batches(slide, coords, transform, batch_size, num_workers, device.type == "cuda"):
        yield _model_input(batch.to(device, non_blocking=True))


def _raw_batches(slide, coords, transform, batch_size: int, num_workers: int, pin_memory: bool):
    if isinstance(slide, Slide) or num_workers == 0:
        own = None if isinstance(slide, Slide) else open_slide(slide)
        source = slide if own is None else own
        try:
            for start in range(0, len(coords), batch_size):
                yield _tile_pixels(source, coords[start : start + batch_size], transform)
        finally:
            if own is not None:
                own.close()
        return
    if not coords:
        return
    dataset = SlideTileBatches(slide, coords, transform, batch_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=2, collate_fn=_keep,
    )  # fmt: skip
    batches = iter(loader)
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:  # a worker killed by a crash in a native decoder
            raise SlideError(f"a tile reader process failed while decoding this slide; the file is probably "
                             f"damaged ({err})", path=slide) from err  # fmt: skip
        if isinstance(item, SiteDataError):
            raise item
        yield item


def _keep(item):
    return item
