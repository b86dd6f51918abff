"""A node's ClientApp messages run inside `fedpipe node`, not in a new process per message.

Flower (1.42) runs every message a SuperNode receives in a fresh `flwr-clientapp` process: the
SuperExec polls the SuperNode's Runtime API for a task and launches the process, which starts
Python, imports flwr and the app, installs the app bundle, pulls the message, runs it, pushes the
reply and exits. Measured on this 2-core box, that took 4-7.6 s from a message's arrival to its
training, on every round and node (README 'Rounds without reloading'; 1.2-2.3 s without it, at
a higher load), for a ClientApp that only relays bytes to the resident trainer. Flower's
`--isolation process` leaves running the tasks to whoever serves the Runtime API, so a resident
`fedpipe node` serves them itself: a thread acquires each ClientApp task and runs fedpipe's
ClientApp, already imported, in the process that holds the trainer.

The steps are flwr-clientapp's own (`flwr.supernode.runtime.run_clientapp`): pull the task input,
run the app, push the reply, then the task's output (the node state), with task heartbeats while
it runs. Installing the app bundle and its dependencies is left out: a fedpipe node serves
fedpipe's app only (fedpipe is installed), and replies with an error to any other run. These are
Flower's internal Runtime API calls; where this flwr lacks them, `AVAILABLE` is False and the node
keeps Flower's process per message.
"""

from __future__ import annotations

import socket
import threading
from logging import ERROR, WARNING

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

try:
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    AVAILABLE = True
except ImportError:  # another flwr: the SuperNode launches flwr-clientapp per message
    AVAILABLE = False

APP_FAB_ID = "fedpipe/fedpipe-run"  # publisher/name of the app folder `flower_app.write_app` writes
TASK_POLL_S = 0.1  # as often as fedpipe's Flower processes look for new tasks (`flower_app.flower_env`)


def _runtime_client(address: str, interceptors: list) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def serve_tasks(address: str, app: ClientApp, stop: threading.Event) -> None:
    """Acquire this SuperNode's ClientApp tasks from its Runtime API at `address` (loopback, plain
    HTTP, as the SuperNode's own SuperExec reaches it) and run them one at a time, until `stop`."""
    host, port = address.rsplit(":", 1)
    while not stop.is_set():  # the SuperNode starting: quietly, where Flower's retries log each try
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            stop.wait(0.2)
    acquirer = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while not stop.is_set():
        try:
            got = acquirer.AcquireTask(request)
        except Exception as e:  # noqa: BLE001 - the SuperNode stopped or restarts: its exit ends the node
            log(WARNING, "fedpipe: no task from the SuperNode's Runtime API at %s: %s", address, e)
            stop.wait(1.0)
            continue
        if got.HasField("task") and got.token:
            run_task(address, got.token, app)
        else:
            stop.wait(TASK_POLL_S)


def run_task(address: str, token: str, app: ClientApp) -> None:
    """One ClientApp task, as flwr-clientapp runs it; a failure becomes an error reply, as there."""
    client = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                       RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, _ = pull_task_input(client)
        if run.fab_id != APP_FAB_ID:
            raise RuntimeError(f"this fedpipe node runs fedpipe's app only ({APP_FAB_ID}), not {run.fab_id}")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as e:  # noqa: BLE001 - any failure of the app is the sender's error reply
        log(ERROR, "ClientApp raised an exception", exc_info=e)
        details = f"{type(e)}:<'{e}'>"
        if message is not None:
            failed = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
            reply = Message(failed, reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as e:  # noqa: BLE001 - the task's status still goes back
            log(WARNING, "fedpipe: pushing the reply failed: %s", e)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()
