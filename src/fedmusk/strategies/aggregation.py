"""Aggregation maths for federated LoRA: pure functions over adapter state dicts, no Flower.

An adapter state is a ``dict[str, Tensor]`` (float32). LoRA factors follow peft's names: a layer's
down-projection ``<layer>.lora_A[.<adapter>].weight`` of shape (r, in) and up-projection
``<layer>.lora_B[.<adapter>].weight`` of shape (out, r), whose product ``B @ A`` is the layer's weight update.
Every other tensor (MIL head, classifier) has the role "head". What a name means is decided by
``fedmusk.musk_model.roles`` (``...q_proj.B.lora_A.weight`` is the language expert's lora_A).

Why averaging LoRA factors is subtle: averaging A and B separately (FedIT) yields ``mean(B) @ mean(A)``, which is
not ``mean(B @ A)`` -- the cross terms ``B_i @ A_j`` (i != j) leak in. FFA-LoRA (Sun et al. 2024) freezes A at a
shared initialisation, so the update is linear in B and averaging is exact. FedSA-LoRA (Guo et al. 2025) shares
only A and keeps B and the head at the site (personalisation). RoLoRA (Chen et al. 2025) alternates: in odd rounds
of a phase every site trains and sends only B (A is the shared global A), in even rounds only A (B shared), so the
plain mean of what the sites send is again the exact mean of their products. ``shared_roles`` says what leaves a
site per mode and round.

Secure aggregation: under SecAgg+ the server learns only the sum of what the sites send. To weight by example
counts without revealing them, a site sends ``prepare_for_secure_sum(delta, weight)`` (the update pre-multiplied
by its weight, plus the weight itself as one more tensor) and the server divides with ``finish_secure_sum``. With
Flower's SecAggPlusWorkflow every site must then report num_examples=1 and the workflow must use max_weight=1:
its own weighting would publish the counts (FitRes.num_examples reaches the server in clear) and a max_weight
above 1 scales every value down before quantisation, losing precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from fedmusk.musk_model.roles import lora_factor, lora_partner

StateDict = dict[str, torch.Tensor]
Role = Literal["A", "B", "head"]
SharingMode = Literal["fedit", "ffa", "fedsa", "rolora"]

# Which tensor roles leave a site in each sharing mode; the rest stay local.
SHARED_ROLES: dict[str, frozenset[str]] = {
    "fedit": frozenset({"A", "B", "head"}),  # everything averaged (FedAvg of the factors)
    "ffa": frozenset({"B", "head"}),  # A frozen at a shared seed: never needs to travel
    "fedsa": frozenset({"A"}),  # A carries shared knowledge; B and head personalise
    "rolora": frozenset({"A", "B", "head"}),  # over its rounds; in one round only one factor (rolora_factor)
}

# Name of the extra tensor that carries a site's weight through a secure sum.
SECURE_SUM_WEIGHT_KEY = "__secure_sum_weight__"


# --- names and roles -------------------------------------------------------------------------------------------


def tensor_role(name: str) -> Role:
    """'A' for a lora_A factor, 'B' for a lora_B factor, 'head' for any other trainable tensor."""
    return lora_factor(name) or "head"


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer (the name before ``.lora_A``) to its (lora_A name, lora_B name).

    Raises ValueError naming the tensor when a factor has no partner or a layer carries two adapters.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for name in state:
        if tensor_role(name) != "A":
            continue
        layer, partner = lora_partner(name)
        if partner not in state:
            raise ValueError(f"LoRA factor {name!r} has no partner {partner!r}")
        if layer in pairs:
            raise ValueError(f"layer {layer!r} carries two LoRA adapters ({pairs[layer][0]!r}, {name!r})")
        pairs[layer] = (name, partner)
    paired_b = {b for _, b in pairs.values()}
    for name in state:
        if tensor_role(name) == "B" and name not in paired_b:
            raise ValueError(f"LoRA factor {name!r} has no lora_A partner")
    return pairs


def lora_products(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Each LoRA layer's weight update ``B @ A`` (out, in), keyed by layer name (without the alpha/r scale)."""
    return {layer: state[b] @ state[a] for layer, (a, b) in lora_pairs(state).items()}


