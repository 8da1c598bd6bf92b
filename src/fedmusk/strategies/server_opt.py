"""Server optimisers that turn the round's aggregated delta into the next global adapter (Reddi et al. 2021).

The aggregated delta ``d = mean_i(x_i - x)`` is treated as a pseudo-gradient step (Algorithm 2 of "Adaptive
Federated Optimization"), per tensor and element-wise:

    FedAvg     x <- x + eta d
    FedAvgM    m <- beta m + d;                    x <- x + eta m
    FedAdagrad m <- b1 m + (1 - b1) d;  v <- v + d^2
    FedAdam    m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2
    FedYogi    m <- b1 m + (1 - b1) d;  v <- v - (1 - b2) d^2 sign(v - d^2)
    (adaptive) x <- x + eta m / (sqrt(v) + tau)

As in the paper: m starts at 0, v at tau^2, and there is no bias correction. ``state_dict()`` holds the
hyper-parameters (JSON), the round count and the moment buffers (tensors), so a coordinator can checkpoint and
resume bit-exactly; ``load_state_dict`` refuses a checkpoint made with other hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedmusk.strategies.aggregation import StateDict


class ServerOptimizer:
    """Base class: one ``step`` per round; subclasses define the per-tensor update direction."""

    name: ClassVar[str]
    buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hparams: float) -> None:
        self.hparams = {k: float(v) for k, v in hparams.items()}
        self.rounds = 0
        self.buffers: dict[str, StateDict] = {b: {} for b in self.buffer_names}
        self._names: list[str] | None = None  # tensor names fixed by the first step, or by ``expect``
        self._partial = False  # whether a round may move only part of them (``expect``)

    def expect(self, names) -> None:
        """Declare every tensor name a round's delta may hold, when a round moves only part of them (RoLoRA moves
        one LoRA factor a round); the tensors a round leaves out keep their values and moment buffers."""
        self._names, self._partial = sorted(names), True

    def step(self, global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> StateDict:
        """The next global state: tensors in ``delta`` moved by the optimiser, all others passed through.

        Raises ValueError if ``delta`` holds other tensor names than earlier rounds (than ``expect`` declared) or
        names the state lacks.
        """
        names = sorted(delta)
        if self._partial and not set(names) <= set(self._names):
            raise ValueError(f"round delta holds undeclared tensors: {sorted(set(names) - set(self._names))[:5]}")
        if not self._partial and self._names is not None and names != self._names:
            changed = sorted(set(names) ^ set(self._names))
            raise ValueError(f"round delta holds different tensors from earlier rounds: {changed[:5]}")
        for name in names:  # validate everything before any buffer moves
            if name not in global_state:
                raise ValueError(f"delta tensor {name!r} is not in the global state")
            if delta[name].shape != global_state[name].shape:
                raise ValueError(
                    f"{name!r}: delta shape {tuple(delta[name].shape)} != {tuple(global_state[name].shape)}"
                )
        if not self._partial:
            self._names = names
        out = dict(global_state)
        for name in names:
            x = global_state[name]
            d = delta[name].to(x.dtype)
            out[name] = x + self._direction(name, d)
        self.rounds += 1
        return out

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _buffer(self, kind: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        buf = self.buffers[kind].get(name)
        if buf is None:
            buf = self.buffers[kind][name] = torch.full_like(like, fill)
        return buf

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: {"name", "hparams", "rounds", "names", "buffers": {kind: {tensor name: Tensor}}}."""
        return {
            "name": self.name,
            "hparams": dict(self.hparams),
            "rounds": self.rounds,
            "names": None if self._names is None else list(self._names),
            "partial": self._partial,
            "buffers": {k: {n: t.clone() for n, t in b.items()} for k, b in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``; ValueError if it belongs to another optimiser or other hyper-parameters."""
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for server optimiser {state['name']!r}, not {self.name!r}")
        if dict(state["hparams"]) != self.hparams:
            raise ValueError(f"checkpoint hyper-parameters {dict(state['hparams'])} != configured {self.hparams}")
        if set(state["buffers"]) != set(self.buffer_names):
            raise ValueError(f"checkpoint buffers {sorted(state['buffers'])} != expected {list(self.buffer_names)}")
        self.rounds = int(state["rounds"])
        self._names = None if state["names"] is None else list(state["names"])
        self._partial = bool(state.get("partial", False))
        self.buffers = {k: {n: t.clone() for n, t in b.items()} for k, b in state["buffers"].items()}


class FedAvg(ServerOptimizer):
    """Plain server step ``x + eta d`` (eta=1: the average itself)."""

    name = "fedavg"

    def __init__(self, eta: float = 1.0) -> None:
        super().__init__(eta=eta)

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        return self.hparams["eta"] * d


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): ``m <- beta m + d; x <- x + eta m``."""

    name = "fedavgm"
    buffer_names = ("m",)

    def __init__(self, eta: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(eta=eta, momentum=momentum)

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        m = self._buffer("m", name, d)
        m.mul_(self.hparams["momentum"]).add_(d)
        return self.hparams["eta"] * m


class _Adaptive(ServerOptimizer):
    buffer_names = ("m", "v")

    def __init__(self, **hparams: float) -> None:
        if not hparams["tau"] > 0:
            raise ValueError(f"tau must be positive, got {hparams['tau']}")
        for beta in ("beta1", "beta2"):
            if beta in hparams and not 0.0 <= hparams[beta] < 1.0:
                raise ValueError(f"{beta} must lie in [0, 1), got {hparams[beta]}")
        super().__init__(**hparams)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        raise NotImplementedError

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        m = self._buffer("m", name, d)
        v = self._buffer("v", name, d, fill=h["tau"] ** 2)
        m.mul_(h["beta1"]).add_(d, alpha=1.0 - h["beta1"])
        self._second_moment(v, d * d)
        return h["eta"] * m / (v.sqrt() + h["tau"])


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, tau=tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


class FedAdam(_Adaptive):
    name = "fedadam"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.hparams["beta2"]).add_(d2, alpha=1.0 - self.hparams["beta2"])


class FedYogi(_Adaptive):
    """Like FedAdam, but v moves additively towards d^2, so it grows more slowly after a large update."""

    name = "fedyogi"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_((1.0 - self.hparams["beta2"]) * d2 * torch.sign(v - d2))


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi)
}


def build_server_optimizer(name: str, **hparams: float) -> ServerOptimizer:
    """Server optimiser by name ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi") with its hyper-parameters.

    Raises ValueError naming the unknown optimiser or hyper-parameter.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimiser {name!r}; expected one of {sorted(SERVER_OPTIMIZERS)}")
    try:
        return SERVER_OPTIMIZERS[name](**hparams)
    except TypeError as err:  # an unexpected keyword argument
        raise ValueError(f"bad hyper-parameters for {name!r}: {err}") from None
