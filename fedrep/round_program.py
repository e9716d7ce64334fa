"""What the server runs each round: the one interface the round loop (``server/loop.py``) calls.

A strategy plugin's server half is a :class:`RoundProgram`. The loop owns everything around a
round (the run folder, checkpoints, metrics, progress, resume); the program owns the round
itself: which nodes get which messages, how replies become the next global arrays, and what it
must remember across rounds. FedRep and the baselines run one phase (send the shared arrays,
average what comes back: ``server.strategies.base.SharedAveraging``, also a Flower ``Strategy``
whose hooks it honours); KD3A runs two (sources, then the target with every source's model). Both
implement this interface, so the loop needs no knowledge of either and no ``hasattr`` probing.

A third party implements it (usually by subclassing ``SharedAveraging``) and imports it from
``fedrep`` alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import Grid


@dataclass
class TrainOutcome:
    """One training phase's result: the new global arrays (None when every client failed), the
    round's train metrics, and the bytes the server sent."""

    arrays: ArrayRecord | None
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0


@dataclass
class EvalOutcome:
    """An evaluation's aggregated metrics and the bytes the server sent for it."""

    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0


class RoundProgram(ABC):
    """The server half of a strategy, as the round loop drives it.

    ``grid`` is the loop's auditing grid (every reply is recorded in ``messages.jsonl``);
    ``config`` already carries the run folder; ``timeout`` bounds each exchange."""

    @abstractmethod
    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                    timeout: float) -> TrainOutcome:
        """Train one round from the global ``arrays``."""

    @abstractmethod
    def evaluate_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                       timeout: float) -> EvalOutcome:
        """Evaluate the federation's clients on ``arrays`` (and their own personal parts)."""

    def evaluate_new_clients(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                             grid: Grid, timeout: float) -> EvalOutcome:
        """The held-out new clients train from ``arrays`` and report (``new-clients``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate new clients; set new-clients=0")

    def onboard(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                timeout: float, trained: set[int]) -> list[dict[str, Any]]:
        """After the run: every connected client whose partition is not in ``trained`` gets a
        head on ``arrays`` (``onboard``); one row of metrics per client that answered."""
        raise NotImplementedError(f"{type(self).__name__} cannot onboard new clients")

    def state_dict(self) -> dict[str, Any]:
        """What the program must remember across rounds (saved in ``state.json`` after every
        round, JSON-serialisable); {} when nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume. A program without state refuses one, since a
        saved state it cannot take means the run folder is another strategy's."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state between rounds, but the run "
                             f"folder holds some ({sorted(state)[:3]})")

    def drain_events(self) -> list[dict[str, Any]]:
        """Membership and other events since the last call (for ``events.jsonl``)."""
        return []

    def lost_partitions(self) -> dict[int, int]:
        """Partitions whose node was lost, with the round it was lost in."""
        return {}