# --- sharing modes ---------------------------------------------------------------------------------------------


def rolora_factor(round: int) -> Role:
    """The LoRA factor RoLoRA trains and sends in ``round`` of a phase (counted from 1): B in odd rounds (B starts at
    zero, so A alone could not learn first), A in even rounds."""
    if round < 1:
        raise ValueError(f"RoLoRA counts rounds from 1, got {round}")
    return "B" if round % 2 else "A"


def shared_roles(mode: str, round: int | None = None) -> frozenset[str]:
    """The tensor roles that leave a site in ``mode``; for RoLoRA in ``round`` of the phase (None: over all its
    rounds). Raises ValueError for an unknown mode, or RoLoRA without a round where one is needed."""
    if mode not in SHARED_ROLES:
        raise ValueError(f"unknown sharing mode {mode!r}; expected one of {sorted(SHARED_ROLES)}")
    if mode == "rolora" and round is not None:
        return frozenset({rolora_factor(round), "head"})
    return SHARED_ROLES[mode]


def _shared_roles(mode: str, round: int | None = None) -> frozenset[str]:
    roles = shared_roles(mode, round)
    if mode == "rolora" and round is None:
        raise ValueError("RoLoRA shares A or B depending on the round: pass the round of the phase")
    return roles


def partition(
    state: Mapping[str, torch.Tensor], mode: SharingMode, round: int | None = None
) -> tuple[StateDict, StateDict]:
    """Split a site's state into (shared, local): shared leaves the site in ``mode`` (RoLoRA: in ``round`` of the
    phase), local never does."""
    roles = _shared_roles(mode, round)
    shared = {k: v for k, v in state.items() if tensor_role(k) in roles}
    local = {k: v for k, v in state.items() if tensor_role(k) not in roles}
    return shared, local


def merge_partition(shared: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor]) -> StateDict:
    """Rebuild a site's full state from the aggregated shared part and its own local part."""
    overlap = shared.keys() & local.keys()
    if overlap:
        raise ValueError(f"tensors both shared and local: {sorted(overlap)[:5]}")
    return {**local, **shared}


def aggregate(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    mode: SharingMode,
    round: int | None = None,
) -> StateDict:
    """Server-side aggregate of the shared parts for ``mode`` (RoLoRA: of ``round`` of the phase).

    Raises ValueError naming the update and tensor if a site sent a tensor that must stay local in ``mode``.
    RoLoRA's weighted mean of one factor is exact: the other factor is the same global tensor at every site.
    """
    roles = _shared_roles(mode, round)
    for i, update in enumerate(updates):
        leaked = sorted(k for k in update if tensor_role(k) not in roles)
        if leaked:
            raise ValueError(f"update {i} carries {leaked[:3]}, which stay at the site in mode {mode!r}")
    if mode == "ffa":
        return ffa_lora_aggregate(updates, weights)
    return weighted_mean(updates, weights)


# --- averaging -------------------------------------------------------------------------------------------------


