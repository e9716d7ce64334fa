"""fedrep's ClientApp with every training message held for ``SLOW_S`` seconds first, so that a
round's messages overlap in time and each free actor must take one (``--client-app
slow_clientapp:app``, run from tests/)."""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as fedrep_client

SLOW_S = 1.0
app = ClientApp()
app.query()(fedrep_client.query)
app.evaluate()(fedrep_client.evaluate)


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(SLOW_S)
    return fedrep_client.train(msg, context)
