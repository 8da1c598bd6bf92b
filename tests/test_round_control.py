"""Round control without Flower: waiting for sites, failed rounds, secure and plain means, settings that cannot
work, and the randomness and wire layout fixed by the configuration."""

from __future__ import annotations

import pytest
import torch
from _federation_helpers import FakeTracker, config

from fedmusk.client.site_client import round_seed
from fedmusk.config import ConfigError, check_config
from fedmusk.server.records import weighted_site_mean
from fedmusk.server.rounds import RoundController, RoundFailed
from fedmusk.wire import AdapterLayout

pytestmark = pytest.mark.slow


def small_state():
    g = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(2, 4, generator=g),
        "layer.lora_B.weight": torch.zeros(3, 2),
        "task_heads.outcome.weight": torch.randn(1, 3, generator=g),
    }


def test_round_control_never_waits_forever_for_sites(tmp_path):
    controller = RoundController(config(), tmp_path, initial_state=small_state(), tracker_factory=FakeTracker)
    now = [0.0]
    with pytest.raises(RoundFailed, match=r"only 2 of the 3 sites .* within 60 s"):
        controller.wait_for_sites(lambda: 2, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == pytest.approx(60.0)
    assert controller.wait_for_sites(lambda: 3, clock=lambda: now[0], sleep=lambda s: None) == 3


def test_a_round_without_an_aggregate_fails_loudly(tmp_path):
    controller = RoundController(config(), tmp_path, initial_state=small_state(), tracker_factory=FakeTracker)
    controller.select_sites(1, [11, 12, 13])
    with pytest.raises(RoundFailed, match="round 1: no new global adapter.*site errors: site-3: refused"):
        controller.check_fit_done(1, ["site-3: refused"])


def test_secure_and_plain_paths_give_the_same_weighted_mean(tmp_path):
    from fedmusk.strategies.aggregation import prepare_for_secure_sum

    state = small_state()
    g = torch.Generator().manual_seed(1)
    deltas = [{k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(3)]
    cases = [4, 9, 6]
    plain = RoundController(config("federation.secure_aggregation=false"), tmp_path / "p",
                            initial_state=state, tracker_factory=FakeTracker)  # fmt: skip
    secure = RoundController(config(), tmp_path / "s", initial_state=state, tracker_factory=FakeTracker)
    for c in (plain, secure):
        c.select_sites(1, [1, 2, 3])
    plain.aggregate_plain(1, deltas, cases, ["a", "b", "c"])
    prepared = [prepare_for_secure_sum(d, n / 16) for d, n in zip(deltas, cases)]
    uniform = {k: sum(p[k].double() for p in prepared) / 3 for k in prepared[0]}
    secure.aggregate_secure(1, uniform, 3, ["a", "b", "c"])
    for name in state:
        torch.testing.assert_close(secure.global_state[name], plain.global_state[name], rtol=0, atol=1e-7)


def test_federation_settings_that_cannot_work_are_refused_before_any_round():
    for overrides, message in [
        (["federation.secagg_num_shares=4"], "odd"),
        (["federation.robust=median"], "SecAgg"),
        (["federation.strategy=ffa"], "train.lora.ffa"),
        (["federation.strategy=rolora", "train.lora.ffa=true"], "train.lora.ffa=false"),
        (["federation.dp_noise_multiplier=1.0"], "dp_clip"),
        (["federation.min_replies=4"], "min_replies"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_config(config(*overrides))  # load_config runs it: the refusal comes at load


def test_site_randomness_and_wire_layout_are_fixed_by_the_configuration():
    assert round_seed(0, "site-1", 2) == round_seed(0, "site-1", 2) != round_seed(0, "site-1", 3)
    state = small_state()
    layout = AdapterLayout.of(state)
    back = layout.from_arrays(layout.to_arrays(state))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    sent = layout.update_layout("fedsa", secure=True)
    assert sent.names == ["layer.lora_A.weight", "__secure_sum_weight__"]
    assert weighted_site_mean({"a": {"val_n": 1, "val_c_index": 0.5}, "b": {"val_n": 3, "val_c_index": 0.9}}) == {
        "val_c_index": pytest.approx(0.8), "val_n": 4.0
    }
