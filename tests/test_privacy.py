"""Differential privacy: clipping, noise, client sampling and the Renyi DP accountant."""

import itertools
import json
import math

import pytest
import torch

from fedmusk.strategies import (
    SECURE_SUM_WEIGHT_KEY,
    RdpAccountant,
    add_gaussian_noise,
    add_local_noise,
    clip_update,
    distributed_noise_std,
    poisson_sample_clients,
    sample_clients,
    state_norm,
)
from fedmusk.strategies.privacy import (
    fixed_size_subsampled_gaussian_rdp,
    gaussian_rdp,
    poisson_subsampled_gaussian_rdp,
    rdp_to_dp,
)

ORDERS = [2, 3, 8, 32]
# Independent values: opacus 1.6 compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=ORDERS) (Poisson) and
# dp_accounting 0.6 SampledWithoutReplacementDpEvent(100, 10, GaussianDpEvent(1.0)) under REPLACE_ONE.
OPACUS_POISSON_Q01_Z1 = [0.01703686323617665, 0.03171230030337652, 1.3783614113481268, 13.623137968522595]
DPACC_FIXED_SIZE_10_OF_100_Z2 = [0.05293929372779763, 0.09252058745303618, 1.478554782562137, 13.645497554992307]


def test_clipping_bounds_the_update_norm_and_reports_the_original():
    g = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(100, generator=g), "b": torch.randn(7, 3, generator=g)}
    clipped, norm = clip_update(update, 0.5)
    assert math.isclose(norm, state_norm(update)) and norm > 0.5
    assert state_norm(clipped) <= 0.5 * (1 + 1e-6)


def test_server_noise_has_std_noise_multiplier_times_clip():
    summed = {"w": torch.zeros(200_000), SECURE_SUM_WEIGHT_KEY: torch.tensor([7.0])}
    noised = add_gaussian_noise(summed, noise_multiplier=1.2, clip=0.5, generator=torch.Generator().manual_seed(1))
    assert abs(noised["w"].std().item() - 0.6) < 0.006
    assert abs(noised["w"].mean().item()) < 0.006
    assert noised[SECURE_SUM_WEIGHT_KEY].item() == 7.0, "the public site count carries no noise"


def test_noise_without_a_generator_is_not_reproducible():
    summed = {"w": torch.zeros(10)}
    assert not torch.equal(add_gaussian_noise(summed, 1.0, 1.0)["w"], add_gaussian_noise(summed, 1.0, 1.0)["w"])


def test_sites_local_noise_shares_add_up_to_the_central_std():
    g = torch.Generator().manual_seed(2)
    n = 8
    std = distributed_noise_std(noise_multiplier=1.0, clip=2.0, n_clients=n)
    total = sum(add_local_noise({"w": torch.zeros(100_000)}, std, g)["w"] for _ in range(n))
    assert abs(total.std().item() - 2.0) < 0.03


def test_fixed_size_sampling_draws_m_distinct_sites_uniformly():
    sites = [f"hospital-{i}" for i in range(10)]
    g = torch.Generator().manual_seed(3)
    counts = dict.fromkeys(sites, 0)
    for _ in range(3000):
        picked = sample_clients(sites, 3, g)
        assert len(picked) == len(set(picked)) == 3
        for s in picked:
            counts[s] += 1
    assert all(abs(c - 900) < 120 for c in counts.values()), counts  # 900 expected, sd ~25
    with pytest.raises(ValueError, match="cannot sample 11 of 10 sites"):
        sample_clients(sites, 11, g)


def test_poisson_sampling_picks_rate_times_n_on_average():
    g = torch.Generator().manual_seed(4)
    sizes = [len(poisson_sample_clients(list(range(50)), 0.2, g)) for _ in range(2000)]
    assert abs(sum(sizes) / len(sizes) - 10.0) < 0.3


def test_full_participation_rdp_is_the_gaussian_closed_form():
    assert gaussian_rdp(2.0, [2, 10]) == [2 / 8, 10 / 8]
    acc = RdpAccountant()
    acc.step(noise_multiplier=2.0, rounds=30)
    for order, rdp in zip(acc.orders, acc.rdp, strict=True):
        assert math.isclose(rdp, 30 * order / (2 * 2.0**2), rel_tol=1e-12)


