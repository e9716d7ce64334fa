"""A ClientApp whose partition 1 crashes on every message and the others are fedrep's own:
for testing how the server reports a client that fails (``--client-app failing_clientapp:app``,
run from tests/)."""

from __future__ import annotations

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
