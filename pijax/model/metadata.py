"""The attention metadata of one ragged step (device pytree; built on the host by `batch.py`).

Shape letters of the jaxtyping annotations, one meaning each, across the engine (`batch`,
`metadata`, `kv_pool`, `sampling`, `step`, `model`, `kernels`):

  T   tokens of a step (the flattened ragged token axis; per row in the dense path)
  S   sequences of a step                   W   block-table width (pages per sequence)
  P   pages of the KV pool                  PS  slots per page (the page size)
  H   query heads                           K   kv heads
  D   head dim                              E   hidden (embedding) size
  V   vocabulary                            VW  bitmask words per vocabulary (cdiv(V, 32))
  L   layers                                B   rows of a dense batch
  Tp  tokens of a shared dense prefix

`S+1` is one more than S (the offsets `cu_q_lens`).
"""

from __future__ import annotations

import dataclasses

import jax
from jaxtyping import Array, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flattened token axis and in the pool.

    Sequence `s` owns query rows `cu_q_lens[s]:cu_q_lens[s+1]`, has `kv_lens[s]` context tokens
    after this step's writes, and reads pages `block_tables[s, :ceil(kv_lens[s]/page_size)]`.
    Padded sequences (index >= num_seqs) have zero query rows and kv_len 0.
    """

    slot_mapping: Int[Array, "T"]  # pool slot (page * page_size + offset) of each new token
    kv_lens: Int[Array, "S"]
    block_tables: Int[Array, "S W"]
    cu_q_lens: Int[Array, "S+1"]
    num_seqs: Int[Array, ""]
