"""Aggregation maths: LoRA sharing modes, secure-sum weighting, server optimisers and robust rules."""

import io
import math

import pytest
import torch

from fedmusk.strategies import (
    SECURE_SUM_WEIGHT_KEY,
    aggregate,
    apply_delta,
    build_server_optimizer,
    clip_by_norm,
    coordinate_median,
    ffa_lora_aggregate,
    finish_secure_sum,
    fit_clipping_range,
    lora_pairs,
    lora_products,
    merge_partition,
    partition,
    prepare_for_secure_sum,
    proximal_term,
    rolora_factor,
    secure_sum_error_bound,
    shared_roles,
    state_delta,
    state_norm,
    tensor_role,
    trimmed_mean,
    weighted_mean,
)

R, IN, OUT = 4, 12, 10
LAYERS = [f"beit3.encoder.layers.{i}.self_attn.q_proj.{expert}" for i in range(2) for expert in "AB"]


def adapter_state(seed: int, a_seed: int | None = None) -> dict[str, torch.Tensor]:
    """A MUSK-like adapter: LoRA on both multiway experts of two layers, plus a MIL head."""
    g = torch.Generator().manual_seed(seed)
    ga = torch.Generator().manual_seed(a_seed) if a_seed is not None else g
    state = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(R, IN, generator=ga)
        state[f"{layer}.lora_B.weight"] = torch.randn(OUT, R, generator=g)
    state["head.mil.attention_a.weight"] = torch.randn(8, 16, generator=g)
    state["head.classifier.bias"] = torch.randn(3, generator=g)
    return state


# --- names and sharing modes -----------------------------------------------------------------------------------


def test_roles_come_from_lora_component_not_multiway_expert_letter():
    assert tensor_role("beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight") == "A"
    assert tensor_role("beit3.encoder.layers.0.self_attn.q_proj.A.lora_B.weight") == "B"
    assert tensor_role("beit3.encoder.layers.0.self_attn.q_proj.A.weight") == "head"
    assert tensor_role("head.mil.attention_a.weight") == "head"


def test_lora_pairs_match_factors_of_the_same_layer_and_expert():
    pairs = lora_pairs(adapter_state(0))
    assert sorted(pairs) == sorted(LAYERS)
    layer = "beit3.encoder.layers.1.self_attn.q_proj.B"
    assert pairs[layer] == (f"{layer}.lora_A.weight", f"{layer}.lora_B.weight")
    assert lora_pairs({"x.lora_A.default.weight": torch.ones(1), "x.lora_B.default.weight": torch.ones(1)}) == {
        "x": ("x.lora_A.default.weight", "x.lora_B.default.weight")
    }


def test_unpaired_lora_factor_is_named():
    state = adapter_state(0)
    del state[f"{LAYERS[2]}.lora_B.weight"]
    with pytest.raises(ValueError, match=r"q_proj\.A\.lora_A\.weight' has no partner"):
        lora_pairs(state)


def test_fedsa_partition_keeps_b_and_head_local():
    shared, local = partition(adapter_state(0), "fedsa")
    assert shared and all(tensor_role(k) == "A" for k in shared)
    assert {tensor_role(k) for k in local} == {"B", "head"}
    assert merge_partition(shared, local).keys() == adapter_state(0).keys()


def test_ffa_partition_keeps_frozen_a_local_and_fedit_shares_everything():
    shared, local = partition(adapter_state(0), "ffa")
    assert {tensor_role(k) for k in shared} == {"B", "head"} and {tensor_role(k) for k in local} == {"A"}
    shared, local = partition(adapter_state(0), "fedit")
    assert not local and shared.keys() == adapter_state(0).keys()


def test_server_refuses_a_tensor_that_must_stay_at_the_site():
    updates = [adapter_state(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"update 0 carries .*lora_B.* stay at the site in mode 'fedsa'"):
        aggregate(updates, [1, 1, 1], "fedsa")


def test_fedsa_aggregate_averages_only_the_shared_a():
    updates = [partition(adapter_state(i), "fedsa")[0] for i in range(3)]
    out = aggregate(updates, [1, 2, 3], "fedsa")
    assert out.keys() == updates[0].keys()
    torch.testing.assert_close(out, weighted_mean(updates, [1, 2, 3]))


def test_unknown_sharing_mode_is_named():
    with pytest.raises(ValueError, match="unknown sharing mode 'fedprox'"):
        partition(adapter_state(0), "fedprox")


# --- averaging -------------------------------------------------------------------------------------------------


def test_fedavg_equals_hand_computed_weighted_mean():
    updates = [
        {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
        {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])},
    ]
    out = weighted_mean(updates, [1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))
    assert out["w"].dtype == torch.float32


