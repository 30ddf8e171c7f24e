"""`build_step_input` on hand-worked batches: every array checked entry by entry.

The bucket sizes come from `Buckets.pick` (their policy is tested on its own); what is checked
here is what the builder writes into them: the ragged token layout, slots, context lengths,
block tables, query offsets, logits rows, sampling rows, and that padding stays harmless.
"""

from __future__ import annotations

import numpy as np

from pijax.batch import Buckets, build_step_input
from pijax.block_manager import BlockManager
from pijax.kv_pool import NULL_PAGE
from pijax.request import Request, SamplingParams
from pijax.scheduler import SeqPlan, StepPlan

PAGE = 4
VOCAB = 70  # 3 bitmask words, the last one partial


def request(rid, prompt, *, output=(), computed=0, seed=0, **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=(), seed=seed)
    r.output_token_ids = list(output)
    r.num_computed_tokens = computed
    return r


def build(seqs, blocks, bitmasks=None, buckets=None):
    buckets = buckets or Buckets.for_limits(64, 8, 64, PAGE)
    for r, n in seqs:
        blocks.ensure_capacity(r.request_id, r.num_computed_tokens + n)
    plan = StepPlan(
        tuple(SeqPlan.of(r, n, blocks.block_table(r.request_id), PAGE) for r, n in seqs), ()
    )
    return build_step_input(plan, PAGE, buckets, VOCAB, bitmasks), buckets


def test_prefill_chunk_and_decode_in_one_step():
    blocks = BlockManager(num_pages=16, page_size=PAGE)
    # "a": 6 of 10 prompt tokens computed already; this step runs the next 3 (a chunk, no sample).
    a = request("a", range(100, 110), computed=6, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    # "b": a 5-token prompt and 2 outputs, all but the last output computed: a decode step.
    b = request("b", range(200, 205), output=[300, 301], computed=6, temperature=0.0, seed=2**31)
    blocks.ensure_capacity("a", 6)  # the pages the earlier chunk used
    blocks.ensure_capacity("b", 6)
    batch, buckets = build([(a, 3), (b, 1)], blocks)
    ta, tb = blocks.block_table("a"), blocks.block_table("b")
    assert len(ta) == 3 and len(tb) == 2  # cdiv(9, 4), cdiv(7, 4)

    T, S, W = buckets.pick(4, 2, 3)
    assert batch.tokens.shape == (T,) and batch.logits_indices.shape == (S,)
    assert batch.meta.block_tables.shape == (S, W)

    np.testing.assert_array_equal(batch.tokens[:4], [106, 107, 108, 301])
    np.testing.assert_array_equal(batch.positions[:4], [6, 7, 8, 6])
    want_slots = [ta[1] * PAGE + 2, ta[1] * PAGE + 3, ta[2] * PAGE + 0, tb[1] * PAGE + 2]
    np.testing.assert_array_equal(batch.meta.slot_mapping[:4], want_slots)
    np.testing.assert_array_equal(batch.meta.kv_lens[:2], [9, 7])
    np.testing.assert_array_equal(batch.meta.cu_q_lens[:3], [0, 3, 4])
    np.testing.assert_array_equal(batch.logits_indices[:2], [2, 3])
    np.testing.assert_array_equal(batch.meta.block_tables[0, :3], ta)
    np.testing.assert_array_equal(batch.meta.block_tables[1, :2], tb)
    assert int(batch.meta.num_seqs) == 2

    sp = batch.sampling
    np.testing.assert_allclose(sp.temperature[:2], [0.7, 0.0])
    np.testing.assert_array_equal(sp.top_k[:2], [5, 0])
    np.testing.assert_allclose(sp.top_p[:2], [0.9, 1.0])
    # The seed's uint32 bits, carried as int32: 2**31 wraps to the most negative int32.
    np.testing.assert_array_equal(sp.seed[:2], [3, -(2**31)])
    np.testing.assert_array_equal(sp.position[:2], [9, 7])  # the position being sampled

    # Padding: tokens write into the null page; padded sequences have no rows and no context.
    assert (batch.tokens[4:] == 0).all()
    assert (batch.meta.slot_mapping[4:] // PAGE == NULL_PAGE).all()
    assert (batch.meta.kv_lens[2:] == 0).all()
    assert (batch.meta.cu_q_lens[3:] == 4).all()
    assert (batch.meta.block_tables[0, 3:] == NULL_PAGE).all()
    assert (batch.meta.block_tables[2:] == NULL_PAGE).all()
    assert (sp.token_bitmask == -1).all()  # no constraint: every token allowed


def test_bitmask_rows_follow_their_request():
    blocks = BlockManager(num_pages=8, page_size=PAGE)
    a = request("a", [1, 2])
    b = request("b", [3])
    mask = np.array([0b101, 0, 1 << 5], np.int32)  # tokens 0, 2 and 69
    batch, _ = build([(a, 2), (b, 1)], blocks, bitmasks={"b": mask})
    np.testing.assert_array_equal(batch.sampling.token_bitmask[1], mask)
    assert (batch.sampling.token_bitmask[0] == -1).all()
    assert batch.sampling.token_bitmask.shape[1] == 3  # cdiv(70, 32)


def test_block_table_wider_than_the_bucket_is_cut_to_it():
    """A width bucket below a sequence's table (the width ladder's smallest bucket) keeps the
    table's first W pages; the slots still address the true pages."""
    blocks = BlockManager(num_pages=32, page_size=PAGE)
    r = request("a", range(1, 22), computed=20)  # 21 tokens: 6 pages
    blocks.ensure_capacity("a", 20)
    buckets = Buckets(max_tokens=16, max_seqs=4, max_width=4, width_ladder=True)
    batch, _ = build([(r, 1)], blocks, buckets=buckets)
    table = blocks.block_table("a")
    assert len(table) == 6
    np.testing.assert_array_equal(batch.meta.block_tables[0], table[:4])
    assert batch.meta.slot_mapping[0] == table[5] * PAGE + 0
    assert batch.meta.kv_lens[0] == 21


def test_empty_plan_is_all_padding():
    blocks = BlockManager(num_pages=4, page_size=PAGE)
    batch, _ = build([], blocks)
    assert int(batch.meta.num_seqs) == 0
    assert (batch.meta.cu_q_lens == 0).all() and (batch.meta.kv_lens == 0).all()
    assert (batch.meta.slot_mapping // PAGE == NULL_PAGE).all()
