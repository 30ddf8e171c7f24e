"""Drive one in-process engine through a workload and record what a user would have seen.

Per turn: its scheduled arrival (not the moment it was handed to the engine: a turn that comes
due while a step runs waits for that step, and that wait is part of its latency), first
scheduled, every token time, finish, prompt and cached tokens. Per step: the step's duration and
the engine's pool and queue state.

A turn ends at its drawn output length through `StopAfter`, a token constraint that lets every
token through and reports "stopped" after n tokens — standing in for the EOS a real model would
emit there. `max_tokens` stays the client's cap, so the contiguous baseline reserves for the cap,
as such engines must.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import time

import numpy as np

from pijax.bench.driver import ArrivalDriver, ArrivalSpec, PendingTurn
from pijax.engine import Engine
from pijax.request import OverloadedError, RequestOutput, SamplingParams
from pijax.workload import POLICY_ZONE, ClaimKind, Workload

PERMITTED = frozenset({POLICY_ZONE})


def show_progress(option: bool | None) -> bool:
    if option is not None:
        return option
    return sys.stderr.isatty() and not os.environ.get("CI")


class ProgressBar:
    """tqdm over requests on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"{desc:>20}", unit="req", leave=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StopAfter:
    """A `TokenConstraint` that allows every token and stops the request after `n` of them."""

    def __init__(self, n: int):
        self.n = n
        self.seen = 0

    def fill_bitmask(self, out: np.ndarray) -> None:
        out[:] = -1

    def accept(self, token_id: int) -> None:
        self.seen += 1

    def is_stopped(self) -> bool:
        return self.seen >= self.n


@dataclasses.dataclass
class TurnRecord:
    request_id: str
    conversation: int
    turn: int
    kind: TurnKind
    claim_kind: ClaimKind
    arrival: float
    first_scheduled: float | None
    token_times: list[float]
    finish: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def queue(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        """(e2e latency - TTFT) / (n - 1): the mean gap between output tokens after the first."""
        n = len(self.token_times)
        return None if n < 2 else (self.finish - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


class TurnKind(enum.Enum):
    SINGLE = "single"  # a one-turn claim review
    SESSION_FIRST = "session_first"  # the first turn of a multi-turn investigation
    SESSION_FOLLOW_UP = "session_follow_up"  # a later turn: its history may be reused


def turn_kind(p: PendingTurn) -> TurnKind:
    if p.conv.session_id is None:
        return TurnKind.SINGLE
    return TurnKind.SESSION_FIRST if p.turn == 0 else TurnKind.SESSION_FOLLOW_UP


@dataclasses.dataclass
class StepSample:
    t: float
    step_s: float
    running: int
    waiting: int
    pool_usage: float | None  # None: no paged pool (the transformers baseline)
    waste: float | None
    cached_pages: int = 0  # unreferenced prefix-cache pages (evictable)
    session_pages: int = 0


@dataclasses.dataclass
class RunResult:
    name: str
    start: float
    end: float
    turns: list[TurnRecord]
    steps: list[StepSample]
    conversations_done: int
    conversations_dropped: int
    compiles_during_run: int | None
    preemptions: int | None
    prefix: dict | None  # queries/hits by zone, tokens saved
    page_size: int | None = None
    usable_pages: int | None = None


def sampling_for(p: PendingTurn, max_model_len: int, cap: int) -> SamplingParams:
    """Greedy, EOS ignored (a random model may emit it anywhere); `max_tokens` is the client's
    cap, bounded by what the context has left, and never below the drawn output length."""
    max_tokens = max(p.output_len, min(cap, max_model_len - p.prompt_len))
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_engine(
    engine: Engine, workload: Workload, arrival: ArrivalSpec, *, name: str, bar=None
) -> RunResult:
    """Run the whole workload through `engine` (already warmed up) and record it."""
    cap = workload.config.max_tokens_cap
    compiles_before = engine.compile_count
    preempt_before = engine.stats().num_preemptions
    start = time.monotonic()
    driver = ArrivalDriver(workload, arrival, start)
    inflight: dict[str, PendingTurn] = {}
    turns: list[TurnRecord] = []
    steps: list[StepSample] = []

    def submit(p: PendingTurn) -> None:
        try:
            engine.add_request(
                p.request_id,
                p.prompt,
                sampling_for(p, engine.max_model_len, cap),
                tenant=p.conv.tenant,
                session_id=p.conv.session_id,
                permitted_zones=PERMITTED,
                constraint=StopAfter(p.output_len),
            )
        except OverloadedError:
            driver.dropped(p, time.monotonic())
            return
        inflight[p.request_id] = p

    while not driver.done:
        for p in driver.due(time.monotonic()):
            submit(p)
        if not engine.has_unfinished_requests():
            nxt = driver.next_time()
            if nxt is None:
                break
            time.sleep(max(0.0, nxt - time.monotonic()))
            continue
        t0 = time.monotonic()
        outs = engine.step()
        t1 = time.monotonic()
        for out in outs:
            if out.finished:
                p = inflight.pop(out.request_id)
                turns.append(_record(p, out))
                finish = out.timings.finish if out.timings else t1
                if driver.finished(p, finish, out.token_ids) and p.conv.session_id:
                    engine.end_session(p.conv.tenant, p.conv.session_id)
                if bar is not None:
                    bar.update(1)
        s = engine.stats()
        steps.append(
            StepSample(
                t1,
                t1 - t0,
                s.num_running,
                s.num_waiting,
                s.pool_usage,
                s.waste,
                s.pages_held_by_prefix_cache,
                s.pages_held_by_sessions,
            )
        )
    end = time.monotonic()
    s = engine.stats()
    return RunResult(
        name=name,
        start=start,
        end=end,
        turns=turns,
        steps=steps,
        conversations_done=driver.num_done,
        conversations_dropped=driver.num_dropped,
        compiles_during_run=engine.compile_count - compiles_before,
        preemptions=s.num_preemptions - preempt_before,
        prefix={
            "queries_by_zone": s.prefix_queries_by_zone,
            "hits_by_zone": s.prefix_hits_by_zone,
            "tokens_saved": s.prefix_tokens_saved,
        },
        page_size=engine.blocks.page_size,
        usable_pages=engine.blocks.num_usable_pages,
    )


def _record(p: PendingTurn, out: RequestOutput) -> TurnRecord:
    tm = out.timings
    return TurnRecord(
        request_id=p.request_id,
        conversation=p.conv.index,
        turn=p.turn,
        kind=turn_kind(p),
        claim_kind=p.conv.kind,
        arrival=p.arrival,
        first_scheduled=tm.first_scheduled,
        token_times=list(tm.token_times),
        finish=tm.finish,
        prompt_tokens=out.num_prompt_tokens,
        cached_tokens=out.num_cached_tokens,
    )
