"""FALLBACK, not Flower's Simulation Runtime: a ``Grid`` that calls the ClientApp in this process.

``run_benchmark.py federated --backend inprocess`` uses it where Ray cannot or should not start
(debugging, tests, machines where Ray's servers may not listen on every interface). The strategy,
the ClientApp handlers, the messages and the per-node ``Context`` objects are the real Flower
ones; only the transport differs:

- clients run one after the other in the server's process, and share its backbone;
- a client that raises produces an error reply, as in the Simulation Runtime;
- a client that runs longer than the round timeout is not interrupted; its reply is dropped
  afterwards and the round counts it as timed out.

NOTE: message ids are written into ``Metadata``'s private fields as Flower's own
``InMemoryGrid.push_messages`` does, and the process-wide ``TaskIdentity`` is set as
``run_simulation`` does (both checked on flwr 1.42.0); a Flower release that renames them breaks
this module.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

FIRST_NODE_ID = 100
"""Node ids are FIRST_NODE_ID + partition id (Flower reserves 1 for the SuperLink)."""


class InProcessGrid(Grid):
    """Runs ``client_app`` for ``num_nodes`` virtual nodes, synchronously, in this process.

    Args:
        client_app: The ClientApp to call.
        num_nodes: Number of nodes; node i gets ``partition-id`` i.
        run_id: Run id written into every Context and message.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 0) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Message() reads the sender's identity from here, as in the server process of a simulation.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._timeout: float | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now and keep the reply for pulling."""
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {node}"), reply_to=message)
        start = time.monotonic()
        try:
            reply = self.client_app(message, self.contexts[node])
        except Exception as error:  # noqa: BLE001 - a failing client becomes an error reply, as in Flower
            logger.debug("client on node %d raised", node, exc_info=True)
            reason = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        elapsed = time.monotonic() - start
        if self._timeout is not None and elapsed > self._timeout:
            logger.error("node %d replied after %.1f s, past the round timeout of %.1f s; reply dropped",
                         node, elapsed, self._timeout)
            return None
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._timeout = timeout
        try:
            ids = self.push_messages(messages)
        finally:
            self._timeout = None
        return self.pull_messages(ids)
