"""The "stock Flower" reference for ``bench/round_overhead.py``: fedrep's own ClientApp handlers,
with everything a typical ClientApp redoes per message redone per message.

A ClientApp written the usual way (the Flower tutorials' ``client_fn`` pattern) parses the run
config, builds its model, loads its partition from disk and partitions the data set again on
every call, because nothing outlives a message. fedrep's ClientApp keeps those per worker process
(``clients/app.py``); this one forgets them before each message, so the two differ in that
alone: same arithmetic, same messages, same replies.

    fedrep run --client-app bench.stock_clientapp:app ...
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as fedrep_client
from fedrep.data import federated


def forget_everything() -> None:
    """Drop the per-process caches: parsed config + built model, the decoded data set, the
    partition indices and the client tensors."""
    fedrep_client._setup.cache_clear()
    for cached in (federated.centralised_splits, federated.partitions, federated._client_data,
                   federated._on_device):
        cached.cache_clear()


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    forget_everything()
    return fedrep_client.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    forget_everything()
    return fedrep_client.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    forget_everything()
    return fedrep_client.evaluate(msg, context)
