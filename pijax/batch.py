"""SchedulePlan -> StepInput: fixed-shape numpy arrays, padded to buckets. The one host->device hop.

Shapes are padded to powers of two — tokens (T), sequences (S) and block-table width (W) — so the
step compiles a bounded number of times: at most |T buckets| x |S buckets| x |W buckets|, and in
practice far fewer. Padding is harmless by construction: padded tokens write into the null page
and belong to no sequence; padded sequences have no query rows and zero context.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Array, Int

from pijax.block_manager import BlockManager
from pijax.kv_pool import NULL_PAGE
from pijax.model.metadata import AttentionMetadata
from pijax.sampling import SamplingInput
from pijax.scheduler import SchedulePlan

MIN_TOKENS = 16
MIN_SEQS = 4
MIN_WIDTH = 4


def next_pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class Buckets:
    max_tokens: int
    max_seqs: int
    max_width: int

    @classmethod
    def for_limits(
        cls, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, page_size: int
    ) -> Buckets:
        max_width = -(-max_model_len // page_size)
        return cls(
            next_pow2(max_num_batched_tokens, MIN_TOKENS),
            next_pow2(max_num_seqs, MIN_SEQS),
            next_pow2(max_width, MIN_WIDTH),
        )

    def pick(self, num_tokens: int, num_seqs: int, width: int) -> tuple[int, int, int]:
        return (
            min(next_pow2(num_tokens, MIN_TOKENS), self.max_tokens),
            min(next_pow2(num_seqs, MIN_SEQS), self.max_seqs),
            min(next_pow2(width, MIN_WIDTH), self.max_width),
        )

    def grid(self):
        """Every (T, S, W) shape the batch builder can produce."""

        def pows(lo, hi):
            v = lo
            while v < hi:
                yield v
                v *= 2
            yield hi

        for t in pows(MIN_TOKENS, self.max_tokens):
            for s in pows(MIN_SEQS, self.max_seqs):
                if s <= max(t, MIN_SEQS):
                    for w in pows(MIN_WIDTH, self.max_width):
                        yield t, s, w


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInput:
    tokens: Int[Array, "T"]
    positions: Int[Array, "T"]
    logits_indices: Int[Array, "S"]  # row of each sequence's last new token
    meta: AttentionMetadata
    sampling: SamplingInput


def build_step_input(
    plan: SchedulePlan,
    blocks: BlockManager,
    buckets: Buckets,
    vocab_size: int,
    bitmasks: dict[str, np.ndarray] | None = None,
) -> StepInput:
    """Numpy arrays for one step. `bitmasks` maps request id -> allowed-token bitmask row."""
    page_size = blocks.page_size
    seqs = plan.seqs
    widths = [-(-(s.request.num_computed_tokens + s.num_new_tokens) // page_size) for s in seqs]
    T, S, W = buckets.pick(plan.num_tokens, len(seqs), max(widths, default=1))
    words = -(-vocab_size // 32)

    batch = empty_step_input(T, S, W, words)
    tokens, positions, logits_indices = batch.tokens, batch.positions, batch.logits_indices
    meta, sp = batch.meta, batch.sampling
    slot_mapping, kv_lens, block_tables, cu_q_lens = (
        meta.slot_mapping,
        meta.kv_lens,
        meta.block_tables,
        meta.cu_q_lens,
    )
    temperature, top_k, top_p, seed = sp.temperature, sp.top_k, sp.top_p, sp.seed
    sample_pos, bitmask = sp.position, sp.token_bitmask

    t = 0
    for i, s in enumerate(seqs):
        req, n = s.request, s.num_new_tokens
        start = req.num_computed_tokens
        table = np.asarray(blocks.block_table(req.request_id), np.int32)
        pos = np.arange(start, start + n, dtype=np.int32)
        tokens[t : t + n] = req.all_token_ids[start : start + n]
        positions[t : t + n] = pos
        slot_mapping[t : t + n] = table[pos // page_size] * page_size + pos % page_size
        kv_lens[i] = start + n
        width = min(len(table), W)
        block_tables[i, :width] = table[:width]
        t += n
        cu_q_lens[i + 1] = t
        logits_indices[i] = t - 1
        p = req.params
        temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
        seed[i] = np.uint32(req.seed).view(np.int32)
        sample_pos[i] = start + n
        if bitmasks and req.request_id in bitmasks:
            bitmask[i] = bitmasks[req.request_id]
    cu_q_lens[len(seqs) + 1 :] = t

    meta.num_seqs = np.asarray(len(seqs), np.int32)
    return batch


def empty_step_input(T: int, S: int, W: int, words: int) -> StepInput:
    """An all-padding batch of the given bucket: no sequence, every write into the null page."""
    return StepInput(
        tokens=np.zeros(T, np.int32),
        positions=np.zeros(T, np.int32),
        logits_indices=np.zeros(S, np.int32),
        meta=AttentionMetadata(
            slot_mapping=np.zeros(T, np.int32),
            kv_lens=np.zeros(S, np.int32),
            block_tables=np.full((S, W), NULL_PAGE, np.int32),
            cu_q_lens=np.zeros(S + 1, np.int32),
            num_seqs=np.asarray(0, np.int32),
        ),
        sampling=SamplingInput(
            temperature=np.zeros(S, np.float32),
            top_k=np.zeros(S, np.int32),
            top_p=np.ones(S, np.float32),
            seed=np.zeros(S, np.int32),
            position=np.zeros(S, np.int32),
            token_bitmask=np.full((S, words), -1, np.int32),
        ),
    )