def test_mismatched_updates_and_bad_weights_are_refused():
    a, b = adapter_state(0), adapter_state(1)
    del b["head.classifier.bias"]
    with pytest.raises(ValueError, match="update 1 has different tensors"):
        weighted_mean([a, b], [1, 1])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        weighted_mean([a, a], [1])
    with pytest.raises(ValueError, match="weights sum to zero"):
        weighted_mean([a, a], [0, 0])


def test_ffa_aggregate_of_b_with_shared_a_equals_mean_of_products():
    weights = [10.0, 30.0, 60.0]
    states = [adapter_state(i, a_seed=99) for i in range(3)]  # one frozen A, site-specific B
    updates = [partition(s, "ffa")[0] for s in states]
    out = aggregate(updates, weights, "ffa")
    frozen_a = partition(states[0], "ffa")[1]
    product_of_aggregate = lora_products(merge_partition(out, frozen_a))
    aggregate_of_products = weighted_mean([lora_products(s) for s in states], weights)
    torch.testing.assert_close(product_of_aggregate, aggregate_of_products, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("round", [1, 2, 3, 4])
def test_rolora_aggregate_of_the_rounds_factor_equals_mean_of_products(round):
    weights = [10.0, 30.0, 60.0]
    factor = rolora_factor(round)
    assert factor == ("B" if round % 2 else "A")
    shared = adapter_state(99)  # the global adapter every site starts the round from
    states = []
    for i in range(3):  # each site moved only this round's factor (and the heads)
        own = adapter_state(i)
        states.append({k: own[k] if tensor_role(k) in (factor, "head") else shared[k] for k in shared})
    updates = [partition(s, "rolora", round)[0] for s in states]
    assert all({tensor_role(k) for k in u} == {factor, "head"} for u in updates)
    out = aggregate(updates, weights, "rolora", round)
    product_of_aggregate = lora_products({**shared, **out})
    aggregate_of_products = weighted_mean([lora_products(s) for s in states], weights)
    for layer, value in aggregate_of_products.items():
        torch.testing.assert_close(product_of_aggregate[layer], value, rtol=0, atol=1e-6)


def test_rolora_needs_the_round_and_refuses_the_other_factor():
    assert shared_roles("rolora", 1) == {"B", "head"} and shared_roles("rolora", 2) == {"A", "head"}
    with pytest.raises(ValueError, match="pass the round"):
        partition(adapter_state(0), "rolora")
    with pytest.raises(ValueError, match="stay at the site"):
        aggregate([partition(adapter_state(0), "rolora", 2)[0]], [1.0], "rolora", 1)


def test_ffa_refuses_sites_whose_a_drifted():
    states = [adapter_state(0, a_seed=1), adapter_state(1, a_seed=2)]
    with pytest.raises(ValueError, match="needs one frozen A"):
        ffa_lora_aggregate(states, [1, 1])


def test_fedit_product_of_averages_is_not_average_of_products():
    weights = [1.0, 1.0, 1.0]
    states = [adapter_state(i) for i in range(3)]  # A and B both differ per site
    product_of_aggregate = lora_products(aggregate(states, weights, "fedit"))
    aggregate_of_products = weighted_mean([lora_products(s) for s in states], weights)
    for layer in LAYERS:
        gap = (product_of_aggregate[layer] - aggregate_of_products[layer]).norm()
        assert gap > 0.3 * aggregate_of_products[layer].norm(), "cross terms B_i A_j make FedIT inexact"


# --- secure sum ------------------------------------------------------------------------------------------------


def secagg_sum(prepared, clipping_range, quantization_range, modulus_range, generator):
    """Reference of SecAgg+'s arithmetic: clip, shift, scale, stochastic rounding, modular integer sum, map back."""
    n = len(prepared)
    assert n * quantization_range < modulus_range
    out = {}
    for name in prepared[0]:
        total = torch.zeros(prepared[0][name].shape, dtype=torch.int64)
        for p in prepared:
            x = p[name].double().clamp(-clipping_range, clipping_range) + clipping_range
            x = x * quantization_range / (2 * clipping_range)
            floor = x.floor()
            up = torch.rand(x.shape, generator=generator, dtype=torch.float64) < (x - floor)
            total = (total + floor.long() + up.long()) % modulus_range
        step = 2 * clipping_range / quantization_range
        out[name] = (total.double() * step - n * clipping_range).float()
    return out


@pytest.mark.parametrize("quantization_range", [2**10, 2**22])
def test_secure_sum_with_quantisation_matches_weighted_mean_within_bound(quantization_range):
    g = torch.Generator().manual_seed(0)
    examples = [120, 40, 300, 75]
    weights = [e / 500 for e in examples]  # a public cap of 500 examples keeps weights in (0, 1]
    deltas = [{k: 0.05 * v for k, v in adapter_state(i).items()} for i in range(4)]
    clip = fit_clipping_range(max(max(v.abs().max().item() for v in d.values()) for d in deltas), 1.0)
    clip = max(clip, 1.0)  # the weight itself must fit too
    prepared = [prepare_for_secure_sum(d, w, clipping_range=clip) for d, w in zip(deltas, weights, strict=True)]
    summed = secagg_sum(prepared, clip, quantization_range, 2**32, g)
    result = finish_secure_sum(summed)
    exact = weighted_mean(deltas, examples)
    e = secure_sum_error_bound(clip, quantization_range, len(deltas))
    total_weight = sum(weights)
    worst_gap = 0.0
    for name in exact:
        bound = (e + exact[name].abs() * e) / (total_weight - e) + 1e-6  # float32 slack
        gap = (result[name] - exact[name]).abs()
        assert (gap <= bound).all(), name
        worst_gap = max(worst_gap, gap.max().item())
    if quantization_range == 2**10:
        assert worst_gap > 1e-5, "the coarse grid really quantised"
    # Flower's workflow hands back the uniform mean of what the sites sent: same result.
    mean_of_prepared = {k: v / len(deltas) for k, v in summed.items()}
    torch.testing.assert_close(finish_secure_sum(mean_of_prepared), result)


def test_secure_sum_refuses_values_it_would_clip_and_overflowing_site_counts():
    with pytest.raises(ValueError, match=r"'w' reaches 6.*beyond the secure-sum clipping range 4"):
        prepare_for_secure_sum({"w": torch.tensor([3.0])}, 2.0, clipping_range=4.0)
    with pytest.raises(ValueError, match="overflows modulus_range"):
        secure_sum_error_bound(8.0, 2**22, 1024)
    with pytest.raises(ValueError, match="lacks '__secure_sum_weight__'"):
        finish_secure_sum({"w": torch.ones(1)})
    assert SECURE_SUM_WEIGHT_KEY in prepare_for_secure_sum({"w": torch.ones(1)}, 0.5)


def test_fitted_clipping_range_is_the_next_power_of_two():
    assert fit_clipping_range(0.3) == 0.5
    assert fit_clipping_range(1.0) == 1.0
    assert fit_clipping_range(3.0, headroom=2.0) == 8.0
    with pytest.raises(ValueError):
        fit_clipping_range(0.0)


# --- state arithmetic ------------------------------------------------------------------------------------------


def test_delta_applied_to_old_state_gives_new_state():
    old, new = adapter_state(0), adapter_state(1)
    torch.testing.assert_close(apply_delta(old, state_delta(new, old)), new)
    half = apply_delta(old, state_delta(new, old), lr=0.5)
    bias = "head.classifier.bias"
    torch.testing.assert_close(half[bias], (old[bias] + new[bias]) / 2)
    with pytest.raises(ValueError, match="'ghost' is not in the global state"):
        apply_delta(old, {"ghost": torch.ones(1)})


def test_clipping_bounds_the_global_norm_and_leaves_small_updates_alone():
    state = adapter_state(0)
    clipped = clip_by_norm(state, 1.5)
    assert math.isclose(state_norm(clipped), 1.5, rel_tol=1e-5)
    small = {k: v * 1e-3 for k, v in state.items()}
    torch.testing.assert_close(clip_by_norm(small, 1.5), small)
    assert math.isclose(state_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}), 5.0)


