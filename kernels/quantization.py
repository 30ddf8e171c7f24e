"""KV-page quantization: int8 and fp8 e4m3, symmetric, one float32 scale per (token, kv head).

Invariants:
  * `scale = max|x| / qmax` over the head dimension (qmax = 127 for int8, 448 for e4m3), and
    1.0 for an all-zero vector, so a scale is never zero and dequantizing never divides.
  * int8 rounds to nearest on a uniform grid: every element of `dequantize(quantize(x))` is
    within half a scale step (`scale / 2`) of `x`.
  * fp8 e4m3 (`float8_e4m3fn`: 3 mantissa bits, no infinities, max 448) rounds to nearest on a
    floating grid: an element is within half a unit in the last place of its own magnitude,
    `|x| * 2**-4`, or `scale * 2**-10` (half the smallest subnormal step) for tiny elements. Values
    are clipped to +-448 before the cast: an overflowing e4m3 cast gives NaN, not a saturation.
  * Scales are stored at their own size, `[num_pages, page_size, num_kv_heads]` float32, beside
    the pages. Kernels read them at that size and apply them to logits (K) and to
    probabilities (V) rather than expanding them to the pages' shape: an outlier channel costs
    precision only in its own vector, and the scale read is 1/head_dim of the page read.

Where fp8 runs (`supports_fp8`): the reference on CPU (XLA CPU converts float8 in software; for
tests and the CPU engine), and the Triton kernels on NVIDIA GPUs of compute capability >= 8.9
(Ada, Hopper and later), whose Triton lowering converts e4m3 in registers. Not on TPU (the Mosaic
kernel is not validated with fp8 pages) nor on ROCm (whose fp8 is the `fnuz` variant).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0  # float(jnp.finfo(jnp.float8_e4m3fn).max)
FP8_DTYPE = jnp.float8_e4m3fn

_FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def _scale(x, qmax: float):
    amax = jnp.max(jnp.abs(x), axis=-1)
    return jnp.where(amax > 0, amax / qmax, 1.0)


def quantize_int8(x: Float[Array, "... D"]) -> tuple[Array, Float[Array, "..."]]:
    """Symmetric int8 with one scale per vector over the last axis (per token, per kv head)."""
    x = x.astype(jnp.float32)
    scale = _scale(x, INT8_MAX)
    qx = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return qx, scale


def quantize_fp8(x: Float[Array, "... D"]) -> tuple[Array, Float[Array, "..."]]:
    """fp8 e4m3 with one scale per vector over the last axis, mapping max|x| to 448."""
    x = x.astype(jnp.float32)
    scale = _scale(x, FP8_E4M3_MAX)
    qx = jnp.clip(x / scale[..., None], -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(FP8_DTYPE)
    return qx, scale


def quantize(x: Float[Array, "... D"], dtype) -> tuple[Array, Float[Array, "..."]]:
    """Quantize for a pool of page dtype `dtype` (int8 or float8_e4m3fn)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return quantize_int8(x)
    if dtype == FP8_DTYPE:
        return quantize_fp8(x)
    raise ValueError(f"quantized pages must be int8 or float8_e4m3fn; got {dtype}")


def dequantize(pages: Array, scales: Array | None) -> Float[Array, "..."]:
    """Float32 values of `pages`; `scales` has the pages' shape without the last (head) axis."""
    if scales is None:
        return pages.astype(jnp.float32)
    return pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def supports_fp8(backend: str | None = None, device: jax.Device | None = None) -> bool:
    """Whether fp8 e4m3 pages run on `backend` (default: JAX's default backend).

    For GPUs the answer depends on the device (default: the first device of the backend): the
    engine calls this at start-up to refuse `kv_cache_dtype=fp8_e4m3` where it cannot run.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return True
    if backend not in ("gpu", "cuda"):
        return False  # tpu, rocm: see the module docstring
    device = device or jax.devices(backend)[0]
    capability = getattr(device, "compute_capability", None)  # "9.0" on CUDA; absent elsewhere
    try:
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    except ValueError:  # no capability, or a ROCm "gfx..." name
        return False
    return (major, minor) >= _FP8_MIN_COMPUTE_CAPABILITY
