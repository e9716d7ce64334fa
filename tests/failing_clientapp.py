"""A ClientApp whose partition 1 crashes on every message and the others are fedrep's own:
for testing how the server reports a client that fails (``--client-app failing_clientapp:app``,
run from tests/). ``hanging_app``: partition 1 instead takes ``HANG_S`` seconds over its round-2
training (a node that never answers in time, as a SuperNode restarted mid-round does)."""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as fedrep_client

FAILING_PARTITION = 1
app = ClientApp()


def _crash_if_failing(context: Context) -> None:
    if int(context.node_config["partition-id"]) == FAILING_PARTITION:
        raise RuntimeError(f"simulated crash of partition {FAILING_PARTITION}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    return fedrep_client.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _crash_if_failing(context)
    return fedrep_client.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _crash_if_failing(context)
    return fedrep_client.evaluate(msg, context)


HANG_S = 45.0
hanging_app = ClientApp()


@hanging_app.query()
def hanging_query(msg: Message, context: Context) -> Message:
    return fedrep_client.query(msg, context)


@hanging_app.train()
def hanging_train(msg: Message, context: Context) -> Message:
    if (int(context.node_config["partition-id"]) == FAILING_PARTITION
            and int(msg.content["config"]["server-round"]) == 2):
        time.sleep(HANG_S)
    return fedrep_client.train(msg, context)


@hanging_app.evaluate()
def hanging_evaluate(msg: Message, context: Context) -> Message:
    return fedrep_client.evaluate(msg, context)
