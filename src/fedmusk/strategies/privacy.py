"""Client-level differential privacy that works under secure aggregation (DP-FedAvg, McMahan et al. 2018).

One round, where neighbouring federations differ in one site's entire data:
 1. the server picks sites: all N ("full"), each with probability q ("poisson"), or m of N ("fixed_size");
 2. each picked site clips its update to L2 norm C (``clip_update``) and enters it into the secure sum with weight 1
    (example-count weights would make the denominator depend on private data);
 3. the server adds N(0, (zC)^2) to every coordinate of the sum (``add_gaussian_noise``) and divides by the
    expected number of sites (N, m or qN), a public number -- never by the number that actually replied;
 4. ``RdpAccountant.step`` adds the round's Renyi DP; ``report(delta)`` converts the total to (epsilon, delta).

Sensitivity: a clipped update has norm <= C, so adding or removing a site moves the sum by <= C ("full" and
"poisson" are accounted under this add/remove relation); replacing a site moves it by <= 2C ("fixed_size" is
accounted under replace-one, with N public). Epsilons under the two relations are not directly comparable.

Trust: SecAgg+ hides single updates, but the server sees the sum before its noise, so the guarantee holds against
everyone who sees released adapters, and against the server only if it adds the noise honestly. ``add_local_noise``
lets each site add a share itself (distributed DP: n honest sites with std zC/sqrt(n) each give the sum std zC);
the accountant does not count it, since dropouts shrink the total and SecAgg+ rounds after the noise.
Caveats: noise must come from an unpredictable seed (pass ``generator=None`` in deployment); SecAgg+'s rounding can
move a clipped update's norm by up to sqrt(d) 2c/Q, so keep that small next to C.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from fedmusk.strategies.aggregation import SECURE_SUM_WEIGHT_KEY, StateDict, clip_by_norm, state_norm

T = TypeVar("T")
Sampling = Literal["full", "poisson", "fixed_size"]

# Renyi orders: fine below 2 (large epsilons), halves to 8, every integer to 64, then sparse.
DEFAULT_ORDERS: tuple[float, ...] = (
    *(1.0 + x / 10 for x in range(1, 10)),
    *(a / 2 for a in range(4, 16)),
    *(float(a) for a in range(8, 65)),
    *(float(a) for a in (80, 96, 128, 160, 192, 256)),
)


# --- site side -------------------------------------------------------------------------------------------------


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[StateDict, float]:
    """Scale the update to global L2 norm <= ``clip``; also return its norm before clipping (for site-local logs:
    sending it would leak)."""
    return clip_by_norm(update, clip), state_norm(update)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


def _noised(state: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None) -> StateDict:
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and non-negative, got {std}")
    g = _generator(generator)
    out: StateDict = {}
    for name, value in state.items():
        if name == SECURE_SUM_WEIGHT_KEY:  # a public count under DP (weight 1 per site): no noise
            out[name] = value
            continue
        noise = torch.randn(value.shape, generator=g, dtype=value.dtype)
        out[name] = value + std * noise.to(value.device)
    return out


def add_local_noise(
    update: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None = None
) -> StateDict:
    """Add N(0, std^2) to every value of a site's update before it leaves (see ``distributed_noise_std``)."""
    return _noised(update, std, generator)


def distributed_noise_std(noise_multiplier: float, clip: float, n_clients: int) -> float:
    """Per-site std so that ``n_clients`` sites' noise sums to std ``noise_multiplier * clip``."""
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    return noise_multiplier * clip / math.sqrt(n_clients)


# --- server side -----------------------------------------------------------------------------------------------


def add_gaussian_noise(
    summed: Mapping[str, torch.Tensor], noise_multiplier: float, clip: float, generator: torch.Generator | None = None
) -> StateDict:
    """The Gaussian mechanism on a sum of clipped updates: each value plus N(0, (noise_multiplier * clip)^2).

    ``SECURE_SUM_WEIGHT_KEY`` is left untouched. ``generator=None`` draws a fresh unpredictable seed; pass a seeded
    generator only in tests -- noise an adversary can replay protects nothing.
    """
    if noise_multiplier < 0 or clip <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and clip > 0, got {noise_multiplier}, {clip}")
    return _noised(summed, noise_multiplier * clip, generator)


