"""Block sizes per backend, as data. Kernels read them here; nothing else hard-codes a tile.

`block_rows` is the query tile height in (token, head-of-group) rows: a tile holds
`block_rows // group` tokens of one sequence with all query heads that share a kv head, so the
K/V tile loaded for it is reused by every head of the group (GQA costs no extra KV reads).
`pages_per_block` is how many pages one K/V tile spans (`pages_per_block * page_size` keys).
Split-K. Both GPU kernels can cut each query tile's context into partitions that run as
separate programs, merged afterwards by log-sum-exp, so a handful of long sequences still fill
the machine. The split count is static, chosen from the grid the batch's shapes give (`splits`):
enough partitions that `kv_heads * tiles * splits` reaches `target_programs`, at most
`max_splits`. Large batches get 1 (no partial results, no combine pass); a decode step of a few
long claims gets many. Because it depends only on shapes, it adds no compilation.

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
    max_splits: int
    target_programs: int  # programs in flight that fill the device (GPU: ~2 per SM)
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only


_TABLE = {
    # H100: 132 SMs; 256 programs is about two resident 4-warp programs per SM.
    "gpu": BlockSizes(
        block_rows=64,
        pages_per_block=4,
        max_splits=16,
        target_programs=256,
        num_warps=4,
        num_stages=2,
    ),
    # The TPU kernel walks tiles sequentially per core ("arbitrary" grid axis): no split-K.
    "tpu": BlockSizes(block_rows=128, pages_per_block=8, max_splits=1, target_programs=1),
    # Interpret mode runs on CPU and copies whole inputs per grid step: small tiles, few steps.
    # A target of 16 programs still splits the small test batches, so tests cover the combine.
    "interpret": BlockSizes(block_rows=16, pages_per_block=2, max_splits=2, target_programs=16),
}


def block_sizes(backend: str | None = None) -> BlockSizes:
    backend = backend or jax.default_backend()
    if backend in ("cuda", "rocm"):
        backend = "gpu"
    if backend not in _TABLE:
        raise ValueError(f"no block sizes for backend {backend!r}; known: {sorted(_TABLE)}")
    return _TABLE[backend]


def splits(num_programs: int, sizes: BlockSizes) -> int:
    """Static split-K factor for a grid of `num_programs` (kv heads x query tiles) programs."""
    want = -(-sizes.target_programs // max(1, num_programs))
    return max(1, min(sizes.max_splits, want))


# The GPU kernel `auto`/`pallas` runs on Hopper and newer (compute capability >= 9.0) when the
# installed JAX has the Mosaic GPU backend: "mosaic_gpu_ragged" or "triton_ragged" (a
# `support.Kernel` value). UNMEASURED: neither kernel has run on a GPU yet. The choice belongs to
# a measurement, `scripts/device_check.py` (it times both side by side on the same shapes); record
# the run that decided it in HOPPER_KERNEL_MEASURED ("<results folder>: mosaic X us, triton Y us").
HOPPER_KERNEL = "triton_ragged"
HOPPER_KERNEL_MEASURED: str | None = None
