"""The arrival driver without an engine: closed-loop clients, Poisson times, session chaining."""

from __future__ import annotations

import pytest

from pijax.bench.driver import ArrivalDriver, ArrivalMode, ArrivalSpec
from pijax.workload import WorkloadConfig, generate_workload


@pytest.fixture(scope="module")
def workload():
    return generate_workload(WorkloadConfig(num_conversations=12, seed=1, session_share=0.5))


def test_closed_loop_keeps_n_conversations_in_flight(workload):
    driver = ArrivalDriver(workload, ArrivalSpec(ArrivalMode.CLOSED, clients=3), start=0.0)
    now, inflight, seen, max_convs = 0.0, [], set(), 0
    while not driver.done:
        inflight += driver.due(now)
        max_convs = max(max_convs, len({p.conv.index for p in inflight}))
        p = inflight.pop(0)  # finish the oldest turn, with as many tokens as it asked for
        seen.add(p.request_id)
        now += 1.0
        driver.finished(p, now, [7] * p.output_len)
    assert max_convs == 3
    assert seen == {f"c{c.index}-t{i}" for c in workload.conversations for i in range(len(c.turns))}
    assert driver.num_done == len(workload.conversations)


def test_follow_up_prompt_is_history_plus_actual_output_plus_tool_tokens(workload):
    conv = next(c for c in workload.conversations if len(c.turns) > 1)
    driver = ArrivalDriver(
        workload, ArrivalSpec(ArrivalMode.CLOSED, clients=len(workload.conversations)), start=0.0
    )
    first = next(p for p in driver.due(0.0) if p.conv is conv)
    assert first.turn == 0 and first.arrival == 0.0
    output = [5, 6, 7]  # what the model produced, whatever the drawn length
    assert driver.finished(first, 2.5, output) is False
    second = next(p for p in driver.due(2.5) if p.conv is conv)
    assert second.turn == 1 and second.arrival == 2.5
    own = second.prompt[1].content
    assert own == conv.turns[0].new_tokens + tuple(output) + conv.turns[1].new_tokens
    assert second.prompt[0].content == workload.policy


def test_poisson_arrivals_follow_the_workload_times(workload):
    rate = 4.0
    driver = ArrivalDriver(workload, ArrivalSpec(ArrivalMode.POISSON, rate=rate), start=100.0)
    expected = [100.0 + t for t in workload.arrival_times(rate)]
    assert driver.next_time() == pytest.approx(expected[0])
    due = driver.due(100.0 + workload.arrival_times(rate)[4])
    assert [p.conv.index for p in due] == [0, 1, 2, 3, 4]
    assert [p.arrival for p in due] == pytest.approx(expected[:5])


def test_dropped_conversation_frees_its_client(workload):
    driver = ArrivalDriver(workload, ArrivalSpec(ArrivalMode.CLOSED, clients=1), start=0.0)
    (p,) = driver.due(0.0)
    driver.dropped(p, 1.0)
    (q,) = driver.due(1.0)
    assert q.conv.index == p.conv.index + 1 and driver.num_dropped == 1


def test_arrival_spec_validation():
    with pytest.raises(ValueError, match="rate"):
        ArrivalSpec(ArrivalMode.POISSON, rate=0.0)
    with pytest.raises(ValueError, match="clients"):
        ArrivalSpec(ArrivalMode.CLOSED, clients=0)
    assert ArrivalSpec("poisson", rate=2.0).mode is ArrivalMode.POISSON