def sample_clients(client_ids: Sequence[T], m: int, generator: torch.Generator | None = None) -> list[T]:
    """A uniformly random subset of ``m`` of the sites, without replacement (the "fixed_size" scheme)."""
    if not 1 <= m <= len(client_ids):
        raise ValueError(f"cannot sample {m} of {len(client_ids)} sites")
    order = torch.randperm(len(client_ids), generator=_generator(generator))[:m]
    return [client_ids[i] for i in order.tolist()]


def poisson_sample_clients(client_ids: Sequence[T], rate: float, generator: torch.Generator | None = None) -> list[T]:
    """Each site independently with probability ``rate`` (the "poisson" scheme); may return none."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must lie in (0, 1], got {rate}")
    keep = torch.rand(len(client_ids), generator=_generator(generator)) < rate
    return [c for c, k in zip(client_ids, keep.tolist(), strict=True) if k]


# --- Renyi DP of one round -------------------------------------------------------------------------------------


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    if top == math.inf:
        return math.inf
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _log_expm1(x: float) -> float:
    """log(e^x - 1) for x > 0 without overflow."""
    return x + math.log1p(-math.exp(-x))


def _poisson_log_moment(q: float, z: float, alpha: int) -> float:
    """log A_alpha of the Poisson-subsampled Gaussian at integer alpha (Mironov, Talwar, Zhang 2019, Sec. 3.3):
    A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2)); RDP = log A_alpha / (alpha - 1)."""
    terms = [
        _log_comb(alpha, k) + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * z * z)
        for k in range(alpha + 1)
    ]
    return _logsumexp(terms)


def _fixed_size_log_moment(gamma: float, z_eff: float, alpha: int) -> float:
    """Upper bound on (alpha - 1) * RDP for a mechanism with RDP eps(j) = j / (2 z_eff^2) run on a subset drawn
    without replacement with ratio gamma (Wang, Balle, Kasiviswanathan 2019, Theorem 9; eps(inf) = inf for the
    Gaussian, so both min{2, .} terms are 2)."""
    eps2 = 2 / (2 * z_eff * z_eff)
    terms = [0.0]
    if alpha >= 2:
        terms.append(
            2 * math.log(gamma) + _log_comb(alpha, 2) + min(math.log(4) + _log_expm1(eps2), eps2 + math.log(2))
        )
    for j in range(3, alpha + 1):
        eps_j = j / (2 * z_eff * z_eff)
        terms.append(j * math.log(gamma) + _log_comb(alpha, j) + (j - 1) * eps_j + math.log(2))
    return _logsumexp(terms)


def _rdp_from_log_moments(log_moment: Callable[[int], float], alpha: float) -> float:
    """RDP at ``alpha`` from log moments at integers; between integers, interpolate the log moment linearly, an
    upper bound because (alpha - 1) * RDP(alpha) is convex in alpha (and 0 at alpha = 1)."""
    lo = math.floor(alpha)
    if alpha == lo:
        return log_moment(lo) / (alpha - 1)
    t = alpha - lo
    at_lo = 0.0 if lo == 1 else log_moment(lo)
    return ((1 - t) * at_lo + t * log_moment(lo + 1)) / (alpha - 1)


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float]) -> list[float]:
    """RDP of the Gaussian mechanism with std/sensitivity ``noise_multiplier``: alpha / (2 z^2) (Mironov 2017)."""
    return [a / (2 * noise_multiplier**2) for a in orders]


def poisson_subsampled_gaussian_rdp(rate: float, noise_multiplier: float, orders: Sequence[float]) -> list[float]:
    """RDP of the Gaussian mechanism on a Poisson sample with ``rate`` (add/remove relation, sensitivity C)."""
    if rate == 1.0:
        return gaussian_rdp(noise_multiplier, orders)
    return [_rdp_from_log_moments(lambda a: _poisson_log_moment(rate, noise_multiplier, a), a) for a in orders]


def fixed_size_subsampled_gaussian_rdp(rate: float, noise_multiplier: float, orders: Sequence[float]) -> list[float]:
    """RDP bound for the Gaussian mechanism on m = rate * N sites drawn without replacement (replace-one relation).

    Replacing one site moves a sum of updates clipped to C by up to 2C, so the base mechanism's noise multiplier
    relative to its sensitivity is z / 2.
    """
    z_eff = noise_multiplier / 2
    if rate == 1.0:
        return gaussian_rdp(z_eff, orders)
    return [_rdp_from_log_moments(lambda a: _fixed_size_log_moment(rate, z_eff, a), a) for a in orders]


def round_rdp(noise_multiplier: float, sampling: Sampling, rate: float, orders: Sequence[float]) -> list[float]:
    """RDP at each order of one round of noised, clipped summation under ``sampling`` with sampling ``rate``.

    Raises ValueError for a non-positive noise multiplier, a rate outside (0, 1], "full" with a rate below 1, or an
    unknown scheme.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must lie in (0, 1], got {rate}")
    if sampling == "full":
        if rate != 1.0:
            raise ValueError(f"'full' participation has rate 1, got {rate}")
        return gaussian_rdp(noise_multiplier, orders)
    if sampling == "poisson":
        return poisson_subsampled_gaussian_rdp(rate, noise_multiplier, orders)
    if sampling == "fixed_size":
        return fixed_size_subsampled_gaussian_rdp(rate, noise_multiplier, orders)
    raise ValueError(f"unknown sampling scheme {sampling!r}; expected 'full', 'poisson' or 'fixed_size'")


