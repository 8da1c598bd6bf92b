"""The coordinator's Flower ServerApp: a round loop over Flower's legacy fit workflows, nothing else.

Under SecAgg+ (``federation.secure_aggregation``) each round's fit is ``SecAggPlusWorkflow`` with ``max_weight=1``
(every site reports one example; the real weight travels masked), otherwise Flower's default fit workflow. The loop
mirrors ``DefaultWorkflow`` but starts at the round after the last checkpoint, checks after every fit that an
aggregate really happened (SecAgg+ halts silently), and bounds every wait.

Run config: ``fedmusk-config`` (the configuration as YAML), ``out-dir`` and ``resume``; see docs/federation.md.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedmusk.config import FederationConfig
from fedmusk.secagg_wire import restore_masked_vector
from fedmusk.server.records import site_error_text
from fedmusk.server.rounds import RoundController
from fedmusk.server.strategy import FedMuskStrategy
from fedmusk.training.global_adapter import save_global_adapter
from fedmusk.wire import RUN_OUT_DIR, RUN_RESUME, config_from_run_config

DEFAULT_OUT_DIR = "fedmusk-out"
ADAPTER_DIR = "adapter"  # the final global adapter, peft format, inside out-dir
REPLY_POLL_S = 0.25  # between looks for the sites' replies


def build_server_app(run_config_defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``run_config_defaults`` stand in for run-config keys the run does not set (simulation)."""
    defaults = dict(run_config_defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, {**defaults, **context.run_config})

    return app


def run_federation(grid: Grid, context: Context, run_config: Mapping[str, Any]) -> None:
    """Run the configured rounds (after the last checkpoint when resuming) and write the final global adapter to
    ``<out-dir>/adapter``; the MLflow run ends FAILED on error."""
    cfg = config_from_run_config(run_config)
    out_dir = Path(str(run_config.get(RUN_OUT_DIR, DEFAULT_OUT_DIR)))
    controller = RoundController(cfg, out_dir, resume=bool(run_config.get(RUN_RESUME, False)))
    failed = True
    try:
        _run_rounds(MeteredGrid(grid, cfg.federation.reply_timeout_s), context, controller)
        save_global_adapter(cfg, controller.global_state, out_dir / ADAPTER_DIR, controller.lineage())
        controller.publish(out_dir / ADAPTER_DIR)
        failed = False
    finally:
        controller.close(failed)


def secure_fit_workflow(fed: FederationConfig) -> SecAggPlusWorkflow:
    """SecAgg+ as fedmusk uses it: weights inside the masked vector, so max_weight=1 and every site reports 1."""
    return SecAggPlusWorkflow(
        num_shares=fed.secagg_num_shares,
        reconstruction_threshold=fed.secagg_reconstruction_threshold,
        max_weight=1.0,
        clipping_range=fed.secagg_clipping_range,
        quantization_range=fed.secagg_quantization_range,
        timeout=fed.reply_timeout_s,
    )


def _run_rounds(grid: MeteredGrid, context: Context, controller: RoundController) -> None:
    fed = controller.fed
    strategy = FedMuskStrategy(controller)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=controller.total_rounds), strategy=strategy)
    fit_workflow = secure_fit_workflow(fed) if fed.secure_aggregation else default_fit_workflow
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    ready.wait()
    try:
        controller.wait_for_sites(lambda: len(list(grid.get_node_ids())))
        round_config = ConfigRecord()
        round_config[Key.START_TIME] = timeit.default_timer()
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = round_config
        for rnd in controller.rounds_to_run():
            round_config[Key.CURRENT_ROUND] = rnd
            controller.begin_round(rnd)  # pretraining or outcome: the global adapter of this round's phase
            legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
                strategy.global_parameters(), keep_input=True
            )
            grid.reset()
            fit_workflow(grid, legacy)
            controller.check_fit_done(rnd, grid.errors)
            default_evaluate_workflow(grid, legacy)
            controller.finish_round(rnd, grid.bytes_up, grid.bytes_down, len(grid.uploaders))
    finally:
        stop.set()
        thread.join()


class MeteredGrid(Grid):
    """A Grid that bounds every wait for replies by ``reply_timeout_s``, counts payload bytes each way as they
    travel, keeps the sites' error messages (which the sites scrubbed before sending) and restores SecAgg+'s
    masked vectors, which the sites pack as uint32, to Flower's int64 before the workflow sums them."""

    def __init__(self, grid: Grid, reply_timeout_s: float):
        self._grid = grid
        self.reply_timeout_s = reply_timeout_s
        self.reset()

    def reset(self) -> None:
        """Start counting a new round."""
        self.bytes_up = 0
        self.bytes_down = 0
        self.uploaders: set[int] = set()
        self.errors: list[str] = []

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_down += sum(payload_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._count_replies(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_down += sum(payload_bytes(m) for m in messages)
        limit = self.reply_timeout_s if timeout is None else min(timeout, self.reply_timeout_s)
        replies = self._collect(set(self._grid.push_messages(messages)), limit)
        self._count_replies(replies)
        missing = len(messages) - len(replies)
        if missing:
            self.errors.append(f"{missing} sites did not reply within {limit:g} s (federation.reply_timeout_s)")
        return replies

    def _collect(self, waiting: set[str], limit: float) -> list[Message]:
        """Replies to ``waiting`` as they arrive, for at most ``limit`` seconds. Flower's own loop looks every 3 s;
        a look is one local request to the SuperLink, so looking often takes seconds off every stage of a round."""
        deadline = time.monotonic() + limit
        replies: list[Message] = []
        while waiting:
            arrived = list(self._grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(REPLY_POLL_S)
        return replies

    def _count_replies(self, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self.errors.append(site_error_text(str(reply.error.reason)))
                continue
            self.bytes_up += payload_bytes(reply)  # as it travelled: packed
            self.uploaders.add(reply.metadata.src_node_id)
            if reply.has_content():
                restore_masked_vector(reply.content)


def payload_bytes(message: Message) -> int:
    """Bytes of a message's payload: arrays, plus bytes and strings in configs (SecAgg+'s masked vectors and keys
    travel there); protocol framing is not counted."""
    if not message.has_content():
        return 0
    content = message.content
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        total += sum(_value_bytes(v) for v in record.values())
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


app = build_server_app()
