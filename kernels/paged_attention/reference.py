"""Pure-JAX reference paged attention: the single source of truth every kernel is tested against,
and the CPU path of the engine.

Layout (shared by every kernel; decided once here):
  k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]
  k_scales, v_scales (quantized pools only): [num_pages, page_size, num_kv_heads] float32
  quantized pages are int8 or float8_e4m3fn (`pijax.kernels.quantization`)
Page 0 is the null page: padded block-table entries point at it and padded tokens write into it.

The ragged batch is a flattened token axis `q: [T, num_heads, head_dim]` holding, back to back,
the new query tokens of each sequence (a prefill chunk or one decode token). Sequence `s` owns
query rows `cu_q_lens[s]:cu_q_lens[s+1]` and has `kv_lens[s]` tokens of context *including* its
new tokens, so its i-th query token sits at position `kv_lens[s] - q_len[s] + i` and attends
causally to positions `<= ` that. Rows past `cu_q_lens[num_seqs]` are padding; their output is
zero.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pijax.kernels.quantization import dequantize, quantize

_TOKEN_CHUNK = 32  # tokens per gather chunk: bounds the [chunk, context, kv_heads, dim] gather


def ragged_paged_attention_reference(
    q: Float[Array, "T H D"],
    k_pages: Array,
    v_pages: Array,
    kv_lens: Int[Array, " S"],
    block_tables: Int[Array, "S W"],
    cu_q_lens: Int[Array, " S1"],
    num_seqs: Int[Array, ""],
    *,
    sm_scale: float,
    k_scales: Float[Array, "P PS K"] | None = None,
    v_scales: Float[Array, "P PS K"] | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> Float[Array, "T H D"]:
    """Attention of each query token over its sequence's pages (gathered via `block_tables`)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    context = width * page_size

    token_idx = jnp.arange(num_tokens, dtype=jnp.int32)
    # Sequence of each token: the last s with cu_q_lens[s] <= t.
    seq_of_token = jnp.searchsorted(cu_q_lens[1:], token_idx, side="right").astype(jnp.int32)
    valid = token_idx < cu_q_lens[jnp.minimum(num_seqs, cu_q_lens.shape[0] - 1)]
    seq_of_token = jnp.where(valid, jnp.minimum(seq_of_token, kv_lens.shape[0] - 1), 0)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    q_pos = kv_lens[seq_of_token] - q_lens[seq_of_token] + (token_idx - cu_q_lens[seq_of_token])

    def attend(chunk):
        qc, seqc, posc, validc = chunk  # [C,H,D], [C], [C], [C]
        pages = block_tables[seqc]  # [C, W]
        k = dequantize(k_pages[pages], None if k_scales is None else k_scales[pages])
        v = dequantize(v_pages[pages], None if v_scales is None else v_scales[pages])
        c = qc.shape[0]
        k = k.reshape(c, context, num_kv_heads, head_dim)
        v = v.reshape(c, context, num_kv_heads, head_dim)
        qg = qc.astype(jnp.float32).reshape(c, num_kv_heads, group, head_dim)
        s = jnp.einsum("ckgd,clkd->ckgl", qg, k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = jnp.arange(context, dtype=jnp.int32)
        mask = key_pos[None, :] <= posc[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > posc[:, None] - sliding_window
        mask &= validc[:, None]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("ckgl,clkd->ckgd", p, v) / jnp.where(denom == 0, 1.0, denom)
        return o.reshape(c, num_heads, head_dim)

    chunk = min(_TOKEN_CHUNK, num_tokens)
    if num_tokens % chunk:
        raise ValueError(f"num_tokens={num_tokens} must be a multiple of {chunk}")
    n = num_tokens // chunk
    parts = (
        q.reshape(n, chunk, num_heads, head_dim),
        seq_of_token.reshape(n, chunk),
        q_pos.reshape(n, chunk),
        valid.reshape(n, chunk),
    )
    out = jax.lax.map(attend, parts).reshape(num_tokens, num_heads, head_dim)
    return out.astype(q.dtype)


def write_kv_reference(
    k_pages: Array,
    v_pages: Array,
    k_new: Float[Array, "T K D"],
    v_new: Float[Array, "T K D"],
    slot_mapping: Int[Array, " T"],
    k_scales: Array | None = None,
    v_scales: Array | None = None,
):
    """Scatter new K/V into their slots (`slot = page * page_size + offset`).

    Returns `(k_pages, v_pages, k_scales, v_scales)`; scales stay None for unquantized pools.
    Padded tokens carry slot 0..page_size-1 of the null page, whose contents are never read
    unmasked.
    """
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    flat = (num_pages * page_size, num_kv_heads, head_dim)

    def put(pages, new):
        return (
            pages.reshape(flat).at[slot_mapping].set(new.astype(pages.dtype)).reshape(pages.shape)
        )

    if k_scales is None:
        return put(k_pages, k_new), put(v_pages, v_new), None, None
    kq, ks = quantize(k_new, k_pages.dtype)  # int8 or fp8 e4m3, by the pool's dtype
    vq, vs = quantize(v_new, v_pages.dtype)
    sflat = (num_pages * page_size, num_kv_heads)

    def put_scale(scales, new):
        return scales.reshape(sflat).at[slot_mapping].set(new).reshape(scales.shape)

    return put(k_pages, kq), put(v_pages, vq), put_scale(k_scales, ks), put_scale(v_scales, vs)
