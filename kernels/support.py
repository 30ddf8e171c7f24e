"""Which attention shapes each kernel supports, per backend: one table, as data.

Dispatch reads it to decide, for a traced call, between a kernel and the XLA reference
(`impl=auto`: fall back and log once) or to refuse (`impl=pallas`: at engine start-up, with a
message naming the shape and the supported set). Tests iterate over the same table, so every
entry in it is lowered (cuda / tpu) or interpreted on CPU; nothing is listed that no test runs.

Imports nothing from Pallas: the engine's config and start-up checks use it on any host.

What the dimensions mean for the kernels:

* `head_dims`: GPU (Triton) kernels pad the head dimension to the next power of two with masked
  loads and stores (the pool keeps its stored layout); the TPU kernel pads query and output tiles
  to the 128-lane width and keeps K/V at their stored width.
* `max_group`: query heads per kv head (GQA ratio); any ratio up to this, padded to a power of
  two inside a query tile.
* `page_sizes`: tokens per page (Triton tiles must be powers of two).
* `q_dtypes` / `kv_dtypes`: dtype names (`jnp.dtype(x).name`) of the queries and of the pages
  (int8 / float8_e4m3fn pages carry float32 scales, dequantized in the kernel).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class Kernel(enum.Enum):
    TRITON_RAGGED = "triton_ragged"  # ragged.py: mixed prefill + decode, split-K by grid size
    TRITON_DECODE = "triton_decode"  # decode.py: pure decode, split-K (decode_only=True)
    MOSAIC_GPU_RAGGED = "mosaic_gpu_ragged"  # mosaic_gpu.py: Hopper (sm_90+), JAX with Mosaic GPU
    TPU_RAGGED = "tpu_ragged"  # tpu.py: Mosaic TPU, scalar prefetch + double-buffered DMAs


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The static facts about one attention call that decide whether a kernel can run it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: str
    kv_dtype: str
    soft_cap: bool = False
    sliding_window: bool = False

    @classmethod
    def of(cls, q, k_pages, *, soft_cap=None, sliding_window=None) -> AttentionShape:
        return cls(
            num_heads=q.shape[1],
            num_kv_heads=k_pages.shape[2],
            head_dim=q.shape[2],
            page_size=k_pages.shape[1],
            q_dtype=jnp.dtype(q.dtype).name,
            kv_dtype=jnp.dtype(k_pages.dtype).name,
            soft_cap=soft_cap is not None,
            sliding_window=sliding_window is not None,
        )

    def describe(self) -> str:
        extras = [
            n for n, on in (("soft_cap", self.soft_cap), ("window", self.sliding_window)) if on
        ]
        return (
            f"{self.num_heads}q/{self.num_kv_heads}kv heads, head_dim {self.head_dim}, "
            f"page_size {self.page_size}, q {self.q_dtype}, pages {self.kv_dtype}"
            + (f", {'+'.join(extras)}" if extras else "")
        )


@dataclasses.dataclass(frozen=True)
class Support:
    head_dims: tuple[int, ...]
    page_sizes: tuple[int, ...]
    max_group: int
    q_dtypes: tuple[str, ...]
    kv_dtypes: tuple[str, ...]
    soft_cap: bool = True
    sliding_window: bool = True

    def why_not(self, shape: AttentionShape) -> str | None:
        """None if supported, else the first reason it is not (naming the allowed values)."""
        group, rem = divmod(shape.num_heads, max(1, shape.num_kv_heads))
        checks = [
            (
                shape.head_dim in self.head_dims,
                f"head_dim {shape.head_dim} not in {self.head_dims}",
            ),
            (
                shape.page_size in self.page_sizes,
                f"page_size {shape.page_size} not in {self.page_sizes}",
            ),
            (
                rem == 0 and 1 <= group <= self.max_group,
                f"GQA ratio {shape.num_heads}/{shape.num_kv_heads} is not an integer in "
                f"1..{self.max_group}",
            ),
            (shape.q_dtype in self.q_dtypes, f"q dtype {shape.q_dtype} not in {self.q_dtypes}"),
            (
                shape.kv_dtype in self.kv_dtypes,
                f"page dtype {shape.kv_dtype} not in {self.kv_dtypes}",
            ),
            (self.soft_cap or not shape.soft_cap, "soft_cap is not supported"),
            (self.sliding_window or not shape.sliding_window, "sliding_window is not supported"),
        ]
        return next((reason for ok, reason in checks if not ok), None)

    def describe(self) -> str:
        return (
            f"head_dim in {self.head_dims}, page_size in {self.page_sizes}, GQA ratio "
            f"1..{self.max_group}, q dtype in {self.q_dtypes}, pages in {self.kv_dtypes}"
            + ("" if self.soft_cap else ", no soft_cap")
            + ("" if self.sliding_window else ", no sliding_window")
        )


# Head dims of the supported families: 16/32 (tiny test presets), 48 (the embedded default
# model), 64 (Llama-3.2-1B), 80 (Phi-2), 96 (Phi-3-mini-class), 128 (Llama/Mistral/Qwen), 256
# (Gemma). Page sizes are every value `CacheConfig` accepts.
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)
PAGE_SIZES = (8, 16, 32, 64, 128)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

SUPPORTED: dict[Kernel, Support] = {
    Kernel.TRITON_RAGGED: Support(
        HEAD_DIMS, PAGE_SIZES, 16, FLOAT_DTYPES, FLOAT_DTYPES + ("int8", "float8_e4m3fn")
    ),
    Kernel.TRITON_DECODE: Support(
        HEAD_DIMS, PAGE_SIZES, 16, FLOAT_DTYPES, FLOAT_DTYPES + ("int8", "float8_e4m3fn")
    ),
    # mosaic_gpu.py: wgmma tiles of 64-element (128-byte bf16) swizzle rows, so head dims that
    # are multiples of 64; K/V tiles of 128 keys (64 past head dim 128), so page sizes up to
    # 64; bf16 queries (float32 and non-multiple-of-64 head dims go to the Triton kernel, which
    # dispatch tries next).
    Kernel.MOSAIC_GPU_RAGGED: Support(
        (64, 128, 256), (8, 16, 32, 64), 16, ("bfloat16",), ("bfloat16", "int8", "float8_e4m3fn")
    ),
    # fp8 pages are refused on TPU by `quantization.supports_fp8` (not validated there).
    Kernel.TPU_RAGGED: Support(HEAD_DIMS, PAGE_SIZES, 16, FLOAT_DTYPES, FLOAT_DTYPES + ("int8",)),
}


def why_not(kernel: Kernel, shape: AttentionShape) -> str | None:
    return SUPPORTED[kernel].why_not(shape)


def gpu_capability(device=None) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None on other backends or if JAX does not say."""
    device = device or jax.devices()[0]
    if device.platform != "gpu" and jax.default_backend() not in ("cuda", "gpu"):
        return None
    text = getattr(device, "compute_capability", None)
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None
