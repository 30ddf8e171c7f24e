"""The single attention dispatch point: the engine calls these, never a kernel directly.

On GPU/TPU the Pallas kernels run; on CPU the pure-JAX reference. `AttentionImpl` forces either,
and `PALLAS_INTERPRET` runs the Pallas kernels in interpret mode (CPU tests).
"""

from __future__ import annotations

import enum

import jax

from pijax.kernels.paged_attention import reference


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
    k_scales=None, v_scales=None, soft_cap=None, sliding_window=None,
):
    """Ragged paged attention over the pool (see `reference` for the argument contract)."""
    impl = resolve(impl)
    kwargs = dict(sm_scale=sm_scale, k_scales=k_scales, v_scales=v_scales, soft_cap=soft_cap,
                  sliding_window=sliding_window)
    if impl is AttentionImpl.REFERENCE:
        return reference.ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, **kwargs)
    raise NotImplementedError(f"attention_impl={impl.value} has no kernel yet")


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales=None, v_scales=None, *,
             impl: AttentionImpl = AttentionImpl.AUTO):
    """Scatter new K/V (and their int8 scales) into the pool; returns the updated arrays."""
    del impl  # one implementation for now: an XLA scatter, fused by the compiler into the step
    return reference.write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping,
                                        k_scales, v_scales)
