"""The step input goes to the device as one buffer, built from the plan record alone.

`pack_step_input` / `unpack_step_input` round-trip every field bit for bit (floats are bit-cast,
not converted); the engine's step makes exactly one host->device transfer; and the plan the
scheduler returns is an immutable record that `update` does not change.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pijax import SamplingParams
from pijax.batch import Buckets, build_step_input
from pijax.block_manager import BlockManager
from pijax.request import Request
from pijax.scheduler import SeqPlan, StepPlan
from pijax.step import pack_step_input, unpack_step_input

PAGE = 4


def random_batch(seed: int):
    rng = np.random.default_rng(seed)
    blocks = BlockManager(num_pages=64, page_size=PAGE)
    seqs = []
    for i, (prompt, computed, n) in enumerate([(13, 5, 8), (7, 6, 1), (30, 0, 12)]):
        r = Request(
            f"r{i}",
            rng.integers(0, 70, prompt).tolist(),
            SamplingParams(
                temperature=float(rng.uniform(0, 2)),
                top_p=float(rng.uniform(0.1, 1)),
                top_k=int(rng.integers(0, 9)),
            ),
            eos_token_ids=(),
            seed=int(rng.integers(2**32)),
        )
        r.num_computed_tokens = computed
        blocks.ensure_capacity(r.request_id, computed + n)
        seqs.append(SeqPlan.of(r, n, blocks.block_table(r.request_id), PAGE))
    masks = {"r1": rng.integers(-(2**31), 2**31, 3, dtype=np.int64).astype(np.int32)}
    buckets = Buckets.for_limits(64, 8, 64, PAGE)
    return build_step_input(StepPlan(tuple(seqs), ()), PAGE, buckets, 70, masks)


@pytest.mark.parametrize("seed", range(3))
def test_pack_unpack_round_trips_every_field_bit_for_bit(seed):
    batch = random_batch(seed)
    buf, layout = pack_step_input(batch)
    assert buf.dtype == np.int32 and buf.ndim == 1
    for got in (
        unpack_step_input(buf, layout),
        jax.jit(unpack_step_input, static_argnums=1)(jax.numpy.asarray(buf), layout),
    ):
        want_leaves, want_def = jax.tree_util.tree_flatten(batch)
        got_leaves, got_def = jax.tree_util.tree_flatten(got)
        assert got_def == want_def
        for g, w in zip(got_leaves, want_leaves, strict=True):
            g = np.asarray(g)
            assert g.dtype == np.asarray(w).dtype and g.shape == np.shape(w)
            np.testing.assert_array_equal(g.view(np.int32), np.asarray(w).view(np.int32))


def test_engine_step_is_one_host_to_device_transfer(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    tiny_llm.generate([[1, 2]], SamplingParams(max_tokens=2))  # one-time device constants
    engine.add_request("one-transfer", [5, 6, 7, 8, 9], SamplingParams(max_tokens=3))
    puts = []
    real = jax.device_put

    def counting(x, *args, **kwargs):
        puts.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    # Three model steps (prefill + two decodes), one transfer each. With overlapped scheduling
    # the last step's tokens are read back by one more call that dispatches nothing.
    overlap = engine.config.scheduler.overlap_scheduling
    assert steps == 3 + int(overlap)
    assert len(puts) == 3 and all(isinstance(x, np.ndarray) for x in puts)


def test_the_plan_is_an_immutable_record(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("record", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule()
    (s,) = plan.seqs
    assert (s.request_id, s.start, s.num_new_tokens, s.samples) == ("record", 0, 6, True)
    assert s.token_ids == (1, 2, 3, 4, 5, 6) and len(s.block_ids) >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 3
    before = dataclasses.astuple(s)
    engine.scheduler.update(plan, [(9, 0.0)])
    assert dataclasses.astuple(s) == before  # `samples` no longer depends on when it is read
    engine.abort("record")
