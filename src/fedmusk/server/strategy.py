"""The Flower strategy of fedmusk: arrays in, state dicts to the round controller, arrays out.

Everything it decides is delegated: which sites to ask and how to combine their updates live in
``fedmusk.server.rounds.RoundController`` (which calls the pure maths of ``fedmusk.strategies``). Under SecAgg+ the
workflow hands ``aggregate_fit`` replies whose parameters are all the same unmasked vector, the plain mean of what
the sites sent; the controller turns that into the example-weighted mean.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: a hospital network phones no one

import torch  # noqa: E402
from flwr.common import (  # noqa: E402
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import Strategy  # noqa: E402

from fedmusk.server.records import site_error_text, unique_site_names  # noqa: E402
from fedmusk.server.rounds import RoundController  # noqa: E402
from fedmusk.wire import AdapterLayout, phase_round  # noqa: E402


class FedMuskStrategy(Strategy):
    """A ``flwr.server.strategy.Strategy`` over a ``RoundController`` (fit and evaluation on the sites only)."""

    def __init__(self, controller: RoundController):
        super().__init__()
        self.controller = controller
        self.secure = controller.fed.secure_aggregation

    @property
    def global_layout(self) -> AdapterLayout:
        """The layout of the global adapter now (it changes when a pretraining phase hands over to the outcome)."""
        return AdapterLayout.of(self.controller.global_state)

    def update_layout(self, server_round: int) -> AdapterLayout:
        """What every site sends in ``server_round`` (RoLoRA: that round's factor)."""
        fed = self.controller.fed
        rnd = phase_round(self.controller.cfg, server_round)
        return self.global_layout.update_layout(fed.strategy, fed.secure_aggregation, rnd)

    def global_parameters(self) -> Parameters:
        return ndarrays_to_parameters(self.global_layout.to_arrays(self.controller.global_state))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.global_parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        proxies = client_manager.all()
        chosen = self.controller.select_sites(server_round, [p.node_id for p in proxies.values()])
        by_node = {p.node_id: p for p in proxies.values()}
        fit_ins = FitIns(self.global_parameters(), self.controller.fit_config(server_round))
        return [(by_node[node], fit_ins) for node in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        sites = unique_site_names(str(res.metrics.get("site", res_proxy.cid)) for res_proxy, res in results)
        losses = {s: float(res.metrics["loss"]) for s, (_, res) in zip(sites, results) if "loss" in res.metrics}
        self.controller.record_fit(server_round, losses, [_failure_text(f) for f in failures])
        if self.secure:
            uniform = (
                self.update_layout(server_round).from_arrays(
                    parameters_to_ndarrays(results[0][1].parameters), torch.float64
                )
                if results
                else {}
            )
            self.controller.aggregate_secure(server_round, uniform, len(results), sites)
        else:
            layout = self.update_layout(server_round)
            updates = [layout.from_arrays(parameters_to_ndarrays(r.parameters)) for _, r in results]
            weights = [float(r.num_examples) for _, r in results]
            self.controller.aggregate_plain(server_round, updates, weights, sites)
        return self.global_parameters(), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        # Every connected site reports, so that each one's metrics are on record every round.
        ins = EvaluateIns(self.global_parameters(), self.controller.fit_config(server_round))
        return [(proxy, ins) for proxy in client_manager.all().values()]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        names = unique_site_names(str(res.metrics.get("site", proxy.cid)) for proxy, res in results)
        per_site = {
            name: {k: v for k, v in res.metrics.items() if k != "site" and isinstance(v, int | float)}
            for name, (_, res) in zip(names, results)
        }
        failed = list(dict.fromkeys(_failure_text(f) for f in failures))
        return None, dict(self.controller.record_evaluation(server_round, per_site, failed))

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None  # the coordinator holds no data


def _failure_text(failure) -> str:
    if isinstance(failure, BaseException):
        return site_error_text(str(failure))
    _, res = failure
    return f"{res.status.code.name}: {res.status.message}"[:500]
