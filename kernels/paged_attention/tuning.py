"""Block sizes per backend, as data. Kernels read them here; nothing else hard-codes a tile.

`block_rows` is the query tile height in (token, head-of-group) rows: a tile holds
`block_rows // group` tokens of one sequence with all query heads that share a kv head, so the
K/V tile loaded for it is reused by every head of the group (GQA costs no extra KV reads).
`pages_per_block` is how many pages one K/V tile spans (`pages_per_block * page_size` keys).
`decode_splits` is the split-K factor of the decode kernel: the context of one sequence is cut
into that many partitions that run as separate programs, and a combine pass merges them, so a
handful of long sequences still fill the machine.

The GPU and TPU rows are starting points chosen from the hardware's shape (Triton needs power-of-
two tiles >= 16 for `tl.dot`; a TPU MXU pass is 128 (v5e) or 256 (v6e) wide), NOT measured: no
GPU or TPU was available when they were written. `scripts/bench_kernels.py` is the sweep to run.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_rows: int
    pages_per_block: int
    decode_splits: int
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only


_TABLE = {
    "gpu": BlockSizes(block_rows=64, pages_per_block=4, decode_splits=8, num_warps=4,
                      num_stages=2),
    "tpu": BlockSizes(block_rows=128, pages_per_block=8, decode_splits=1),
    # Interpret mode runs on CPU and copies whole inputs per grid step: small tiles, few steps.
    "interpret": BlockSizes(block_rows=16, pages_per_block=2, decode_splits=2),
}


def block_sizes(backend: str | None = None) -> BlockSizes:
    backend = backend or jax.default_backend()
    if backend in ("cuda", "rocm"):
        backend = "gpu"
    if backend not in _TABLE:
        raise ValueError(f"no block sizes for backend {backend!r}; known: {sorted(_TABLE)}")
    return _TABLE[backend]