def rdp_to_dp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP: epsilon = min over alpha of rdp(alpha) + log(1/delta) / (alpha - 1)
    (Mironov 2017, Proposition 3)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    candidates = [(r + math.log(1 / delta) / (a - 1), a) for a, r in zip(orders, rdp, strict=True)]
    return min(candidates)


# --- accountant ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyReport:
    """The (epsilon, delta) guarantee spent so far, the Renyi order that gave it and the rounds counted."""

    epsilon: float
    delta: float
    order: float
    rounds: int
    relation: str  # "add_remove" or "replace_one"


class RdpAccountant:
    """Adds up each round's Renyi DP at fixed orders (composition is a sum) and reports (epsilon, delta).

    One accountant covers one neighbouring relation: mixing "fixed_size" rounds with "full"/"poisson" rounds raises
    ValueError. ``state_dict()`` is JSON-serialisable and restores bit-exactly.
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        if not orders or any(not a > 1 for a in orders):
            raise ValueError("Renyi orders must all be > 1")
        self.orders = [float(a) for a in orders]
        self.rdp = [0.0] * len(self.orders)
        self.rounds = 0
        self.history: list[dict[str, Any]] = []

    @property
    def relation(self) -> str | None:
        if not self.history:
            return None
        return "replace_one" if self.history[0]["sampling"] == "fixed_size" else "add_remove"

    def step(self, noise_multiplier: float, sampling: Sampling = "full", rate: float = 1.0, rounds: int = 1) -> None:
        """Account for ``rounds`` rounds with this noise multiplier and sampling (``rate`` = q or m / N)."""
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        relation = "replace_one" if sampling == "fixed_size" else "add_remove"
        if self.relation is not None and relation != self.relation:
            raise ValueError(f"this accountant counts {self.relation} rounds; a {sampling!r} round is {relation}")
        per_round = round_rdp(noise_multiplier, sampling, rate, self.orders)
        self.rdp = [total + rounds * r for total, r in zip(self.rdp, per_round, strict=True)]
        self.rounds += rounds
        self.history.append(
            {"noise_multiplier": float(noise_multiplier), "sampling": sampling, "rate": float(rate), "rounds": rounds}
        )

    def report(self, delta: float) -> PrivacyReport:
        """The (epsilon, delta) guarantee of all rounds so far (epsilon 0 before any round)."""
        if not self.rounds:
            return PrivacyReport(0.0, delta, math.nan, 0, "none")
        epsilon, order = rdp_to_dp(self.orders, self.rdp, delta)
        return PrivacyReport(epsilon, delta, order, self.rounds, self.relation or "none")

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: orders, summed RDP per order, rounds and the per-step history."""
        return {"orders": list(self.orders), "rdp": list(self.rdp), "rounds": self.rounds, "history": self.history[:]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [float(a) for a in state["orders"]] != self.orders:
            raise ValueError("checkpoint was made with other Renyi orders")
        self.rdp = [float(r) for r in state["rdp"]]
        self.rounds = int(state["rounds"])
        self.history = [dict(h) for h in state["history"]]
