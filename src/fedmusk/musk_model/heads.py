"""Task heads on MUSK features: gated-attention MIL over tiles, case-level fusion of slides and report, and the
survival and response heads with their helpers (time discretisation, risk scores, survival curves).

All heads are small plain modules; attach them to the adapter with ``apply_lora(..., extra_trainable={...})`` so
that they train, are saved and are exchanged with the LoRA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSION_MODES = ("concat", "gated", "image", "report")


def pad_bags(bags: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack bags of different sizes, each (n_i, dim): returns tiles (b, n_max, dim) and padding (b, n_max), True
    at padded slots."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    n_max = max(bag.shape[0] for bag in bags)
    tiles = bags[0].new_zeros(len(bags), n_max, bags[0].shape[-1])
    padding = torch.ones(len(bags), n_max, dtype=torch.bool, device=bags[0].device)
    for i, bag in enumerate(bags):
        tiles[i, : bag.shape[0]] = bag
        padding[i, : bag.shape[0]] = False
    return tiles, padding


def pack_cases(cases: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """Cases given as lists of slides, each slide (tiles, dim): all tiles of a case form one bag, padded across
    cases as in ``pad_bags``."""
    return pad_bags([torch.cat(list(slides), dim=0) for slides in cases])


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))),
    slide embedding z = sum_k a_k h_k.

    embed_dim: optionally project tiles first (Linear + ReLU + dropout) to this size; z then has that size.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.0, embed_dim: int | None = None):
        super().__init__()
        self.project = (
            nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout)) if embed_dim else nn.Identity()
        )
        self.out_dim = embed_dim or in_dim
        self.attention_V = nn.Linear(self.out_dim, hidden)
        self.attention_U = nn.Linear(self.out_dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tiles: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tiles (b, n, in_dim), padding_mask (b, n) True at padded tiles -> embedding (b, out_dim) and attention
        (b, n) summing to 1 over each bag's real tiles, 0 at padding."""
        if tiles.dim() != 3:
            raise ValueError(f"tiles must be (bags, tiles, dim), got shape {tuple(tiles.shape)}")
        h = self.project(tiles)
        gate = torch.tanh(self.attention_V(h)) * torch.sigmoid(self.attention_U(h))
        scores = self.attention_w(self.dropout(gate)).squeeze(-1)  # (b, n)
        if padding_mask is not None:
            empty = padding_mask.all(dim=1)
            if empty.any():
                raise ValueError(f"bags {empty.nonzero().flatten().tolist()} have no tiles")
            scores = scores.masked_fill(padding_mask, float("-inf"))
        attention = torch.softmax(scores.float(), dim=1).to(h.dtype)
        return torch.einsum("bn,bnd->bd", attention, h), attention


class CaseFusion(nn.Module):
    """A case embedding from its slides' tiles (one gated-attention bag over all tiles of all slides) and its
    report embedding.

    mode: "concat" (projected image and report embeddings side by side, out_dim = 2 * dim), "gated"
    (g * image + (1 - g) * report with g = sigmoid(Linear[image, report]), out_dim = dim), or the ablations
    "image" and "report" (one modality only, out_dim = dim).
    """

    def __init__(
        self,
        tile_dim: int,
        report_dim: int,
        dim: int = 128,
        mode: str = "concat",
        mil_hidden: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; choose one of {list(FUSION_MODES)}")
        self.mode = mode
        self.uses_image = mode != "report"
        self.uses_report = mode != "image"
        if self.uses_image:
            self.mil = GatedAttentionMIL(tile_dim, mil_hidden, dropout)
            self.image_proj = nn.Sequential(nn.Linear(tile_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        if self.uses_report:
            self.report_proj = nn.Sequential(nn.Linear(report_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        if mode == "gated":
            self.gate = nn.Linear(2 * dim, dim)
        self.out_dim = 2 * dim if mode == "concat" else dim

    def forward(
        self, tiles: Tensor | None = None, padding_mask: Tensor | None = None, report: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """tiles (b, n, tile_dim) with padding_mask (b, n), report (b, report_dim) -> case embedding (b, out_dim)
        and the tile attention (b, n), None in report-only mode. Inputs the mode does not use may be None."""
        image = rep = attention = None
        if self.uses_image:
            if tiles is None:
                raise ValueError(f"fusion mode {self.mode!r} needs tiles")
            pooled, attention = self.mil(tiles, padding_mask)
            image = self.image_proj(pooled)
        if self.uses_report:
            if report is None:
                raise ValueError(f"fusion mode {self.mode!r} needs a report embedding")
            rep = self.report_proj(report)
        if self.mode == "image":
            return image, attention
        if self.mode == "report":
            return rep, None
        both = torch.cat([image, rep], dim=-1)
        if self.mode == "concat":
            return both, attention
        g = torch.sigmoid(self.gate(both))
        return g * image + (1 - g) * rep, attention


class SurvivalHead(nn.Module):
    """Hazard logits over discrete time bins: (n, dim) -> (n, n_bins); hazard_k = sigmoid(logit_k)."""

    def __init__(self, dim: int, n_bins: int = 4):
        super().__init__()
        self.linear = nn.Linear(dim, n_bins)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class ResponseHead(nn.Module):
    """One logit per case for a binary outcome (response, relapse): (n, dim) -> (n,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


def survival_bin_edges(times: Tensor, events: Tensor, n_bins: int) -> Tensor:
    """Bin edges (n_bins + 1,) at the quantiles of the uncensored times; the first edge is 0 and the last +inf so
    that every time, censored or later, falls in a bin.

    In federated training compute the edges once (pooled or agreed) and pass them to every site: bins must mean
    the same thing everywhere for hazards to be averaged.
    """
    observed = times[events.bool()].double()
    if observed.numel() < n_bins:
        raise ValueError(f"{observed.numel()} uncensored times cannot define {n_bins} quantile bins")
    inner = torch.quantile(observed, torch.arange(1, n_bins, dtype=torch.float64) / n_bins)
    return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), float("inf"))]).to(times.dtype)


def discretize_times(
    times: Tensor, events: Tensor, n_bins: int = 4, edges: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Bin index (n,) of each time, with bin k = [edges[k], edges[k+1]), and the edges used (computed by
    ``survival_bin_edges`` from these times unless given)."""
    if edges is None:
        edges = survival_bin_edges(times, events, n_bins)
    index = torch.bucketize(times, edges[1:-1].to(times.dtype), right=True)
    return index, edges


def survival_probabilities(logits: Tensor) -> Tensor:
    """S_k = P(survive past bin k) = prod_{j<=k} (1 - hazard_j): (n, n_bins)."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=-1))


def bins_to_risk(logits: Tensor) -> Tensor:
    """Risk score (n,), higher = earlier event: minus the sum of the survival probabilities over the bins (the
    restricted expected survival in bin units), as used for the concordance index."""
    return -survival_probabilities(logits).sum(dim=-1)


def survival_curve(logits: Tensor, times: Tensor, edges: Tensor) -> Tensor:
    """S(t) for each case and each evaluation time: (n, m), for the Brier score.

    Events are taken to happen at the end of their bin: S(t) = S_{k-1} for t in bin k (S_{-1} = 1).
    """
    survival = survival_probabilities(logits)
    padded = torch.cat([survival.new_ones(survival.shape[0], 1), survival], dim=1)  # (n, n_bins + 1)
    index = torch.bucketize(times.to(edges.dtype), edges[1:-1], right=True)  # bin of each time
    return padded[:, index]
