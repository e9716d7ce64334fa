"""A ClientApp whose partition 1 crashes on every message and the others are fedrep's own:
for testing how the server reports a client that fails (``--client-app failing_clientapp:app``,
run from tests/). ``hanging_app``: partition 1 instead holds its round-2 training until the server has
finished round 2 without it (a node that never answers in time, as a SuperNode restarted mid-round does)."""

from __future__ import annotations

import time
from pathlib import Path

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


HANG_S = 180.0
hanging_app = ClientApp()


@hanging_app.query()
def hanging_query(msg: Message, context: Context) -> Message:
    return fedrep_client.query(msg, context)


@hanging_app.train()
def hanging_train(msg: Message, context: Context) -> Message:
    if (int(context.node_config["partition-id"]) == FAILING_PARTITION
            and int(msg.content["config"]["server-round"]) == 2):
        _hang_until_round_done(Path(str(msg.content["config"]["run-dir"])), 2)
    return fedrep_client.train(msg, context)


def _hang_until_round_done(run_dir: Path, server_round: int) -> None:
    """Hold this worker until the server has finished ``server_round`` without us (at most
    ``HANG_S``), so the test neither races the server nor waits out a fixed sleep."""
    deadline = time.monotonic() + HANG_S
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(lines) >= server_round:
            return
        time.sleep(0.2)


@hanging_app.evaluate()
def hanging_evaluate(msg: Message, context: Context) -> Message:
    return fedrep_client.evaluate(msg, context)