def test_accountant_epsilon_matches_the_closed_form_optimum():
    # T rounds of full participation: eps(alpha) = T alpha / (2 z^2) + log(1/delta) / (alpha - 1), minimised at
    # alpha* = 1 + sqrt(2 z^2 log(1/delta) / T), giving T / (2 z^2) + sqrt(2 T log(1/delta)) / z.
    z, delta = 1.1, 1e-5
    for rounds in (10, 100, 1000):
        acc = RdpAccountant()
        acc.step(z, "full", 1.0, rounds)
        report = acc.report(delta)
        closed = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
        assert closed <= report.epsilon <= closed * 1.01, (rounds, report, closed)
        alpha_star = 1 + math.sqrt(2 * z * z * math.log(1 / delta) / rounds)
        assert abs(report.order - alpha_star) <= max(1.0, 0.1 * alpha_star)


def test_epsilon_grows_with_every_round():
    acc = RdpAccountant()
    epsilons = [acc.report(1e-5).epsilon]
    for _ in range(20):
        acc.step(noise_multiplier=1.0, sampling="poisson", rate=0.2)
        epsilons.append(acc.report(1e-5).epsilon)
    assert epsilons[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(epsilons))
    assert acc.report(1e-5).rounds == 20


def test_poisson_subsampled_rdp_matches_closed_form_at_order_two_and_opacus_values():
    q, z = 0.1, 1.0
    # A_2 = (1 - q)^2 + 2 q (1 - q) + q^2 e^{1/z^2} = 1 + q^2 (e^{1/z^2} - 1)
    assert math.isclose(poisson_subsampled_gaussian_rdp(q, z, [2])[0], math.log1p(q * q * math.expm1(1 / z**2)))
    for mine, theirs in zip(poisson_subsampled_gaussian_rdp(q, z, ORDERS), OPACUS_POISSON_Q01_Z1, strict=True):
        assert math.isclose(mine, theirs, rel_tol=1e-9)


def test_fixed_size_rdp_matches_dp_accounting_values():
    # 10 of 100 sites, z = 2: replace-one sensitivity 2C makes the base Gaussian's multiplier 1.
    ours = fixed_size_subsampled_gaussian_rdp(0.1, 2.0, ORDERS)
    for mine, theirs in zip(ours, DPACC_FIXED_SIZE_10_OF_100_Z2, strict=True):
        assert math.isclose(mine, theirs, rel_tol=1e-9)
    assert fixed_size_subsampled_gaussian_rdp(1.0, 1.0, [4]) == gaussian_rdp(0.5, [4])


def test_fractional_orders_are_bounded_by_their_integer_neighbours():
    # Interpolating the log moment between integers is an upper bound; it must not undercut the tighter neighbour.
    low, mid, high = poisson_subsampled_gaussian_rdp(0.05, 0.9, [3, 3.5, 4])
    assert (2.5 * mid) <= 0.5 * (2 * low) + 0.5 * (3 * high) + 1e-12


def test_subsampling_amplifies_privacy():
    full, poisson = RdpAccountant(), RdpAccountant()
    full.step(1.0, "full", 1.0, rounds=50)
    poisson.step(1.0, "poisson", 0.1, rounds=50)
    assert poisson.report(1e-5).epsilon < 0.25 * full.report(1e-5).epsilon


def test_accountant_refuses_mixed_neighbouring_relations_and_bad_arguments():
    acc = RdpAccountant()
    acc.step(1.0, "full")
    with pytest.raises(ValueError, match="counts add_remove rounds; a 'fixed_size' round is replace_one"):
        acc.step(1.0, "fixed_size", 0.5)
    with pytest.raises(ValueError, match="'full' participation has rate 1"):
        acc.step(1.0, "full", 0.5)
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        acc.step(0.0, "poisson", 0.1)
    with pytest.raises(ValueError, match="delta must lie in"):
        rdp_to_dp([2.0], [1.0], 0.0)


def test_accountant_state_round_trips_through_json():
    acc = RdpAccountant()
    acc.step(0.8, "fixed_size", 0.3, rounds=7)
    restored = RdpAccountant()
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.report(1e-6) == acc.report(1e-6)
    assert restored.report(1e-6).relation == "replace_one"
    restored.step(0.8, "fixed_size", 0.3)
    acc.step(0.8, "fixed_size", 0.3)
    assert restored.rdp == acc.rdp


def test_against_opacus_when_installed():
    rdp = pytest.importorskip("opacus.accountants.analysis.rdp", reason="opacus is an optional test oracle")
    orders = [o for o in RdpAccountant().orders if o == int(o)]
    for q, z in [(0.01, 0.7), (0.3, 2.0), (0.5, 0.5)]:
        theirs = rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
        for mine, ref in zip(poisson_subsampled_gaussian_rdp(q, z, orders), theirs, strict=True):
            assert math.isclose(mine, ref, rel_tol=1e-9)
