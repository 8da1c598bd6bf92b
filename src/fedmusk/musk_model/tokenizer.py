"""MUSK's text tokenizer: the release's SentencePiece model with XLM-R/fairseq ids, read without transformers.

MUSK encodes text with transformers 4.x's slow ``XLMRobertaTokenizer``. This module reproduces that encoding exactly
(checked against fixtures made with transformers 4.49) on top of the ``sentencepiece`` package alone, because
transformers 5.x's XLMRobertaTokenizer can silently ignore the vocabulary file.

Id convention (fairseq): id = sentencepiece id + 1, except <s>=0, <pad>=1, </s>=2, <unk>=3 and <mask>=len(spm)+1.
The special-token strings written literally in a text ("<s>", "</s>", "<pad>", "<unk>", "<mask>") become their
special ids, as in the reference; "<mask>" also swallows the whitespace on its left.

The tiny tokenizer (``tiny_tokenizer``) is a 1,000-piece model trained in well under a second on a bundled corpus of
invented pathology report sentences, so tests and demos never need the release file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import sentencepiece as spm
import torch

__all__ = [
    "EncodedText",
    "MuskTokenizer",
    "tiny_tokenizer",
    "train_tiny_tokenizer",
]

_WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁": a piece that starts with it starts a new word
_SPM_LAYOUT = {"unk": 0, "bos": 1, "eos": 2}  # the release's special pieces; the fairseq id shift assumes them

# Text-literal special tokens are cut out before SentencePiece sees the text. None is a substring of another, so a
# regex alternation finds the same leftmost matches as the reference's trie.
_SPECIAL_LITERAL = re.compile("(<s>|</s>|<pad>|<unk>|<mask>)")


@dataclass(frozen=True)
class EncodedText:
    """One text encoded to a fixed length.

    ``ids``: <s>, pieces (truncated to max_len - 2), </s>, then <pad> up to max_len.
    ``padding_mask``: 1 at pads, 0 elsewhere (MUSK's convention, the opposite of an attention mask).
    ``word_starts``: True where a text piece begins a word; False for every special id (<s>, </s>, <pad>,
    <mask>/<unk> written literally in the text), so whole-word masking never selects them.
    """

    ids: list[int]
    padding_mask: list[int]
    word_starts: list[bool]


class MuskTokenizer:
    """MUSK's tokenizer, backed by a SentencePiece model file (the release's ``tokenizer.spm`` or the tiny one).

    ``tok(text, max_len=100)`` returns ``(ids, padding_mask)`` exactly as MUSK's reference code builds them.
    """

    bos_token_id = 0
    pad_token_id = 1
    eos_token_id = 2
    unk_token_id = 3

    def __init__(self, spm_path: str | os.PathLike[str]) -> None:
        """Load ``spm_path``.

        Raises FileNotFoundError when the file does not exist, and ValueError (naming the file) when it is not a
        SentencePiece model or its special pieces are not laid out as <unk>=0, <s>=1, </s>=2 like the release's.
        """
        self.path = Path(spm_path)
        self._sp = _load_sentencepiece(self.path)
        self._literal_ids = {
            "<s>": self.bos_token_id,
            "<pad>": self.pad_token_id,
            "</s>": self.eos_token_id,
            "<unk>": self.unk_token_id,
            "<mask>": self.mask_token_id,
        }

    def __repr__(self) -> str:
        return f"MuskTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def mask_token_id(self) -> int:
        """Id of <mask>: one past the last shifted SentencePiece id (64001 for the release)."""
        return len(self._sp) + 1

    @property
    def vocab_size(self) -> int:
        """Number of ids, <mask> included: len(spm) + 2 (64002 for the release)."""
        return len(self._sp) + 2

    def __call__(self, text: str, max_len: int = 100) -> tuple[list[int], list[int]]:
        """Encode ``text`` to ``(ids, padding_mask)``, both of length ``max_len``; see ``EncodedText``.

        Raises ValueError when max_len < 2 (there must be room for <s> and </s>), TypeError when text is not a str.
        """
        encoded = self.encode_with_word_starts(text, max_len)
        return encoded.ids, encoded.padding_mask

    def encode_with_word_starts(self, text: str, max_len: int = 100) -> EncodedText:
        """Like ``tok(text, max_len)``, plus flags for the positions that start a word (for whole-word MLM)."""
        _check_max_len(max_len)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        pieces = self._pieces(text)[: max_len - 2]
        ids = [self.bos_token_id, *(piece_id for piece_id, _ in pieces), self.eos_token_id]
        starts = [False, *(starts_word for _, starts_word in pieces), False]
        n_pad = max_len - len(ids)
        return EncodedText(
            ids=ids + [self.pad_token_id] * n_pad,
            padding_mask=[0] * len(ids) + [1] * n_pad,
            word_starts=starts + [False] * n_pad,
        )

    def encode_batch(self, texts: Iterable[str], max_len: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode several texts: ``(ids, padding_mask)``, two int64 tensors of shape (n_texts, max_len).

        Raises TypeError when given a single str (which would otherwise be encoded character by character).
        """
        ids, padding_mask, _ = self.encode_batch_with_word_starts(texts, max_len)
        return ids, padding_mask

    def encode_batch_with_word_starts(
        self, texts: Iterable[str], max_len: int = 100
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like ``encode_batch``, plus ``word_starts``: a bool tensor (n_texts, max_len), see ``EncodedText``."""
        _check_max_len(max_len)
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, not a single str; use tok(text) for one text")
        rows = [self.encode_with_word_starts(text, max_len) for text in texts]
        shape = (len(rows), max_len)  # explicit, so that no texts still gives (0, max_len)
        return (
            torch.tensor([row.ids for row in rows], dtype=torch.long).reshape(shape),
            torch.tensor([row.padding_mask for row in rows], dtype=torch.long).reshape(shape),
            torch.tensor([row.word_starts for row in rows], dtype=torch.bool).reshape(shape),
        )

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text.

        <s>, </s>, <pad> and <mask> are dropped, or written as their strings when ``skip_special_tokens`` is False;
        <unk> reads as SentencePiece's " ⁇ ". Raises ValueError for an id outside [0, vocab_size).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        names = {v: k for k, v in self._literal_ids.items() if k != "<unk>"}
        parts: list[str] = []
        run: list[int] = []  # consecutive text ids, decoded together so SentencePiece rejoins words
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
            if token_id in names:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(names[token_id])
            else:
                run.append(self._sp.unk_id() if token_id == self.unk_token_id else token_id - 1)
        if run:
            parts.append(self._sp.decode(run))
        return " ".join(part for part in parts if part)

    def _pieces(self, text: str) -> list[tuple[int, bool]]:
        """All pieces of ``text`` as (fairseq id, starts a word), before <s>/</s> and truncation."""
        pieces: list[tuple[int, bool]] = []
        for chunk in _split_special_literals(text):
            if chunk in self._literal_ids:
                pieces.append((self._literal_ids[chunk], False))
                continue
            # Each chunk is encoded on its own, as the reference does: every chunk gets its own leading "▁".
            for piece in self._sp.encode(chunk, out_type="immutable_proto").pieces:
                piece_id = self.unk_token_id if piece.id == self._sp.unk_id() else piece.id + 1
                pieces.append((piece_id, piece.piece.startswith(_WORD_BOUNDARY)))
        return pieces


def _split_special_literals(text: str) -> list[str]:
    """Cut ``text`` into plain chunks and special-token literals, as the slow XLM-R tokenizer does.

    <mask> is registered with lstrip=True there, so the chunk on its left loses its trailing whitespace (Python's
    notion of whitespace: this matters for characters such as U+0085 that SentencePiece keeps as text).
    """
    chunks = [chunk for chunk in _SPECIAL_LITERAL.split(text) if chunk]
    for i in range(1, len(chunks)):
        if chunks[i] == "<mask>":
            chunks[i - 1] = chunks[i - 1].rstrip()
    return [chunk for chunk in chunks if chunk]


def _check_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 to hold <s> and </s>, got {max_len}")


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    """Read a SentencePiece model, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece tokenizer file not found: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as error:  # sentencepiece reports a malformed model as RuntimeError
        raise ValueError(f"{path} is not a SentencePiece model ({error})") from None
    layout = {"unk": processor.unk_id(), "bos": processor.bos_id(), "eos": processor.eos_id()}
    if layout != _SPM_LAYOUT:
        raise ValueError(
            f"{path}: special pieces are {layout}, but MUSK's fairseq ids need <unk>=0, <s>=1, </s>=2 "
            "(the release's layout)"
        )
    return processor


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizer for tests and demos
# ----------------------------------------------------------------------------------------------------------------

# Trainer settings copied from the release model's trainer_spec, except those that only matter for a huge corpus
# (threads, sampling, shuffling): a single thread over every sentence makes training reproducible.
_TINY_TRAINER_SPEC = {
    "model_type": "unigram",
    "normalization_rule_name": "nmt_nfkc",
    "character_coverage": 0.99999,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "max_sentencepiece_length": 16,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "split_digits": False,
    "byte_fallback": False,
    "hard_vocab_limit": True,
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "self_test_sample_size": 0,
}
_TINY_SEED = 0
_TINY_FORMAT_VERSION = 1  # bump when training settings change, so stale cached models are not reused


def train_tiny_tokenizer(out_path: str | os.PathLike[str], vocab_size: int = 1000) -> Path:
    """Train a small unigram SentencePiece model on the bundled report corpus and write it to ``out_path``.

    Returns the path written. The model has the release's normaliser and special-piece layout, so
    ``MuskTokenizer(path)`` treats it like the release (vocab_size + 2 ids). Same inputs give the same model.
    Raises RuntimeError from sentencepiece when vocab_size is too large for the corpus (about 2,000 is the limit).
    """
    out_path = Path(out_path)
    lines = _tiny_corpus_text().splitlines()
    buffer = io.BytesIO()
    spm.set_random_generator_seed(_TINY_SEED)
    # minloglevel, not logstream: the trainer logs hundreds of lines otherwise, and logstream needs a real
    # sys.stderr file descriptor, which test runners and notebooks replace.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),  # not input=path: keeps the corpus path out of the saved model
        model_writer=buffer,
        vocab_size=vocab_size,
        minloglevel=2,
        **_TINY_TRAINER_SPEC,
    )
    _write_atomically(out_path, buffer.getvalue())
    return out_path