def test_proximal_term_is_half_mu_squared_distance_with_matching_gradient():
    reference = {"w": torch.tensor([1.0, 2.0])}
    current = {"w": torch.tensor([2.0, 0.0], requires_grad=True), "head": torch.ones(2)}
    term = proximal_term(current, reference, mu=0.1)
    assert math.isclose(term.item(), 0.05 * (1 + 4), rel_tol=1e-6)
    term.backward()
    torch.testing.assert_close(current["w"].grad, 0.1 * torch.tensor([1.0, -2.0]))


# --- server optimisers -----------------------------------------------------------------------------------------


def hand_adaptive(deltas, eta, b1, b2, tau, rule):
    """Reddi et al. Algorithm 2 on one scalar, in float64."""
    x, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:  # yogi
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name,rule", [("fedadam", "adam"), ("fedyogi", "yogi")])
def test_adaptive_server_step_matches_hand_computation(name, rule):
    deltas = [0.3, -0.1, 0.05]
    opt = build_server_optimizer(name, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    state = {"w": torch.zeros(1, dtype=torch.float64), "frozen": torch.ones(1)}
    for d in deltas:
        state = opt.step(state, {"w": torch.tensor([d], dtype=torch.float64)})
    expected = hand_adaptive(deltas, 0.1, 0.9, 0.99, 1e-3, rule)
    assert math.isclose(state["w"].item(), expected, rel_tol=1e-12)
    assert state["frozen"].item() == 1.0, "tensors without a delta pass through"


def test_fedavgm_accumulates_momentum():
    opt = build_server_optimizer("fedavgm", eta=1.0, momentum=0.5)
    state = {"w": torch.zeros(1)}
    state = opt.step(state, {"w": torch.tensor([1.0])})  # m = 1
    state = opt.step(state, {"w": torch.tensor([1.0])})  # m = 1.5
    assert state["w"].item() == 2.5


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimizer_resumes_bit_exactly_from_checkpoint(name):
    deltas = [{k: 0.01 * v for k, v in partition(adapter_state(i), "fedit")[0].items()} for i in range(6)]
    start = adapter_state(100)

    straight = build_server_optimizer(name)
    s = start
    for d in deltas:
        s = straight.step(s, d)

    first = build_server_optimizer(name)
    r = start
    for d in deltas[:3]:
        r = first.step(r, d)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_server_optimizer(name)
    resumed.load_state_dict(torch.load(buffer))
    for d in deltas[3:]:
        r = resumed.step(r, d)

    assert resumed.rounds == straight.rounds == 6
    for k in s:
        assert torch.equal(r[k], s[k]), k


def test_checkpoint_of_other_optimiser_or_hyper_parameters_is_refused():
    sd = build_server_optimizer("fedadam", eta=0.1).state_dict()
    with pytest.raises(ValueError, match="hyper-parameters"):
        build_server_optimizer("fedadam", eta=0.2).load_state_dict(sd)
    with pytest.raises(ValueError, match="for server optimiser 'fedadam', not 'fedyogi'"):
        build_server_optimizer("fedyogi").load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown server optimiser 'sgd'"):
        build_server_optimizer("sgd")
    with pytest.raises(ValueError, match="bad hyper-parameters for 'fedavgm'"):
        build_server_optimizer("fedavgm", beta1=0.9)


def test_server_optimizer_moves_only_the_tensors_of_a_partial_round_and_keeps_the_others_moments():
    opt = build_server_optimizer("fedavgm", eta=1.0)
    opt.expect(["a", "b"])
    state = {"a": torch.zeros(2), "b": torch.zeros(2)}
    state = opt.step(state, {"b": torch.ones(2)})  # a RoLoRA round that moves B only
    assert torch.equal(state["a"], torch.zeros(2)) and torch.equal(state["b"], torch.ones(2))
    state = opt.step(state, {"a": torch.ones(2)})
    assert torch.equal(state["b"], torch.ones(2))  # B's momentum does not move B in an A round
    resumed = build_server_optimizer("fedavgm", eta=1.0)
    resumed.load_state_dict(io_round_trip(opt.state_dict()))
    with pytest.raises(ValueError, match="undeclared"):
        resumed.step(state, {"c": torch.ones(2)})


def io_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_server_optimizer_refuses_a_changed_tensor_set():
    opt = build_server_optimizer("fedadam")
    opt.step({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="different tensors from earlier rounds"):
        opt.step({"a": torch.zeros(1), "b": torch.zeros(1)}, {"b": torch.ones(1)})


# --- robust aggregation ----------------------------------------------------------------------------------------


def honest_and_outlier(n_honest: int = 4):
    g = torch.Generator().manual_seed(0)
    honest = [{"w": 1.0 + 0.01 * torch.randn(50, generator=g)} for _ in range(n_honest)]
    return honest, [*honest, {"w": torch.full((50,), 1e6)}]


def test_median_and_trimmed_mean_resist_an_outlier_site():
    _, updates = honest_and_outlier()
    mean = weighted_mean(updates, [1.0] * len(updates))["w"]
    assert mean.min() > 1e5, "the plain mean follows the outlier"
    for robust in (coordinate_median(updates)["w"], trimmed_mean(updates, beta=0.2)["w"]):
        assert (robust - 1.0).abs().max() < 0.05


def test_median_of_even_count_averages_the_middle_pair():
    updates = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 10.0, 4.0)]
    assert coordinate_median(updates)["w"].item() == 3.0


def test_trimmed_mean_refuses_too_few_updates_for_the_trim():
    _, updates = honest_and_outlier(n_honest=4)  # 5 updates
    with pytest.raises(ValueError, match=r"trim fraction 0.1 of 5 updates drops none; need at least 10"):
        trimmed_mean(updates, beta=0.1)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 0.5\)"):
        trimmed_mean(updates, beta=0.5)
    with pytest.raises(ValueError, match="median of 2 updates resists no outlier"):
        coordinate_median(updates[:2])
