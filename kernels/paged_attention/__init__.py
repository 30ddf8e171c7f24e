"""Paged attention over the KV pool: one pure-JAX reference and three Pallas kernels.

| module        | what                                                   | runs on                  |
| ------------- | ------------------------------------------------------ | ------------------------ |
| reference.py  | the contract and its pure-JAX implementation           | everywhere (the oracle)  |
| tiled.py      | XLA, K/V gathered once per (sequence, query tile)      | CPU engine (`auto`)      |
| ragged.py     | mixed prefill + decode, Triton lowering                | GPU; interpret on CPU    |
| decode.py     | pure decode, split-K over context + combine pass       | GPU; interpret on CPU    |
| mosaic_gpu.py | mixed batch, TMA + wgmma, split-K (Hopper)             | sm_90+; MGPU interpreter |
| tpu.py        | mixed batch, scalar prefetch + double-buffered DMAs    | TPU; TPU interpreter     |
| common.py     | tile map, validation, the shared online-softmax step   |                          |
| tuning.py     | block sizes per backend (unmeasured starting points)   |                          |
| cases.py      | random paged inputs and a naive float64 oracle         | tests, benchmarks        |

`pijax.kernels.dispatch` chooses among them (`pijax.kernels.support` says which shapes each
runs); the engine never imports a kernel directly. The TPU and Mosaic GPU modules are imported
lazily by dispatch.
"""

from pijax.kernels.paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_reference,
)

__all__ = ["ragged_paged_attention_reference", "write_kv_reference"]
