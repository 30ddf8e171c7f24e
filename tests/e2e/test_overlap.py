"""Overlapped scheduling gives the synchronous loop's outputs, token for token.

With `overlap_scheduling`, step N+1 is scheduled and dispatched before step N's results are
read: its decodes read their input token from N's result on the device and stop conditions are
applied one step late. Everything a caller sees must be unchanged: greedy and seeded sampling,
stop strings and stop token ids, EOS, structured output, logprobs, aborts and preemption.
"""

from __future__ import annotations

import numpy as np
import pytest

import pijax.engine
from pijax import LLM, SamplingParams

OPTS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=16)


@pytest.fixture(scope="module")
def llms():
    return {
        mode: LLM("tiny-random", num_pages=96, overlap_scheduling=mode, **OPTS)
        for mode in (False, True)
    }


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, int(k)).tolist() for k in rng.integers(1, 80, n)]


def outcome(outs):
    """Tokens, text and finish reason exactly; log-probs to 1e-5 (a step's batch may hold one
    more row in overlap, a token computed past a stop, and float sums depend on the shape)."""
    return [
        (o.token_ids, o.text, o.finish_reason, None if o.logprobs is None else Close(o.logprobs))
        for o in outs
    ]


class Close:
    def __init__(self, values):
        self.values = np.asarray(values)

    def __eq__(self, other):
        return self.values.shape == other.values.shape and np.allclose(
            self.values, other.values, rtol=0, atol=1e-5
        )

    def __repr__(self):
        return repr(self.values)


def both(llms, ps, params):
    return [outcome(llms[mode].generate(ps, params)) for mode in (False, True)]


@pytest.fixture
def pending_rows(monkeypatch):
    """How many rows of each built step read their token from the previous step's result."""
    rows = []
    build = pijax.engine.build_step_input

    def recording(*args, **kwargs):
        batch = build(*args, **kwargs)
        rows.append(int((batch.prev_index >= 0).sum()))
        return batch

    monkeypatch.setattr(pijax.engine, "build_step_input", recording)
    return rows


def test_greedy_and_logprobs_identical_and_really_overlapped(llms, pending_rows):
    ps = prompts(12, 0)
    params = [
        SamplingParams(temperature=0.0, max_tokens=int(k), logprobs=True) for k in range(3, 27, 2)
    ]
    sync = outcome(llms[False].generate(ps, params))
    assert sum(pending_rows) == 0  # the synchronous loop never reads a token on the device
    overlapped = outcome(llms[True].generate(ps, params))
    assert sum(pending_rows) > 0
    assert overlapped == sync


def test_seeded_sampling_identical(llms):
    ps = prompts(8, 1)
    params = [
        SamplingParams(temperature=0.9, top_k=k, top_p=0.8, seed=100 + i, max_tokens=20)
        for i, k in enumerate([0, 5, 0, 50, 3, 0, 7, 0])
    ]
    sync, overlapped = both(llms, ps, params)
    assert overlapped == sync


def test_stops_found_one_step_late_are_cut_alike(llms):
    ps = prompts(6, 2)
    free = llms[False].generate(ps, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    # Stop tokens and stop strings taken from the middle of each greedy output, so every
    # request stops early (the overlapped loop has computed a token past the stop by then).
    params = []
    for i, o in enumerate(free):
        mid = len(o.text) // 2
        if i % 2 or mid < 2:
            stop = dict(stop_token_ids=(o.token_ids[6],))
        else:
            stop = dict(stop=(o.text[mid : mid + 2],))
        params.append(SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, **stop))
    sync, overlapped = both(llms, ps, params)
    assert overlapped == sync
    assert all(len(ids) < 30 for ids, *_ in sync)


def test_structured_output_identical(llms):
    ps = prompts(4, 3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, regex=r"[a-f]{3}-[0-9]{2,5}"),
        SamplingParams(temperature=0.0, max_tokens=25),
        SamplingParams(temperature=0.8, seed=7, max_tokens=40, regex=r"(yes|no)( [0-9]+)?"),
        SamplingParams(temperature=0.0, max_tokens=25),
    ]
    sync, overlapped = both(llms, ps, params)
    assert overlapped == sync


def test_preemption_identical(llms):
    """Eight requests growing to 5 pages each in a 24-page pool: preemptions in both modes."""
    ps = prompts(8, 4)
    tight = {
        mode: LLM("tiny-random", num_pages=24, overlap_scheduling=mode, **OPTS)
        for mode in (False, True)
    }
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    sync, overlapped = both(tight, [p[:16] for p in ps], params)
    assert overlapped == sync
    assert all(tight[m].engine.stats().num_preemptions > 0 for m in (False, True))


def test_aborts_leave_the_others_alone_and_free_everything(llms):
    ps = prompts(6, 5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = []
    for mode in (False, True):
        engine = llms[mode].engine
        free_before = engine.stats().num_free_pages
        ids = [f"abort-{mode}-{i}" for i in range(len(ps))]
        for rid, p in zip(ids, ps, strict=True):
            engine.add_request(rid, p, params)
        final, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.token_ids
            steps += 1
            if steps in (3, 6):
                engine.abort(ids[steps // 3])  # ids 1 and 2, mid-decode
        assert engine.stats().num_free_pages == free_before
        assert not engine.scheduler.running and not engine.scheduler.waiting
        results.append([final.get(rid) for i, rid in enumerate(ids) if i not in (1, 2)])
    assert results[0] == results[1]
    assert all(r is not None and len(r) == 24 for r in results[1])


def test_an_id_reused_while_its_old_step_is_in_flight(llms):
    """Abort a request while a step computes for it and add a new request under the same id at
    once: the in-flight step's token belongs to the old request and is discarded; the new one's
    output is what it would be alone (a stale plan used to write into the new request)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    old, new = prompts(2, seed=11)
    engine = llms[True].engine
    want = llms[False].generate([new], params)[0].token_ids
    engine.add_request("reused", old, params)
    while not engine.scheduler.running:
        engine.step()
    engine.step()  # a decode step for the old request is now in flight
    assert engine._inflight is not None
    engine.abort("reused")
    engine.add_request("reused", new, params)
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "reused"
            tokens += out.new_token_ids
    assert tokens == want
    assert engine.blocks.num_used_pages() == 0
