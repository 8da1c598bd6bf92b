"""The site worker: the one process at a hospital that answers the coordinator's messages, with installed code only.

``fedmusk client`` runs Flower's SuperNode with ``--isolation process``: the SuperNode talks to the coordinator and
keeps each incoming message as a task on its runtime port (127.0.0.1, every claim signed with a secret only the
daemon and this worker can read). This worker claims those tasks one at a time and answers each with fedmusk's
*installed* ClientApp (``fedmusk.client.client_app:app``), called directly in this long-lived process:

- Nothing from the network is ever installed or imported. The run's app bundle is only inspected: a bundle that
  carries anything but its ``pyproject.toml``, or names components other than fedmusk's, is refused with an error
  reply and an entry in the site's audit log. No code from it runs (Flower's own ClientApp process would unpack it
  and put it first on ``sys.path``, where it would shadow the installed fedmusk).
- The site stays warm: the ClientApp keeps its site client (model, adapters, tile features, scrubber) between
  messages, so a site builds its model once per run instead of at each of a SecAgg+ round's five messages. Every
  round restores its own state from (seed, site, round), so a warm site sends what a fresh one would.

The worker speaks Flower's Runtime API through Flower's own client classes and message helpers, which are internal
modules: it runs only with the Flower version it was written for (``FLOWER_VERSION``) and says so otherwise.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

FLOWER_VERSION = "1.42.0"  # the Runtime API and message helpers used here are Flower internals
COMPONENTS = {"serverapp": "fedmusk.server.server_app:app", "clientapp": "fedmusk.client.client_app:app"}
BUNDLE_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})  # a bundle's description and Flower's file list
CLIENT_TASK = "flwr-clientapp"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_S = 0.2  # between claims while idle: a local HTTP call, so a short wait costs nothing
PULL_RETRY_S, PULL_RETRY_CAP_S = 0.05, 0.5  # waits for a message part the SuperNode is still storing
# A message's parts are local to the SuperNode once it offers the task: a pull that takes longer is for a message the
# SuperNode dropped (a run that ended while its message was on the way), and must not keep the worker from the next.
PULL_MAX_S = 30.0
HEARTBEAT_S = 15.0  # well inside the SuperNode's patience for a claimed task
EXIT_FATAL = 2  # the daemon stops for good on this exit code (a wrong Flower version, an unreadable secret)

log = logging.getLogger("fedmusk.worker")


class WorkerError(Exception):
    """A reason the worker cannot run at all; the daemon reports it and stops."""


def check_flower_version(version: str | None = None) -> None:
    """Raise WorkerError unless the installed Flower is the one this worker speaks to."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("flwr")
    if version != FLOWER_VERSION:
        raise WorkerError(
            f"this fedmusk speaks Flower {FLOWER_VERSION}'s runtime protocol, but Flower {version} is installed: "
            f"reinstall fedmusk (it pins flwr=={FLOWER_VERSION})"
        )


