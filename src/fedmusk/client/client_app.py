"""A site's Flower ClientApp: unpack the coordinator's message, call ``SiteClient``, pack the reply.

The SuperNode says where the site lives (node config ``site-root``, ``policy``, ``site-name``, ``coordinator``);
the coordinator's run config carries the fedmusk configuration as YAML (``fedmusk-config``). When that configuration
asks for secure aggregation, every training message goes through Flower's ``secaggplus_mod``, so the update leaves
the site only masked; a plain training message in a secure run is then refused by the mod. The masked vector leaves
as uint32, 4 bytes a value (``fedmusk.secagg_wire``; ``federation.secagg_packed=false``: Flower's int64).

Errors leave the site as their type and a scrubbed message (no paths, case ids or report text).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedmusk.client.site_client import SiteClient, site_address, site_config
from fedmusk.secagg_wire import pack_masked_vector
from fedmusk.wire import RUN_CONFIG, config_from_run_config


class SiteError(RuntimeError):
    """An error as it leaves the site: scrubbed, without the original's traceback."""


class FlowerSite(NumPyClient):
    """The NumPyClient face of a SiteClient."""

    def __init__(self, site: SiteClient):
        self.site = site

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        with _scrubbed_errors(self.site):
            reply = self.site.fit(self._global_state(parameters, config), int(config["round"]), _fid(config))
        return reply.arrays, reply.num_examples, reply.metrics

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        with _scrubbed_errors(self.site):
            n, metrics = self.site.evaluate(self._global_state(parameters, config), int(config["round"]), _fid(config))
        return 0.0, n, metrics  # fedmusk has no evaluation loss: the metrics carry the results

    def _global_state(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        phase = self.site.use_round(int(config["round"]))  # pretraining or outcome: picks session and layout
        if config.get("phase", phase) != phase:
            raise ValueError(
                f"the coordinator runs round {config['round']} as {config.get('phase')!r}, this site as {phase!r}: "
                "site and coordinator must use the same federation.pretrain_rounds"
            )
        layout = self.site.layout
        if config.get("layout") != layout.fingerprint:
            raise ValueError(
                "the coordinator's adapter layout differs from this site's: the site and the coordinator must use "
                "the same model preset, LoRA settings and task"
            )
        return layout.from_arrays(parameters)


def build_client_app(run_config_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``run_config_defaults`` stand in for run-config keys the run does not set (simulation)."""
    defaults = dict(run_config_defaults or {})

    def client_fn(context: Context) -> Client:
        run_config = {**defaults, **context.run_config}
        return FlowerSite(_site_client(run_config, context.node_config)).to_client()

    def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
        """SecAgg+ for every message of a run whose configuration asks for secure aggregation."""
        run_config = {**defaults, **context.run_config}
        if _is_secure(run_config):
            reply = secaggplus_mod(msg, context, call_next)
            if _packs_masked_vector(run_config) and reply.has_content():
                pack_masked_vector(reply.content)  # uint32 on the wire; the coordinator restores Flower's int64
            return reply
        return call_next(msg, context)

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])


# The site clients this process keeps between messages: the model, tile features and scrubber are built once per
# site, not at every message (every round restores its own state, see SiteClient.fit). In simulation one process
# serves several sites in turn; keeping one bounds its memory to one model.
SITES_PER_PROCESS = 1
_SITES: OrderedDict[tuple[str, str], SiteClient] = OrderedDict()
_SECURE: dict[str, bool] = {}
_PACKED: dict[str, bool] = {}


def _site_client(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteClient:
    address = site_address(node_config, run_config)
    key = (str(run_config.get(RUN_CONFIG)), repr(address))
    if key not in _SITES:
        _SITES[key] = SiteClient.from_address(site_config(run_config, node_config, address), address)
        while len(_SITES) > SITES_PER_PROCESS:
            _SITES.popitem(last=False)
    _SITES.move_to_end(key)
    return _SITES[key]


def _is_secure(run_config: Mapping[str, Any]) -> bool:
    text = str(run_config.get(RUN_CONFIG))
    if text not in _SECURE:
        _SECURE[text] = config_from_run_config(run_config).federation.secure_aggregation
    return _SECURE[text]


def _packs_masked_vector(run_config: Mapping[str, Any]) -> bool:
    text = str(run_config.get(RUN_CONFIG))
    if text not in _PACKED:
        _PACKED[text] = config_from_run_config(run_config).federation.secagg_packed
    return _PACKED[text]


def _fid(config: Mapping[str, Any]) -> str:
    return str(config.get("federation-id", ""))


@contextmanager
def _scrubbed_errors(site: SiteClient) -> Iterator[None]:
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever went wrong, only a scrubbed account leaves the site
        raise SiteError(site.scrub_error(err)) from None


app = build_client_app()
