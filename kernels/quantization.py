"""Int8 KV-page quantization: symmetric, one float32 scale per (token, kv head) vector.

Invariants:
  * `scale = max|x| / 127` over the head dimension, and 1.0 for an all-zero vector, so a scale
    is never zero and dequantizing never divides; values round to nearest, so every element of
    `dequantize(quantize(x))` is within half a scale step (`scale / 2`) of `x`.
  * Scales are stored at their own size, `[num_pages, page_size, num_kv_heads]` float32, beside
    the int8 pages. Kernels read them at that size and apply them to logits (K) and to
    probabilities (V) rather than expanding them to the pages' shape: an outlier channel costs
    precision only in its own vector, and the scale read is 1/head_dim of the page read.

fp8 pools are not implemented here yet (the engine would store `float8_e4m3fn` pages with the
same scale layout); nothing in the kernels assumes int8 beyond the cast before the dot.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

INT8_MAX = 127.0


def quantize_int8(x: Float[Array, "... D"]) -> tuple[Array, Float[Array, "..."]]:
    """Symmetric int8 with one scale per vector over the last axis (per token, per kv head)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    qx = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return qx, scale


def dequantize(pages: Array, scales: Array | None) -> Float[Array, "..."]:
    """Float32 values of `pages`; `scales` has the pages' shape without the last (head) axis."""
    if scales is None:
        return pages.astype(jnp.float32)
    return pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)
