"""The Flower ServerApp: validate the run config, then run the resumable round loop.

Works unchanged under ``fedrep run`` (simulation engine in-process), ``flwr run .`` (local
SuperLink) and a multi-node deployment.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrep.config import parse_run_config
from fedrep.interrupts import StopRequested
from server.loop import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config, "Flower run config")
    try:
        run_federation(grid, cfg)
    except StopRequested:
        return  # the caller was interrupted and says so; the round in flight never counted
