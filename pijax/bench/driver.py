"""When each turn of the workload is sent, and what its prompt is.

The engine has no clock of its own: a runner asks the driver which turns are due, submits them,
steps its engine, and reports finished turns back. The driver then schedules what follows:

  * Poisson: conversation i arrives at `start + workload.arrival_times(rate)[i]`;
  * closed loop: N clients, each with one conversation in flight; a client starts the next
    conversation the moment its current one ends;
  * either way, a follow-up turn is sent only when the previous turn of its session has finished
    (plus the workload's think time), and its prompt is the previous prompt + the tokens the model
    actually produced + the new tool output.

Times are `time.monotonic()` seconds, the clock the engine stamps its timings with.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Sequence

from pijax.request import PromptSegment
from pijax.workload import Conversation, Workload


class ArrivalMode(enum.Enum):
    POISSON = "poisson"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class ArrivalSpec:
    mode: ArrivalMode = ArrivalMode.CLOSED
    rate: float = 1.0  # conversations per second (Poisson)
    clients: int = 8  # concurrent clients (closed loop)

    def __post_init__(self):
        object.__setattr__(self, "mode", ArrivalMode(self.mode))
        if self.mode is ArrivalMode.POISSON and not self.rate > 0:
            raise ValueError(f"arrival rate must be > 0 conversations/s; got {self.rate!r}")
        if self.mode is ArrivalMode.CLOSED and not (
            isinstance(self.clients, int) and self.clients >= 1
        ):
            raise ValueError(f"arrival clients must be an integer >= 1; got {self.clients!r}")

    def describe(self) -> str:
        if self.mode is ArrivalMode.POISSON:
            return f"Poisson, {self.rate:g} conversations/s"
        return f"closed loop, {self.clients} clients"

    def to_dict(self) -> dict:
        return {"mode": self.mode.value, "rate": self.rate, "clients": self.clients}


@dataclasses.dataclass(frozen=True)
class PendingTurn:
    conv: Conversation
    turn: int
    arrival: float
    prompt: list[PromptSegment]

    @property
    def request_id(self) -> str:
        return f"c{self.conv.index}-t{self.turn}"

    @property
    def prompt_len(self) -> int:
        return sum(len(s.content) for s in self.prompt)

    @property
    def output_len(self) -> int:
        return self.conv.turns[self.turn].output_len


class ArrivalDriver:
    def __init__(self, workload: Workload, arrival: ArrivalSpec, start: float):
        self.workload = workload
        self.arrival = arrival
        self._history: dict[int, list[int]] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (time, tiebreak, conv, turn)
        self._tiebreak = 0
        self._next_conv = 0
        self.num_done = 0
        self.num_dropped = 0
        convs = workload.conversations
        if arrival.mode is ArrivalMode.POISSON:
            for conv, t in zip(convs, workload.arrival_times(arrival.rate), strict=True):
                self._push(start + t, conv.index, 0)
            self._next_conv = len(convs)
        else:
            for _ in range(min(arrival.clients, len(convs))):
                self._start_next(start)

    def _push(self, t: float, conv: int, turn: int) -> None:
        heapq.heappush(self._heap, (t, self._tiebreak, conv, turn))
        self._tiebreak += 1

    def _start_next(self, t: float) -> None:
        if self._next_conv < len(self.workload.conversations):
            self._push(t, self._next_conv, 0)
            self._next_conv += 1

    @property
    def done(self) -> bool:
        return self.num_done + self.num_dropped == len(self.workload.conversations)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[PendingTurn]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            t, _, ci, turn = heapq.heappop(self._heap)
            conv = self.workload.conversations[ci]
            history = self._history.get(ci, [])
            out.append(PendingTurn(conv, turn, t, self.workload.prompt(conv, history, turn)))
        return out

    def finished(self, pending: PendingTurn, t: float, output_ids: Sequence[int]) -> bool:
        """Record a finished turn; schedule what follows. True when the conversation is over."""
        conv, turn = pending.conv, pending.turn
        hist = self._history.setdefault(conv.index, [])
        hist.extend(conv.turns[turn].new_tokens)
        hist.extend(output_ids)
        if turn + 1 < len(conv.turns):
            self._push(t + self.workload.config.think_time_s, conv.index, turn + 1)
            return False
        self._history.pop(conv.index, None)
        self.num_done += 1
        if self.arrival.mode is ArrivalMode.CLOSED:
            self._start_next(t)
        return True

    def dropped(self, pending: PendingTurn, t: float) -> None:
        """The server refused the turn (overload): the conversation ends unfinished."""
        self._history.pop(pending.conv.index, None)
        self.num_dropped += 1
        if self.arrival.mode is ArrivalMode.CLOSED:
            self._start_next(t)