def tiny_tokenizer(vocab_size: int = 1000) -> MuskTokenizer:
    """A ``MuskTokenizer`` over the tiny model, trained on first use and cached on disk.

    The cache is ``$FEDMUSK_CACHE/tokenizers`` (default ``~/.cache/fedmusk``), keyed by the corpus, the training
    settings and the sentencepiece version, so editing the corpus retrains. A damaged cached file is retrained.
    """
    return _cached_tiny_tokenizer(str(_cache_dir() / "tokenizers"), vocab_size)


@functools.lru_cache(maxsize=8)
def _cached_tiny_tokenizer(cache_dir: str, vocab_size: int) -> MuskTokenizer:
    path = Path(cache_dir) / f"tiny-unigram-{vocab_size}-{_tiny_cache_key(vocab_size)}.spm"
    if path.is_file():
        try:
            return MuskTokenizer(path)
        except ValueError:
            pass  # a truncated or foreign file: fall through and retrain over it
    return MuskTokenizer(train_tiny_tokenizer(path, vocab_size))


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDMUSK_CACHE") or "~/.cache/fedmusk").expanduser()


def _tiny_corpus_text() -> str:
    return (resources.files("fedmusk.musk_model") / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8")


def _tiny_cache_key(vocab_size: int) -> str:
    digest = hashlib.sha256(_tiny_corpus_text().encode("utf-8"))
    settings = sorted(_TINY_TRAINER_SPEC.items())
    digest.update(repr((settings, vocab_size, _TINY_SEED, _TINY_FORMAT_VERSION, spm.__version__)).encode())
    return digest.hexdigest()[:16]


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
