"""What the coordinator records about a round: ``RoundRecord`` (one per round in ``rounds.json`` and in each
checkpoint), the console line of a finished round, the case-weighted mean of the sites' metrics, and the site names
and error texts as they go into the record.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedmusk.wire import OUTCOME, PRETRAIN


@dataclass
class RoundRecord:
    """What happened in one round (``rounds.json`` holds one per round, and the checkpoint carries them)."""

    round: int
    phase: str = OUTCOME  # "pretrain": the metrics are objective losses (val_loss, val_mlm, ...), not C-index
    sampled: int = 0
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    train_loss: dict[str, float] = field(default_factory=dict)  # per site
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation metrics per site
    aggregated: dict[str, float] = field(default_factory=dict)  # evaluation metrics, case-weighted over sites
    eval_failures: list[str] = field(default_factory=list)
    update_norm: float = 0.0  # L2 norm of the aggregated update (before the server optimiser)
    dp_epsilon: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_per_client: float = 0.0
    seconds: float = 0.0


COUNT_METRICS = ("n", "n_events", "n_positive")  # summed over sites; the other metrics are averaged
# One INFO line per finished round (``round_line``); simulations and the demo print it, nothing else does by default.
ROUND_LOG = logging.getLogger("fedmusk.rounds")


def round_line(record: RoundRecord, total_rounds: int) -> str:
    """One line per round for a console: phase, replies, the validation metric, traffic and time."""
    agg = record.aggregated
    if record.phase == PRETRAIN:
        metric = f"val loss {agg['val_loss']:.3f}" if "val_loss" in agg else "val n/a"
    elif "val_c_index" in agg:
        metric = f"val C-index {agg['val_c_index']:.3f}"
    elif "val_auc" in agg:
        metric = f"val AUROC {agg['val_auc']:.3f}"
    else:
        metric = "val n/a"
    return (
        f"round {record.round}/{total_rounds} {record.phase}: {record.replies}/{record.sampled} replies, {metric} "
        f"(site mean), {record.bytes_up / 1e6:.2f} MB up, {record.bytes_down / 1e6:.2f} MB down, {record.seconds:.1f} s"
    )


def weighted_site_mean(per_site: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Across sites: each ``<split>_<metric>`` averaged over the sites that report it, weighted by their
    ``<split>_n`` cases; case counts (``<split>_n``, ``_n_events``, ``_n_positive``, ``excluded_<reason>``) summed;
    confidence limits (``_lo``/``_hi``) left out (they do not average)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in per_site.values():
        for key, value in metrics.items():
            if key.endswith(("_lo", "_hi")) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            split, _, metric = key.partition("_")
            count = metric in COUNT_METRICS or split == "excluded"  # excluded_<reason>: cases, summed
            w = 1.0 if count else float(metrics.get(f"{split}_n", 0) or 0)
            if w > 0:
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + (0.0 if count else w)
    return {k: sums[k] / weights[k] if weights[k] else sums[k] for k in sorted(sums)}


def site_error_text(reason: str) -> str:
    """A site's own (scrubbed) error message out of an error reply, without the runtime's wrapping (Flower's
    "Exception ... occurred. Message: ..." and, in simulation, Ray's traceback)."""
    found = re.findall(r"Message: (.+)", reason)
    text = found[-1] if found else (reason.strip().splitlines() or [""])[0]
    return text.strip()[:500]


def unique_site_names(names: Iterable[str]) -> list[str]:
    """Site names as reported, with "#2", "#3" added to repeats so that no site's metrics overwrite another's."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out