def bundle_problems(content: bytes) -> list[str]:
    """Why an app bundle must not be served by this site ([] when it is a description of fedmusk and nothing
    else). The bundle is read as a zip archive and its ``pyproject.toml`` as TOML; nothing in it is executed."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = archive.namelist()
        extra = sorted(n for n in names if n not in BUNDLE_FILES)
        problems = [f"the bundle carries files besides its pyproject.toml: {', '.join(extra[:5])}"] if extra else []
        project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except KeyError:
        return ["the bundle has no pyproject.toml"]
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError) as err:
        return [f"the bundle is not a readable app description ({type(err).__name__})"]
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    for role, expected in COMPONENTS.items():
        if components.get(role) != expected:
            problems.append(f"its {role} is {components.get(role)!r}, not fedmusk's {expected!r}")
    return problems


class SiteWorker:
    """Claims the SuperNode's ClientApp tasks and answers them with ``app`` (fedmusk's installed ClientApp)."""

    def __init__(self, runtime_address: str, secret: bytes, app=None, poll_s: float = POLL_S):
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        if app is None:
            from fedmusk.client.client_app import app
        self.app = app
        self.address = runtime_address
        self.poll_s = poll_s
        self.tasks = 0
        self._claims = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}),
            ],
        )  # fmt: skip

    def serve(self, stop: threading.Event) -> None:
        """Claim and answer tasks until ``stop`` is set; a SuperNode that is not (yet) up is waited for."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module

        waiting_since: float | None = None
        while not stop.is_set():
            try:
                claim = self._claims.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_TASK]))
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (401, 403):
                    raise WorkerError("the SuperNode refuses this worker's claims: the shared secret differs") from None
                raise
            except httpx.TransportError:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.info("waiting for the SuperNode's runtime port %s", self.address)
                stop.wait(1.0)
                continue
            if waiting_since is not None:
                log.info("connected to the SuperNode")
                waiting_since = None
            if claim.HasField("task") and claim.token:
                self.run_task(claim.token)
            else:
                stop.wait(self.poll_s)

    def run_task(self, token: str) -> str:
        """Answer one claimed task; returns ``completed``, ``refused`` or ``failed``. Errors never escape: they go
        back to the coordinator as a scrubbed error reply."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name=CLIENT_TASK), RuntimeTokenHttpInterceptor(token)],
        )  # fmt: skip
        heartbeat = _Heartbeat(client)
        heartbeat.start()
        message = context = reply = None
        outcome, details = "failed", "the site worker could not read the task"
        clock = _Stopwatch()
        try:
            message, context, run, fab = _pull_task_input(client)
            clock.lap("pull")
            log.info("%s message of run %s received", message.metadata.message_type, run.run_id)
            problems = bundle_problems(fab.content)
            if problems:
                outcome = "refused"
                details = "this site runs only its installed fedmusk and refused the run's app bundle"
                record_refused_bundle(context.node_config, str(run.run_id), problems)
                log.warning("refused run %s: %s", run.run_id, "; ".join(problems))
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            else:
                reply = self.app(message=message, context=context)
                outcome, details = "completed", ""
            clock.lap("fedmusk")
        except Exception as err:  # noqa: BLE001 - every failure becomes a scrubbed reply, never a crash
            details = scrubbed_reason(err, None if context is None else context.node_config)
            log.error("task failed: %s", details)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            heartbeat.stop()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                    clock.lap("push")
            except Exception as err:  # noqa: BLE001 - the SuperNode went away: the coordinator sees no reply
                log.error("could not hand the reply to the SuperNode (%s)", type(err).__name__)
                outcome = "failed"
            status = SubStatus.COMPLETED if outcome == "completed" else SubStatus.FAILED
            push_task_output(client=client, context=context, sub_status=status, details=details)
            clock.lap("close")
            client.close()
        self.tasks += 1
        kind = message.metadata.message_type if message is not None else "?"
        log.info("%s message: %s in %.2f s (%s)", kind, outcome, clock.total, clock.laps())
        return outcome


def _pull_task_input(client):
    """The task's message, context, run and app bundle, as Flower's ClientApp process pulls them, but retrying a
    message part that the SuperNode has not stored yet after 0.05 s rather than 1 s, then 2 s: the SuperNode offers
    the task as soon as the message's header is stored, and its content follows within milliseconds on this
    machine (Flower's waits cost 3 s on every message that carries an adapter). A message whose parts do not come
    within PULL_MAX_S was dropped by the SuperNode: ObjectPullError, and the worker goes on to the next task."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context, run, fab = context_from_proto(task.context), run_from_proto(task.run), fab_from_proto(task.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None, max_time=PULL_MAX_S, initial_backoff=PULL_RETRY_S,
        backoff_cap=PULL_RETRY_CAP_S,
    )  # fmt: skip
    message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message does not carry its own id
    return message, context, run, fab


class _Stopwatch:
    """Seconds spent in each step of a task, for the log: where a message's time goes."""

    def __init__(self):
        self.started = self._last = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self._laps.append((name, now - self._last))
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.started

    def laps(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._laps)


class _Heartbeat:
    """Tells the SuperNode every HEARTBEAT_S that the claimed task is alive (Flower's own sender draws from the
    global ``random`` generator, which the training's seeded state must not share with another thread)."""

    def __init__(self, client):
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass


def _site(node_config: Mapping[str, Any]):
    from fedmusk.client.site_client import site_address

    return site_address(node_config, {})


def record_refused_bundle(node_config: Mapping[str, Any], run_id: str, problems: list[str]) -> None:
    """Write the refusal into the site's audit log (the policy's, or the default one)."""
    from fedmusk.client.audit import AuditLog
    from fedmusk.client.site_client import site_policy

    AuditLog(site_policy(_site(node_config)).audit_log_path).record_refused_bundle(run_id, problems)


_SCRUBBERS: dict[str, Callable[[str], str]] = {}


def scrubbed_reason(err: BaseException, node_config: Mapping[str, Any] | None) -> str:
    """An error as it may leave the site: type and message without the site's path, case ids or report text."""
    text = f"{type(err).__name__}: {err}"
    if node_config is None:
        return type(err).__name__  # nothing known about the site yet: say only what kind of error it was
    try:
        address = _site(node_config)
        root = str(address.root)
        if root not in _SCRUBBERS:
            from fedmusk.data.site.scrub import Scrubber, site_line_filter

            _SCRUBBERS[root] = site_line_filter(address.root, Scrubber.from_site(address.root))
        return _SCRUBBERS[root](text)
    except Exception:  # noqa: BLE001 - a scrubber that cannot be built: say only what kind of error it was
        return type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmusk.ops.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", required=True, help="the SuperNode's runtime address, 127.0.0.1:PORT")
    parser.add_argument("--secret-file", required=True, type=Path, help="the file with the SuperNode's shared secret")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="fedmusk-worker: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per local runtime request says nothing useful
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        check_flower_version()
        secret = args.secret_file.read_bytes()
        if not secret:
            raise WorkerError(f"{args.secret_file} is empty")
        worker = SiteWorker(args.runtime, secret)
        log.info("serving the SuperNode at %s with the installed fedmusk ClientApp", args.runtime)
        worker.serve(stop)
    except WorkerError as err:
        print(f"fedmusk-worker: error: {err}", file=sys.stderr, flush=True)
        return EXIT_FATAL
    except OSError as err:
        print(f"fedmusk-worker: error: cannot read {args.secret_file} ({err.strerror})", file=sys.stderr, flush=True)
        return EXIT_FATAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
