"""Data shards on the host: placement (`DataShardedKV`), per-shard scheduling and the batch's
shard-by-shard layout, against a fake device (no model runs; the device side is
`tests/e2e/test_data_parallel.py`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pijax.batch import Buckets, build_step_input, result_columns
from pijax.block_manager import BlockManager
from pijax.config import SchedulerConfig
from pijax.kv_cache_manager import DataShardedKV, KVCacheManager, ShardedBlocks
from pijax.request import Request, SamplingParams, Scope, ScopeKind
from pijax.scheduler import Scheduler

PAGE = 4
VOCAB = 64


class Shards:
    """D shards of `pages` pages each, a scheduler over them, and a fake device."""

    def __init__(self, num_shards=2, pages=32, budget=16, max_seqs=4):
        self.kv = DataShardedKV(
            [KVCacheManager(BlockManager(pages, PAGE)) for _ in range(num_shards)]
        )
        self.blocks = ShardedBlocks([s.blocks for s in self.kv.shards])
        self.sched = Scheduler(
            SchedulerConfig(
                max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=4096
            ),
            self.kv,
        )
        self.ids = itertools.count()

    def add(self, n_prompt, max_tokens=4, session=None, segments=None, zones=frozenset()):
        rid = f"r{next(self.ids)}"
        segments = segments or [(list(range(1, n_prompt + 1)), Scope())]
        prompt = [t for ids, _ in segments for t in ids]
        req = Request(
            rid,
            prompt,
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            eos_token_ids=(),
            seed=0,
            arrival_order=int(rid[1:]),
            tenant="t",
            session_id=session,
        )
        self.kv.register(req, segments, zones)
        self.sched.add(req)
        return req

    def step(self):
        plan = self.sched.schedule()
        self.sched.update(plan, [(7, 0.0)] * len(plan.seqs))
        for req in list(self.sched.running):
            if len(req.output_token_ids) >= req.params.max_tokens:
                self.sched.remove(req, keep_session=True)
        return plan

    def drain(self):
        while self.sched.num_unfinished:
            self.step()


def test_least_loaded_placement_spreads_requests():
    s = Shards()
    reqs = [s.add(8) for _ in range(4)]
    assert [s.kv.shard_of(r) for r in reqs] == [0, 1, 0, 1]
    big = s.add(40, max_tokens=40)  # demand 80 on shard 0 ...
    assert s.kv.shard_of(big) == 0
    assert s.kv.shard_of(s.add(8)) == 1  # ... so the next goes to shard 1


def test_each_shard_holds_only_its_requests_pages():
    s = Shards()
    reqs = [s.add(9) for _ in range(4)]
    plan = s.step()
    assert {p.shard for p in plan.seqs} == {0, 1}
    for d, shard in enumerate(s.kv.shards):
        mine = {r.request_id for r in reqs if s.kv.shard_of(r) == d}
        held = {r.request_id for r in reqs if shard.blocks.has_seq(r.request_id)}
        assert held == mine
        shard.blocks.check_invariants()
    for p in plan.seqs:
        assert p.block_ids == tuple(s.kv.shards[p.shard].blocks.block_table(p.request_id))
    assert s.blocks.num_seqs() == 4
    assert s.blocks.num_usable_pages == 2 * 31


def test_token_budget_and_seq_limit_are_per_shard():
    s = Shards(budget=16, max_seqs=2)
    for _ in range(6):
        s.add(16)
    plan = s.step()
    # Two 16-token prefills, one per shard: each shard spends its own budget.
    per_shard = [sum(p.num_new_tokens for p in plan.seqs if p.shard == d) for d in (0, 1)]
    assert per_shard == [16, 16]
    s.step()
    s.step()
    counts = [sum(s.kv.shard_of(r) == d for r in s.sched.running) for d in (0, 1)]
    assert counts == [2, 2]  # max_num_seqs per shard, not in total


def test_a_closed_shard_does_not_block_the_other(monkeypatch):
    # Shard 0's head cannot fit (its pool is taken); a later request of shard 1 is admitted.
    s = Shards(pages=9, budget=64)
    place = iter([0, 0, 1])
    monkeypatch.setattr(s.kv, "_place", lambda *args: next(place))
    a = s.add(28, max_tokens=4)  # 7 of shard 0's 8 usable pages, then 8
    s.step()
    c = s.add(8, max_tokens=2)  # shard 0: no room until `a` ends
    d = s.add(4, max_tokens=2)  # shard 1, behind `c` in the queue
    s.step()
    assert a in s.sched.running and d in s.sched.running
    assert c in s.sched.waiting
    s.drain()
    for shard in s.kv.shards:
        assert shard.blocks.num_seqs() == 0


def test_session_turns_go_back_to_their_shard_and_reuse_kv():
    s = Shards()
    t1 = s.add(12, session="s1", segments=[(list(range(1, 13)), Scope(ScopeKind.SESSION, "s1"))])
    home = s.kv.shard_of(t1)
    s.add(12)  # load the other shard so least-loaded would not pick `home` by chance
    s.drain()
    assert s.kv.has_session("t", "s1")
    # Shard 0 pins the session's 12 tokens: the next request goes to shard 1, the one after
    # to shard 0 again (12 + 8 against 12): shard 1 is then the less loaded one.
    assert home == 0 and [s.kv.shard_of(s.add(n)) for n in (8, 4)] == [1, 0]
    prompt = list(range(1, 13)) + [7] * 4 + [50, 51, 52, 53]
    t2 = s.add(20, session="s1", segments=[(prompt, Scope(ScopeKind.SESSION, "s1"))])
    assert s.kv.shard_of(t2) == home
    s.step()
    assert t2.num_cached_prompt_tokens == 12  # the first turn's 3 full pages


def test_cached_shared_prefix_draws_requests_to_its_shard():
    s = Shards()
    s.kv.register_trusted_prefix("policy", list(range(100, 116)), "test")
    policy = (list(range(100, 116)), Scope(ScopeKind.SHARED, "policy"))
    zones = frozenset({"policy"})
    s.add(8)  # shard 0
    first = s.add(0, segments=[policy, (list(range(1, 9)), Scope())], zones=zones)
    assert s.kv.shard_of(first) == 1
    s.drain()
    s.add(8)  # shard 0 is now the less loaded one ...
    again = s.add(0, segments=[policy, (list(range(9, 17)), Scope())], zones=zones)
    assert s.kv.shard_of(again) == 1  # ... but the policy's KV is on shard 1
    s.step()
    assert again.num_cached_prompt_tokens == 16
    stats = s.kv.prefix_stats()
    assert stats.hits_by_zone["policy"] == 4
    assert stats.num_registered_prefixes == 1


def test_batch_layout_is_shard_by_shard_with_local_pages():
    s = Shards()
    reqs = [s.add(n) for n in (5, 5, 6)]  # shards 0, 1, 0 (least loaded, ties to 0)
    plan = s.step()
    buckets = Buckets.for_limits(16, 4, 64, PAGE, width_ladder=False)
    batch = build_step_input(plan, PAGE, buckets, VOCAB, num_shards=2)
    T = batch.tokens.shape[0] // 2
    S = batch.logits_indices.shape[0] // 2
    assert batch.meta.num_seqs.tolist() == [2, 1]
    assert batch.meta.cu_q_lens.tolist()[: S + 1][:3] == [0, 5, 11]
    assert batch.meta.cu_q_lens.tolist()[S + 1 :][:2] == [0, 5]
    # Shard 1's tokens start at its own row block; its slots and pages are its own (local).
    assert batch.tokens[T : T + 5].tolist() == [1, 2, 3, 4, 5]
    b1 = s.kv.shards[1].blocks.block_table(reqs[1].request_id)
    assert batch.meta.block_tables[S, : len(b1)].tolist() == b1
    assert batch.meta.slot_mapping[T : T + 4].tolist() == [b1[0] * PAGE + i for i in range(4)]
    assert batch.meta.slot_mapping[T + 4] == b1[1] * PAGE
    assert batch.logits_indices.tolist()[:2] == [4, 10]
    assert batch.logits_indices[S] == T + 4
    cols = result_columns(plan, 2, S)
    by_id = dict(zip((p.request_id for p in plan.seqs), cols, strict=True))
    assert by_id == {reqs[0].request_id: 0, reqs[2].request_id: 1, reqs[1].request_id: S}
    # Padding: shard rows past their sequences write into the shard's own null page.
    assert np.all(batch.meta.slot_mapping[T + 5 : 2 * T] < PAGE)


def test_one_shard_needs_no_wrapper():
    with pytest.raises(ValueError, match="needs >= 2 shards"):
        DataShardedKV([KVCacheManager(BlockManager(8, PAGE))])
