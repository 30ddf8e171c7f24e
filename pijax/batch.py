"""StepPlan -> StepInput: fixed-shape numpy arrays, padded to buckets. The one host->device hop.

Every distinct (tokens T, sequences S, block-table width W) shape is one compilation, so the
buckets are few and chosen by what a step's cost depends on:

- T, the token axis, runs through every matmul: powers of two from `MIN_TOKENS` up to the token
  budget, so padding costs at most 2x on the smallest steps and nothing near the budget.
- S follows T: `S = min(T, max_seqs)`. A step never has more sequences than tokens, and what S
  sizes (one logits row per sequence, the sampler, the block tables) is small beside the T-row
  matmuls, so a separate S ladder would multiply compilations for no measurable gain.
- W, the block-table width, matters only to attention that reads the whole padded table (the
  pure-JAX reference): it keeps a power-of-two ladder (`width_ladder=True`). The tiled CPU path
  and the kernels loop over the context each sequence owns, so for them W is one bucket, the
  maximum.

Default limits (256 tokens, 32 sequences, 2,048-token context, 16-token pages): 5 shapes with a
single width (was 114 with independent T, S and W ladders), 30 with the width ladder.

Padding is harmless by construction: padded tokens write into the null page and belong to no
sequence; padded sequences have no query rows and zero context.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Array, Int

from pijax.kv_pool import NULL_PAGE
from pijax.model.metadata import AttentionMetadata
from pijax.request import PENDING_TOKEN
from pijax.sampling import SamplingInput
from pijax.scheduler import SeqPlan, StepPlan

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
    width_ladder: bool = True  # False: every batch uses max_width (see the module docstring)

    @classmethod
    def for_limits(
        cls,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int,
        width_ladder: bool = True,
    ) -> Buckets:
        max_width = -(-max_model_len // page_size)
        return cls(
            next_pow2(max_num_batched_tokens, MIN_TOKENS),
            next_pow2(max_num_seqs, MIN_SEQS),
            next_pow2(max_width, MIN_WIDTH),
            width_ladder,
        )

    def pick(self, num_tokens: int, num_seqs: int, width: int) -> tuple[int, int, int]:
        if num_seqs > num_tokens:
            raise ValueError(f"num_seqs ({num_seqs}) must be <= num_tokens ({num_tokens})")
        T = min(next_pow2(num_tokens, MIN_TOKENS), self.max_tokens)
        W = min(next_pow2(width, MIN_WIDTH), self.max_width) if self.width_ladder else None
        return T, self._seqs(T), W or self.max_width

    def _seqs(self, T: int) -> int:
        return max(MIN_SEQS, min(T, self.max_seqs))

    def grid(self):
        """Every (T, S, W) shape the batch builder can produce."""

        def pows(lo, hi):
            v = lo
            while v < hi:
                yield v
                v *= 2
            yield hi

        widths = list(pows(MIN_WIDTH, self.max_width)) if self.width_ladder else [self.max_width]
        for t in pows(MIN_TOKENS, self.max_tokens):
            for w in widths:
                yield t, self._seqs(t), w


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInput:
    tokens: Int[Array, "T"]
    positions: Int[Array, "T"]
    logits_indices: Int[Array, "S"]  # row of each sequence's last new token
    # Overlapped scheduling: >= 0 where the row's token is still on the device: the index of
    # its sequence in the previous step's results (the step reads it there); -1 elsewhere.
    prev_index: Int[Array, "T"]
    meta: AttentionMetadata
    sampling: SamplingInput


def build_step_input(
    plan: StepPlan,
    page_size: int,
    buckets: Buckets,
    vocab_size: int,
    bitmasks: dict[str, np.ndarray] | None = None,
    prev_index: dict[str, int] | None = None,
    num_shards: int = 1,
) -> StepInput:
    """Numpy arrays for one step, from the plan record alone (no block manager, no live
    request). `bitmasks` maps request id -> allowed-token bitmask row; `prev_index` maps the
    id of a request whose last token is pending on the device to its column in the previous
    step's results (`result_columns`).

    With `num_shards` data shards, each shard's sequences (`SeqPlan.shard`) are packed into
    their own ragged batch of one bucket (T, S, W), and the global arrays are the D batches back
    to back: token rows `[d*T, (d+1)*T)`, sequence rows `[d*S, (d+1)*S)` and `cu_q_lens` rows
    `[d*(S+1), (d+1)*(S+1))` are shard d's, with offsets, page ids and slots local to the shard
    (the pool's page axis is split over `data`, so each device sees its shard's pages from 0,
    its own null page first); `meta.num_seqs` has one entry per shard. `logits_indices` are
    global rows. One shard is the plain layout (`num_seqs` a scalar)."""
    per_shard: list[list[SeqPlan]] = [[] for _ in range(num_shards)]
    for s in plan.seqs:
        per_shard[s.shard].append(s)
    T, S, W = buckets.pick(
        max(sum(s.num_new_tokens for s in seqs) for seqs in per_shard),
        max(len(seqs) for seqs in per_shard),
        max((len(s.block_ids) for s in plan.seqs), default=1),
    )
    words = -(-vocab_size // 32)

    batch = empty_step_input(T, S, W, words, num_shards)
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

    for d, seqs in enumerate(per_shard):
        t = t0 = d * T
        cu = cu_q_lens[d * (S + 1) : (d + 1) * (S + 1)]
        for j, s in enumerate(seqs):
            i = d * S + j
            n, start = s.num_new_tokens, s.start
            table = np.asarray(s.block_ids, np.int32)
            pos = np.arange(start, start + n, dtype=np.int32)
            tokens[t : t + n] = s.token_ids
            if s.token_ids[-1] == PENDING_TOKEN:  # only the last token can be pending
                batch.prev_index[t + n - 1] = prev_index[s.request_id]
                tokens[t + n - 1] = 0
            positions[t : t + n] = pos
            slot_mapping[t : t + n] = table[pos // page_size] * page_size + pos % page_size
            kv_lens[i] = start + n
            width = min(len(table), W)
            block_tables[i, :width] = table[:width]
            t += n
            cu[j + 1] = t - t0
            logits_indices[i] = t - 1
            p = s.params
            temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
            seed[i] = np.uint32(s.seed).view(np.int32)
            sample_pos[i] = start + n
            if bitmasks and s.request_id in bitmasks:
                bitmask[i] = bitmasks[s.request_id]
        cu[len(seqs) + 1 :] = t - t0
        if num_shards == 1:
            meta.num_seqs = np.asarray(len(seqs), np.int32)
        else:
            meta.num_seqs[d] = len(seqs)
    return batch


def result_columns(plan: StepPlan, num_shards: int, seqs_per_shard: int) -> list[int]:
    """The column of each plan sequence (in plan order) in the step's results: shard d's j-th
    sequence is column `d * seqs_per_shard + j`."""
    seen = [0] * num_shards
    cols = []
    for s in plan.seqs:
        cols.append(s.shard * seqs_per_shard + seen[s.shard])
        seen[s.shard] += 1
    return cols


def empty_step_input(T: int, S: int, W: int, words: int, num_shards: int = 1) -> StepInput:
    """An all-padding batch of the given bucket (per data shard): no sequence, every write into
    the null page."""
    D = num_shards
    return StepInput(
        tokens=np.zeros(D * T, np.int32),
        positions=np.zeros(D * T, np.int32),
        logits_indices=np.zeros(D * S, np.int32),
        prev_index=np.full(D * T, -1, np.int32),
        meta=AttentionMetadata(
            slot_mapping=np.zeros(D * T, np.int32),
            kv_lens=np.zeros(D * S, np.int32),
            block_tables=np.full((D * S, W), NULL_PAGE, np.int32),
            cu_q_lens=np.zeros(D * (S + 1), np.int32),
            num_seqs=np.zeros(D, np.int32) if D > 1 else np.asarray(0, np.int32),
        ),
        sampling=SamplingInput(
            temperature=np.zeros(D * S, np.float32),
            top_k=np.zeros(D * S, np.int32),
            top_p=np.ones(D * S, np.float32),
            seed=np.zeros(D * S, np.int32),
            position=np.zeros(D * S, np.int32),
            token_bitmask=np.full((D * S, words), -1, np.int32),
        ),
    )
