"""A site's continued-pretraining data, read from ``<site_root>/pretrain/``.

The layout is the one ``fedmusk validate`` checks (``fedmusk.data.site.validate_pretrain``):

- ``images/``: unpaired tissue tiles (.png, .jpg, .jpeg, in any sub-folder), for masked image modelling;
- ``text/``: unpaired pathology text, ``.txt`` (one document per file) and ``.jsonl`` (one JSON object a line
  with a ``"text"`` field, each a document), for masked language modelling;
- ``pairs.csv``: image-caption pairs (columns ``image``, ``caption``; ``image`` relative to ``pretrain/``) for
  contrastive alignment. The image may also be a slide, which is then seen whole as a thumbnail.

Every part is optional; an objective without data is skipped at that site. Files are listed when the folder is read
and decoded when a batch needs them; either way an unreadable file raises ``SiteDataError`` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedmusk.data.errors import SiteDataError
from fedmusk.data.site.pairs import read_pairs
from fedmusk.data.site.reports import NO_TEXT, NOT_JSON, jsonl_documents, read_report
from fedmusk.training.cohort import assign_split

PRETRAIN_DIR = "pretrain"
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".txt", ".jsonl")
DEFAULT_MAX_WORDS = 48  # about 70 SentencePiece tokens: a segment fits MUSK's usual 100-token text length

# A sentence ends at . ! ? followed by space and an upper-case letter or digit; "3.3 cm" and "e.g. the" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class PretrainImage:
    """An image file of a site's pretrain/ folder. ``name`` is its path relative to the site root (for messages
    and as the key of its split)."""

    path: Path
    name: str

    def read(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB. Raises SiteDataError naming the file when it cannot be decoded."""
        return read_pretrain_image(self.path, self.name)


@dataclass(frozen=True)
class PretrainPair:
    image: PretrainImage
    caption: str


@dataclass
class PretrainData:
    """What one or more sites' pretrain/ folders hold, in a fixed order (sorted file names, file order within)."""

    images: list[PretrainImage] = field(default_factory=list)  # unpaired tiles (MIM)
    texts: list[str] = field(default_factory=list)  # unpaired text segments (MLM)
    pairs: list[PretrainPair] = field(default_factory=list)  # image-caption pairs (CLIP + auxiliary MLM)

    def __add__(self, other: PretrainData) -> PretrainData:
        return PretrainData(self.images + other.images, self.texts + other.texts, self.pairs + other.pairs)

    def __len__(self) -> int:
        return len(self.images) + len(self.texts) + len(self.pairs)

    def split(self, name: str, seed: int, val_fraction: float, test_fraction: float) -> PretrainData:
        """The items of split ``name`` ("train", "val" or "test"), assigned as cases are (``assign_split``): by a
        hash of the image's file name or the text itself, so a tile is held out from MIM and CLIP alike and the
        assignment does not depend on what else the folder holds."""

        def keep(key: str) -> bool:
            return assign_split(key, seed, val_fraction, test_fraction) == name

        return PretrainData(
            images=[im for im in self.images if keep(im.name)],
            texts=[t for t in self.texts if keep(t)],
            pairs=[p for p in self.pairs if keep(p.image.name)],
        )


def read_pretrain_folder(site_root: str | Path, max_words: int = DEFAULT_MAX_WORDS) -> PretrainData:
    """Everything in ``<site_root>/pretrain`` (nothing when the folder or a part of it is missing or empty).

    Texts are split into segments of whole sentences, at most ``max_words`` words where sentences allow, never
    across a paragraph (blank line) or a document. Pairs with an empty caption are skipped, as validation warns.
    Raises SiteDataError naming the file (and row or line) for text that cannot be read, a .jsonl line that is
    not a JSON object with a "text" string, a pairs.csv without its columns, and pair images that are missing or
    outside the pretrain folder. Images are decoded later, by ``PretrainImage.read``.
    """
    site_root = Path(site_root)
    folder = site_root / PRETRAIN_DIR
    if not folder.is_dir():
        return PretrainData()
    data = PretrainData()
    images = folder / "images"
    if images.is_dir():
        data.images = [_image(site_root, f) for f in _files(images) if f.suffix.lower() in RASTER_SUFFIXES]
    texts = folder / "text"
    if texts.is_dir():
        for f in _files(texts):
            if f.suffix.lower() in TEXT_SUFFIXES:
                for document in _documents(site_root, f):
                    data.texts += split_document(document, max_words)
    if (folder / "pairs.csv").is_file():
        data.pairs = _read_pairs(site_root)
    return data


def split_document(text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Segments of ``text`` for masked language modelling.

    Paragraphs (separated by blank lines) are split into sentences, at line breaks too (reports are often one
    statement a line); consecutive sentences are packed into segments of at most ``max_words`` words. A single
    longer sentence is a segment of its own (the tokenizer truncates it).
    """
    segments = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        sentences = [s.strip() for line in paragraph.split("\n") for s in _SENTENCE_END.split(line)]
        current: list[str] = []
        words = 0
        for sentence in filter(None, sentences):
            n = len(sentence.split())
            if current and words + n > max_words:
                segments.append(" ".join(current))
                current, words = [], 0
            current.append(sentence)
            words += n
        if current:
            segments.append(" ".join(current))
    return segments


def read_pretrain_image(path: Path, name: str | None = None) -> np.ndarray:
    """An image (or a slide's thumbnail) as (H, W, 3) uint8 RGB; SiteDataError naming ``name`` (default: the
    path) when it cannot be read."""
    name = name or str(path)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return _slide_thumbnail(path, name)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise SiteDataError("image not found", path=name) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SiteDataError(f"cannot be read as an image ({type(err).__name__}: {err})", path=name) from None


# -- helpers -----------------------------------------------------------------------------------------------------------

SLIDE_THUMBNAIL_PX = 1024


def _slide_thumbnail(path: Path, name: str) -> np.ndarray:
    from fedmusk.data.slides import open_slide

    try:
        with open_slide(path) as slide:
            return slide.thumbnail(SLIDE_THUMBNAIL_PX)
    except SiteDataError as err:
        raise SiteDataError(err.message, path=name) from None


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))


def _image(site_root: Path, path: Path) -> PretrainImage:
    return PretrainImage(path, path.relative_to(site_root).as_posix())


def _documents(site_root: Path, path: Path) -> list[str]:
    name = path.relative_to(site_root).as_posix()
    try:
        content = read_report(path)
    except SiteDataError as err:
        raise SiteDataError(err.message, path=name) from None
    if path.suffix.lower() == ".txt":
        return [content]
    documents = []
    for n, text, why in jsonl_documents(content):
        if why == NOT_JSON:
            raise SiteDataError(f"line {n} is not valid JSON", path=name)
        if why == NO_TEXT:
            raise SiteDataError(f'line {n} has no "text" string (each line must be a JSON object with "text")',
                                path=name, field="text")  # fmt: skip
        documents.append(text)
    return documents


def _read_pairs(site_root: Path) -> list[PretrainPair]:
    rows = read_pairs(site_root / PRETRAIN_DIR, strict=True).pairs
    return [PretrainPair(_image(site_root, site_root / PRETRAIN_DIR / p.image), p.caption) for p in rows]