def check_compatible(updates: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Check every update has the same tensor names and shapes; return the names in the first update's order.

    Raises ValueError naming the update index and tensor that differ.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    names = list(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if update.keys() != updates[0].keys():
            diff = sorted(update.keys() ^ updates[0].keys())
            raise ValueError(f"update {i} has different tensors from update 0: {diff[:5]}")
        for name in names:
            if update[name].shape != updates[0][name].shape:
                raise ValueError(
                    f"update {i}: {name!r} has shape {tuple(update[name].shape)}, "
                    f"update 0 has {tuple(updates[0][name].shape)}"
                )
    return names


def _check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise ValueError(f"{n} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    if sum(weights) <= 0:
        raise ValueError("weights sum to zero")


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """FedAvg / FedIT: ``sum_i w_i u_i / sum_i w_i`` for every tensor, A and B factors averaged separately.

    This is exact for heads but only an approximation for LoRA layers: mean(B) @ mean(A) != mean(B @ A).
    Accumulates in float64 and returns each tensor in its input dtype.
    """
    names = check_compatible(updates)
    _check_weights(weights, len(updates))
    w = torch.tensor(list(weights), dtype=torch.float64)
    w = w / w.sum()
    out: StateDict = {}
    for name in names:
        stacked = torch.stack([u[name].to(torch.float64) for u in updates])  # (n, *shape)
        mean = torch.tensordot(w, stacked, dims=1)
        out[name] = mean.to(updates[0][name].dtype)
    return out


def ffa_lora_aggregate(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """FFA-LoRA: weighted mean of B factors and heads; A stays the frozen shared initialisation.

    Because every site multiplies its B by the same A, ``mean(B) @ A == mean(B @ A)``: the aggregate is exact.
    Updates normally hold no A (it never leaves a site); any A they do hold must be bit-identical across sites and
    is passed through. Raises ValueError naming the tensor when the A factors differ.
    """
    check_compatible(updates)
    a_names = [k for k in updates[0] if tensor_role(k) == "A"]
    for name in a_names:
        for i, update in enumerate(updates[1:], start=1):
            if not torch.equal(update[name], updates[0][name]):
                raise ValueError(f"FFA-LoRA needs one frozen A, but {name!r} differs between update 0 and update {i}")
    rest = [{k: v for k, v in u.items() if tensor_role(k) != "A"} for u in updates]
    out = weighted_mean(rest, weights) if rest[0] else {}
    return {**{k: updates[0][k].clone() for k in a_names}, **out}


# --- secure sum (SecAgg+) --------------------------------------------------------------------------------------
#
# SecAgg+ works on integers. Each site clips every value to [-c, c] (c = clipping_range), maps it to [0, Q]
# (Q = quantization_range) by x -> (x + c) Q / (2c), rounds stochastically to a neighbouring integer (unbiased,
# error below one step 2c/Q), adds masks modulo M (modulus_range) and sends. The server's unmasked integer sum
# is exact as long as n Q < M; it maps back with the step and removes the n offsets. Hence, for values that were
# not clipped, every coordinate of the recovered sum is within n * 2c/Q of the true sum.


def prepare_for_secure_sum(
    delta: Mapping[str, torch.Tensor], weight: float, clipping_range: float | None = None
) -> StateDict:
    """What a site sends into a secure sum: ``weight * delta`` plus its weight as ``SECURE_SUM_WEIGHT_KEY``.

    Use a weight in (0, 1] (e.g. examples / a public cap) so it survives SecAgg+'s clipping. Given
    ``clipping_range``, raises ValueError naming the tensor whose values would be clipped (silently, by SecAgg+).
    """
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"secure-sum weight must be finite and positive, got {weight}")
    if SECURE_SUM_WEIGHT_KEY in delta:
        raise ValueError(f"update already carries {SECURE_SUM_WEIGHT_KEY!r}")
    out = {k: v * weight for k, v in delta.items()}
    out[SECURE_SUM_WEIGHT_KEY] = torch.tensor([weight], dtype=torch.float32)
    if clipping_range is not None:
        for name, value in out.items():
            peak = value.abs().max().item() if value.numel() else 0.0
            if peak > clipping_range:
                raise ValueError(
                    f"{name!r} reaches {peak:.4g}, beyond the secure-sum clipping range {clipping_range:.4g}; "
                    "raise it (fit_clipping_range) or clip the update"
                )
    return out


def finish_secure_sum(summed: Mapping[str, torch.Tensor]) -> StateDict:
    """Weighted mean from a secure sum of ``prepare_for_secure_sum`` outputs: ``sum(w delta) / sum(w)``.

    Scale-invariant, so it works on the sum or on any uniform average of the prepared dicts (Flower's workflow
    returns the sum divided by the number of sites). If S and W each carry an error of at most e (see
    ``secure_sum_error_bound``), a coordinate of the result is off by at most ``(e + |result| e) / (W - e)``.
    Raises ValueError when the weight is missing or not positive.
    """
    if SECURE_SUM_WEIGHT_KEY not in summed:
        raise ValueError(f"secure sum lacks {SECURE_SUM_WEIGHT_KEY!r}; was prepare_for_secure_sum used?")
    total = float(summed[SECURE_SUM_WEIGHT_KEY].reshape(-1)[0])
    if not total > 0:
        raise ValueError(f"secure-sum weight total is {total}; no site contributed")
    return {k: v / total for k, v in summed.items() if k != SECURE_SUM_WEIGHT_KEY}


def secure_sum_error_bound(
    clipping_range: float, quantization_range: int, n_clients: int, modulus_range: int = 2**32
) -> float:
    """Worst-case per-coordinate error of a SecAgg+ sum over ``n_clients`` sites, for values within the range.

    Each site's stochastic rounding moves a value by less than one step ``2 c / Q``, so the sum is off by less than
    ``n 2c / Q`` (a uniform mean over the sites: divide by n). Raises ValueError when ``n Q >= M``: the integer sum
    would wrap around the modulus and the result would be garbage.
    """
    if clipping_range <= 0 or quantization_range <= 0 or n_clients <= 0:
        raise ValueError("clipping_range, quantization_range and n_clients must be positive")
    if n_clients * quantization_range >= modulus_range:
        raise ValueError(
            f"{n_clients} sites x quantization_range {quantization_range} overflows modulus_range {modulus_range}"
        )
    return n_clients * 2.0 * clipping_range / quantization_range


def fit_clipping_range(max_abs: float, headroom: float = 1.0) -> float:
    """Smallest power of two >= ``max_abs * headroom``: a SecAgg+ clipping range that clips nothing.

    A power of two keeps the quantisation step exact in binary. ``max_abs`` must be a public bound, not measured
    from one site's update: with updates clipped to L2 norm C and weights in (0, 1], ``max(C, 1)`` bounds every
    value including the weight. Raises ValueError for a non-positive or non-finite bound.
    """
    bound = max_abs * headroom
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"need a positive, finite bound, got max_abs={max_abs}, headroom={headroom}")
    return 2.0 ** math.ceil(math.log2(bound))


# --- state arithmetic ------------------------------------------------------------------------------------------


def state_delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> StateDict:
    """``new - old`` per tensor; both must hold the same names (ValueError lists the difference)."""
    if new.keys() != old.keys():
        raise ValueError(f"states hold different tensors: {sorted(new.keys() ^ old.keys())[:5]}")
    return {k: new[k] - old[k] for k in new}


def apply_delta(
    global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0
) -> StateDict:
    """``global + lr * delta`` for the tensors in ``delta``; tensors not in ``delta`` pass through unchanged.

    Raises ValueError naming a delta tensor that the global state lacks or whose shape differs.
    """
    out = dict(global_state)
    for name, d in delta.items():
        if name not in global_state:
            raise ValueError(f"delta tensor {name!r} is not in the global state")
        if d.shape != global_state[name].shape:
            raise ValueError(f"{name!r}: delta shape {tuple(d.shape)} != state shape {tuple(global_state[name].shape)}")
        out[name] = global_state[name] + lr * d.to(global_state[name].dtype)
    return out


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors, as if they were one flat vector (accumulated in float64)."""
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in state.values()))


def clip_by_norm(state: Mapping[str, torch.Tensor], max_norm: float) -> StateDict:
    """Scale the whole state by ``min(1, max_norm / norm)`` so its global L2 norm is at most ``max_norm``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = state_norm(state)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in state.items()}


def proximal_term(
    current: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx: ``mu / 2 * sum ||w - w_global||^2`` over the tensors of ``reference``; add it to the site's loss.

    Differentiable in ``current``; the reference is detached. Raises ValueError naming a missing tensor.
    """
    missing = [k for k in reference if k not in current]
    if missing:
        raise ValueError(f"current state lacks reference tensors {missing[:5]}")
    if not reference:
        return torch.zeros(())
    total = sum((current[k] - reference[k].detach().to(current[k].device)).pow(2).sum() for k in reference)
    return 0.5 * mu * total
