"""The single attention dispatch point: the engine calls these, never a kernel directly.

| impl             | cpu                      | gpu (cuda/rocm)               | tpu                  |
| ---------------- | ------------------------ | ----------------------------- | -------------------- |
| AUTO             | reference                | Pallas/Triton                 | Pallas/Mosaic        |
| REFERENCE        | reference                | reference                     | reference            |
| PALLAS           | error (no kernel)        | ragged.py, or decode.py with  | tpu.py               |
|                  |                          | `decode_only=True` (split-K)  |                      |
| PALLAS_INTERPRET | GPU-style kernels, interpret=True (any backend; slow, for tests)        |

`decode_only` is a static promise from the caller that every live sequence has one new token
(a pure decode step, known on the host when the batch is built); it selects the split-K decode
kernel, which fills the GPU when few long sequences decode. Without it, the ragged kernel
handles any mix. The TPU kernel is the ragged one for every batch.
"""

from __future__ import annotations

import enum

import jax
from pijax.kernels.paged_attention import decode, ragged, reference


class AttentionImpl(enum.Enum):
    AUTO = "auto"  # Pallas kernels on GPU/TPU, the pure-JAX reference on CPU
    REFERENCE = "reference"
    PALLAS = "pallas"
    PALLAS_INTERPRET = "pallas_interpret"

    @classmethod
    def parse(cls, value: str | AttentionImpl) -> AttentionImpl:
        if isinstance(value, AttentionImpl):
            return value
        allowed = [m.value for m in cls]
        if value not in allowed:
            raise ValueError(f"attention_impl must be one of {allowed}; got {value!r}")
        return cls(value)


def resolve(impl: AttentionImpl) -> AttentionImpl:
    if impl is AttentionImpl.AUTO:
        return AttentionImpl.REFERENCE if jax.default_backend() == "cpu" else AttentionImpl.PALLAS
    return impl


def paged_attention(
    q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
    sm_scale: float, impl: AttentionImpl = AttentionImpl.AUTO,
    k_scales=None, v_scales=None, soft_cap=None, sliding_window=None, decode_only: bool = False,
):
    """Ragged paged attention over the pool (see `reference` for the argument contract)."""
    impl = resolve(impl)
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    kwargs = dict(sm_scale=sm_scale, k_scales=k_scales, v_scales=v_scales, soft_cap=soft_cap,
                  sliding_window=sliding_window)
    if impl is AttentionImpl.REFERENCE:
        return reference.ragged_paged_attention_reference(*args, **kwargs)
    if impl is AttentionImpl.PALLAS_INTERPRET:
        kernel = decode.paged_decode_attention if decode_only else ragged.ragged_paged_attention
        return kernel(*args, **kwargs, interpret=True)
    backend = jax.default_backend()
    if backend in ("cuda", "rocm", "gpu"):
        kernel = decode.paged_decode_attention if decode_only else ragged.ragged_paged_attention
        return kernel(*args, **kwargs)
    if backend == "tpu":
        from pijax.kernels.paged_attention import tpu  # Mosaic-only imports stay off GPU hosts

        return tpu.ragged_paged_attention_tpu(*args, **kwargs)
    raise ValueError(f"attention_impl=pallas has no kernel for backend {backend!r}; use "
                     f"{AttentionImpl.REFERENCE.value!r} or {AttentionImpl.PALLAS_INTERPRET.value!r}")


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales=None, v_scales=None, *,
             impl: AttentionImpl = AttentionImpl.AUTO):
    """Scatter new K/V (and their int8 scales) into the pool; returns the updated arrays."""
    # One implementation on every backend: an XLA scatter of T rows, which XLA fuses with the
    # K/V projection's epilogue inside the jitted step. A Pallas write fused into the attention
    # kernel would save re-reading K/V new rows (T*K*D, small beside the context read); whether
    # that is measurable is a GPU question (see scripts/bench_kernels.py).
    del impl
    return reference.write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping,
                                        k_scales, v_scales)
