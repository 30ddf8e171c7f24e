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
from pijax.scheduler import StepPlan

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
) -> StepInput:
    """Numpy arrays for one step, from the plan record alone (no block manager, no live
    request). `bitmasks` maps request id -> allowed-token bitmask row; `prev_index` maps the
    id of a request whose last token is pending on the device to its row in the previous
    step's results."""
    seqs = plan.seqs
    widths = [len(s.block_ids) for s in seqs]
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
        cu_q_lens[i + 1] = t
        logits_indices[i] = t - 1
        p = s.params
        temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
        seed[i] = np.uint32(s.seed).view(np.int32)
        sample_pos[i] = start + n
        if bitmasks and s.request_id in bitmasks:
            bitmask[i] = bitmasks[s.request_id]
    cu_q_lens[len(seqs) + 1 :] = t

    meta.num_seqs = np.asarray(len(seqs), np.int32)
    return batch


def empty_step_input(T: int, S: int, W: int, words: int) -> StepInput:
    """An all-padding batch of the given bucket: no sequence, every write into the null page."""
    return StepInput(
        tokens=np.zeros(T, np.int32),
        positions=np.zeros(T, np.int32),
        logits_indices=np.zeros(S, np.int32),
        prev_index=np.full(T, -1, np.int32),
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
