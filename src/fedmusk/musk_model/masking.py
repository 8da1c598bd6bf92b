"""Masks for MUSK's masked modelling: whole-word masking of text (MLM) and BEiT block-wise masking of image
patches (MIM). All randomness comes from the ``torch.Generator`` passed in, so masks are reproducible."""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = -100
# XLM-R / fairseq ids used by MUSK's tokenizer: <s> 0, <pad> 1, </s> 2
SPECIAL_IDS = (0, 1, 2)


def whole_word_mask(
    input_ids: Tensor,
    word_starts: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    special_ids: tuple[int, ...] = SPECIAL_IDS,
    first_random_id: int = 4,
) -> tuple[Tensor, Tensor]:
    """Mask whole words for masked language modelling.

    input_ids (b, T); word_starts (b, T) True where a piece starts a word (a SentencePiece piece beginning with
    U+2581). Words are a start piece and the pieces after it up to the next start; special tokens (<s>, </s>, pad)
    are never part of a word. In each text ``mask_prob`` of the words are chosen (stochastic rounding keeps the
    expected rate exact; at least one word when there is any); each piece of a chosen word becomes the mask token
    (80%), a random regular id from [first_random_id, vocab_size) other than the mask (10%), or stays (10%).

    Returns (masked input ids, labels): labels hold the original id at chosen pieces and -100 elsewhere.
    """
    if input_ids.shape != word_starts.shape:
        raise ValueError(f"word_starts {tuple(word_starts.shape)} must match input_ids {tuple(input_ids.shape)}")
    device = input_ids.device
    ids, starts = input_ids.cpu(), word_starts.cpu().bool()
    real = ~torch.isin(ids, torch.tensor(special_ids))
    # a piece after a special token starts a word even if the tokenizer did not flag it
    after_special = torch.cat([torch.ones_like(real[:, :1]), ~real[:, :-1]], dim=1)
    starts = real & (starts | after_special)
    word_id = torch.cumsum(starts.long(), dim=1) - 1  # (b, T) index of each piece's word within its text

    chosen = torch.zeros_like(real)
    for i in range(ids.shape[0]):
        n_words = int(starts[i].sum())
        if n_words == 0:
            continue
        expected = mask_prob * n_words
        k = int(math.floor(expected + torch.rand((), generator=generator).item()))
        k = min(max(k, 1), n_words)
        picked = torch.randperm(n_words, generator=generator)[:k]
        chosen[i] = real[i] & torch.isin(word_id[i], picked)

    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    u = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    # uniform over [first_random_id, vocab_size) without the mask id: draw one fewer and skip over it
    random_ids = torch.randint(first_random_id, vocab_size - 1, ids.shape, generator=generator)
    random_ids = random_ids + (random_ids >= mask_token_id).long()
    out = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    out = torch.where(to_random, random_ids, out)
    return out.to(device), labels.to(device)


def block_mask(
    batch: int,
    grid: int | tuple[int, int],
    *,
    generator: torch.Generator,
    mask_ratio: float = 0.4,
    min_block: int = 16,
    max_block: int = 100,
    min_aspect: float = 0.3,
) -> Tensor:
    """BEiT block-wise patch masks: (batch, patches) booleans, True at masked patches, row-major like the patch
    sequence, exactly round(mask_ratio * patches) masked in every sample (230 of 576 for MUSK at 384 pixels).

    Blocks of ``min_block`` to ``max_block`` patches with aspect ratio log-uniform in [min_aspect, 1/min_aspect]
    are placed at random until the count is reached. On small grids the minimum block shrinks to a quarter of the
    masked count (a 6x6 grid masks 14 patches in blocks of 3 or more), since a 16-patch block could not fit.
    Blocks that would overshoot are retried; if ten tries in a row add nothing, the remainder is filled with
    random single patches so that the count is exact.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    n = h * w
    target = int(round(mask_ratio * n))
    low = max(1, min(min_block, target // 4))
    high = max(low, min(max_block, target))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masks = torch.zeros(batch, h, w, dtype=torch.bool)

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=generator).item()

    for mask in masks:
        count = 0
        while count < target:
            added = 0
            for _ in range(10):
                area = uniform(low, min(high, max(low, target - count)))
                aspect = math.exp(uniform(*log_aspect))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if not (1 <= bh <= h and 1 <= bw <= w):
                    continue
                top = int(torch.randint(0, h - bh + 1, (), generator=generator))
                left = int(torch.randint(0, w - bw + 1, (), generator=generator))
                region = mask[top : top + bh, left : left + bw]
                new = int((~region).sum())
                if 0 < new <= target - count:
                    region.fill_(True)
                    added = new
                    break
            if added == 0:
                free = (~mask).flatten().nonzero().flatten()
                fill = free[torch.randperm(free.numel(), generator=generator)[: target - count]]
                mask.view(-1)[fill] = True
                added = fill.numel()
            count += added
    return masks.view(batch, n)
