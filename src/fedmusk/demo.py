"""``fedmusk demo`` and ``fedmusk embed``: what runs end to end today, on real tissue images."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from fedmusk.config import FedMuskConfig
from fedmusk.musk_model.zeroshot import image_text_similarity
from fedmusk.runtime import load_model, load_tokenizer, resolve_device, seed_everything

DEMO_TEXTS = (
    "invasive adenocarcinoma of the lung with acinar pattern",
    "squamous cell carcinoma with keratin pearls",
    "benign lymph node without metastatic carcinoma",
    "immunohistochemical stain showing nuclear positivity in tumour cells",
)


def demo_images() -> list[tuple[str, np.ndarray]]:
    """Real tissue: the release's lung adenocarcinoma tile when FEDMUSK_REFERENCE_DIR holds it, and tiles of the
    immunohistochemistry image that scikit-image ships."""
    from skimage import data

    images = []
    ref = os.environ.get("FEDMUSK_REFERENCE_DIR")
    if ref and (Path(ref) / "lungaca1014.jpeg").is_file():
        images.append(("lungaca1014.jpeg", np.asarray(Image.open(Path(ref) / "lungaca1014.jpeg").convert("RGB"))))
    ihc = data.immunohistochemistry()  # (512, 512, 3) uint8, a real IHC-stained section
    for i, (y, x) in enumerate([(0, 0), (256, 256)]):
        images.append((f"skimage-ihc-{i}", ihc[y : y + 256, x : x + 256]))
    return images


def read_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise FileNotFoundError(f"{path}: not a readable image ({err})") from None


def similarity_for_files(cfg: FedMuskConfig, paths: Sequence[Path], texts: Sequence[str]):
    seed_everything(cfg.seed)
    model = load_model(cfg.model, resolve_device(cfg.device), cfg.seed)
    return image_text_similarity(
        model, load_tokenizer(cfg.model), [read_image(p) for p in paths], texts, cfg.model.max_text_len
    )


def print_similarity_table(console: Console, names, texts, sims: torch.Tensor, probs: torch.Tensor) -> None:
    table = Table(title="image-text similarity (cosine; probability over the texts)")
    table.add_column("image")
    for t in texts:
        table.add_column(t if len(t) <= 40 else t[:37] + "...", justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(f"{sims[i, j]:+.3f} ({probs[i, j]:.2f})" for j in range(len(texts))))
    console.print(table)


def run_demo(cfg: FedMuskConfig, console: Console) -> None:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"MUSK preset [bold]{cfg.model.preset}[/] ({n_params:,} parameters, "
        f"{'released weights' if cfg.model.weights else 'random weights, seed %d' % cfg.seed}) on {device}"
    )
    names, images = zip(*demo_images())
    start = time.perf_counter()
    sims, probs = image_text_similarity(model, tokenizer, images, DEMO_TEXTS, cfg.model.max_text_len)
    elapsed = time.perf_counter() - start
    print_similarity_table(console, names, DEMO_TEXTS, sims, probs)
    console.print(f"embedded {len(images)} images and {len(DEMO_TEXTS)} texts in {elapsed:.2f} s")
