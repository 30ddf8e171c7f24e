"""The single attention dispatch point: the engine calls these, never a kernel directly.

| impl             | cpu                      | gpu (cuda/rocm)                | tpu                  |
| ---------------- | ------------------------ | ------------------------------ | -------------------- |
| AUTO             | tiled                    | kernel if the shape is in the  | tpu.py if supported, |
|                  |                          | support table, else reference  | else reference       |
| REFERENCE        | reference                | reference                      | reference            |
| TILED            | tiled.py (XLA; K/V gathered once per sequence and query tile)             |
| PALLAS           | error (no kernel)        | mosaic_gpu.py (sm_90+, when    | tpu.py               |
|                  |                          | tuning.HOPPER_KERNEL says so), |                      |
|                  |                          | else ragged.py, or decode.py   |                      |
|                  |                          | with `decode_only=True`        |                      |
| PALLAS_INTERPRET | GPU-style Triton kernels, interpret=True (any backend; slow, for tests)  |

Shapes. `support.SUPPORTED` is the one table of what each kernel runs (head dims, GQA ratios,
page sizes, dtypes). `auto` uses a kernel only for a listed shape and otherwise the XLA
reference, logging once per shape which one fell back and why; an explicit `pallas` raises a
ValueError naming the shape and the supported set. `check_supported` raises that same error
without tracing anything, for the engine to call at start-up.

The engine makes one call per layer per step and passes no `decode_only`: the ragged kernel
handles any mix, and splits each tile's context (split-K) when the batch's shapes give a grid
too small to fill the GPU, which is exactly the pure-decode step of a few long sequences. The
split count is static (from shapes), so this costs no extra compilation.

`decode_only` is a static promise from a caller that every live sequence has one new token
(known on the host when the batch is built); it selects the dedicated split-K decode kernel
(16-row query tiles instead of the ragged kernel's `block_rows`). Whether that beats the
ragged kernel on pure-decode steps is a GPU measurement (`scripts/bench_kernels.py`). The TPU
kernel is the ragged one for every batch.

Sharded pools. The engine shards the pool's kv-head axis (and the queries' head axis) over the
mesh axis `model`. GSPMD cannot partition a `pallas_call` (an opaque custom call), so when a
kernel runs under a mesh whose `model` axis has more than one device, dispatch wraps it in
`shard_map` over that axis: each device runs the kernel on its own kv heads and the query heads
that share them; lengths, block tables and query offsets are replicated. Attention never mixes
kv heads, so no collective is needed. The mesh is found without threading it through the model:
the context mesh (`jax.set_mesh`) if one is set, otherwise the mesh JAX records in the pool's
abstract value when the jitted step is called with sharded arrays. The reference path stays a
plain XLA computation that GSPMD partitions itself.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from jax.sharding import PartitionSpec as P

from pijax.kernels import support
from pijax.kernels.impl import AttentionImpl
from pijax.kernels.paged_attention import decode, ragged, reference, tiled, tuning
from pijax.kernels.support import AttentionShape, Kernel

__all__ = ["AttentionImpl", "paged_attention", "write_kv", "choose_kernel", "check_supported"]

log = logging.getLogger(__name__)

MODEL_AXIS = "model"  # the mesh axis the pool's kv heads (and the query heads) are sharded on
DATA_AXIS = "data"  # the mesh axis the pool's pages (and the batch's shards) are split on

_FELL_BACK: set[tuple[Kernel, AttentionShape]] = set()  # (kernel, shape) pairs already logged


def resolve(impl: AttentionImpl) -> AttentionImpl:
    if impl is AttentionImpl.AUTO:
        return AttentionImpl.TILED if jax.default_backend() == "cpu" else AttentionImpl.PALLAS
    return impl


def backend_kernels(backend: str, decode_only: bool = False) -> list[Kernel]:
    """The kernels `pallas` means on `backend`, preferred first (empty: none, e.g. CPU). On
    Hopper the Mosaic GPU kernel comes first when the tuning table says so, and the Triton
    kernel takes the shapes it does not support (e.g. quantized pages)."""
    if backend in ("cuda", "rocm", "gpu"):
        triton = Kernel.TRITON_DECODE if decode_only else Kernel.TRITON_RAGGED
        if not decode_only and backend != "rocm" and _use_mosaic_gpu():
            return [Kernel.MOSAIC_GPU_RAGGED, triton]
        return [triton]
    if backend == "tpu":
        return [Kernel.TPU_RAGGED]
    return []


def _use_mosaic_gpu() -> bool:
    """Hopper or newer, a JAX with the Mosaic GPU backend, and the tuning table prefers it."""
    if tuning.HOPPER_KERNEL != Kernel.MOSAIC_GPU_RAGGED.value:
        return False
    cap = support.gpu_capability()
    if cap is None or cap < (9, 0):
        return False
    from pijax.kernels.paged_attention import mosaic_gpu

    return mosaic_gpu.available()


def choose_kernel(
    impl: AttentionImpl,
    shape: AttentionShape,
    *,
    decode_only: bool = False,
    backend: str | None = None,
) -> Kernel | None:
    """The kernel to run `shape` with, or None for the XLA reference.

    `auto`: the backend's kernel if the support table lists the shape, else None (logged once
    per shape). `pallas` / `pallas_interpret`: the kernel, or ValueError naming the shape and the
    supported set. The engine calls `check_supported` at start-up so that error comes first.
    """
    impl = AttentionImpl.parse(impl)
    backend = backend or jax.default_backend()
    if impl is AttentionImpl.REFERENCE or (impl is AttentionImpl.AUTO and backend == "cpu"):
        return None
    if impl is AttentionImpl.PALLAS_INTERPRET:
        kernels = [Kernel.TRITON_DECODE if decode_only else Kernel.TRITON_RAGGED]
    else:
        kernels = backend_kernels(backend, decode_only)
    if not kernels:
        raise ValueError(
            f"attention_impl=pallas has no kernel for backend {backend!r}; use "
            f"{AttentionImpl.REFERENCE.value!r} or {AttentionImpl.PALLAS_INTERPRET.value!r}"
        )
    for kernel in kernels:
        reason = support.why_not(kernel, shape)
        if reason is None:
            return kernel
    # `kernel` and `reason` are the last (broadest) kernel's: the one the shape missed.
    if impl is AttentionImpl.AUTO:
        if (kernel, shape) not in _FELL_BACK:
            _FELL_BACK.add((kernel, shape))
            log.warning(
                "attention: %s runs on the XLA reference path, not %s: %s",
                shape.describe(),
                kernel.value,
                reason,
            )
        return None
    raise ValueError(
        f"attention_impl={impl.value}: kernel {kernel.value} on {backend!r} does not support "
        f"{shape.describe()} ({reason}); supported: {support.SUPPORTED[kernel].describe()}. "
        f"Use attention_impl={AttentionImpl.AUTO.value!r} to fall back to the XLA path."
    )


def check_supported(
    impl: AttentionImpl | str, shape: AttentionShape, backend: str | None = None
) -> None:
    """Start-up check: raises (for an explicit kernel impl) what the first step would."""
    choose_kernel(AttentionImpl.parse(impl), shape, backend=backend)


def paged_attention(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    impl: AttentionImpl = AttentionImpl.AUTO,
    k_scales=None,
    v_scales=None,
    soft_cap=None,
    sliding_window=None,
    decode_only: bool = False,
):
    """Ragged paged attention over the pool (see `reference` for the argument contract)."""
    impl = AttentionImpl.parse(impl)
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    kwargs = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    mesh = data_mesh(k_pages)
    if mesh is not None:  # one ragged batch per data shard, over that shard's pages
        kwargs.update(impl=impl, decode_only=decode_only)
        return _shard_over_data(paged_attention, mesh, args, k_scales, v_scales, kwargs)
    if resolve(impl) is AttentionImpl.TILED:
        fn = tiled.ragged_paged_attention_tiled
        mesh = kv_head_mesh(k_pages)  # per kv head, like the kernels: no gathers across devices
        if mesh is not None:
            return _shard_over_kv_heads(fn, mesh, args, k_scales, v_scales, kwargs)
        return fn(*args, k_scales=k_scales, v_scales=v_scales, **kwargs)
    shape = AttentionShape.of(q, k_pages, soft_cap=soft_cap, sliding_window=sliding_window)
    kernel = choose_kernel(impl, shape, decode_only=decode_only)
    if kernel is None:
        return reference.ragged_paged_attention_reference(
            *args, k_scales=k_scales, v_scales=v_scales, **kwargs
        )
    fn = _kernel_fn(kernel)
    if impl is AttentionImpl.PALLAS_INTERPRET:
        kwargs["interpret"] = True
    mesh = kv_head_mesh(k_pages)
    if mesh is not None:
        return _shard_over_kv_heads(fn, mesh, args, k_scales, v_scales, kwargs)
    return fn(*args, k_scales=k_scales, v_scales=v_scales, **kwargs)


def _kernel_fn(kernel: Kernel):
    if kernel is Kernel.TRITON_RAGGED:
        return ragged.ragged_paged_attention
    if kernel is Kernel.TRITON_DECODE:
        return decode.paged_decode_attention
    if kernel is Kernel.MOSAIC_GPU_RAGGED:
        from pijax.kernels.paged_attention import mosaic_gpu  # Mosaic GPU imports stay lazy

        return mosaic_gpu.ragged_paged_attention_mgpu
    from pijax.kernels.paged_attention import tpu  # Mosaic-only imports stay off GPU hosts

    return tpu.ragged_paged_attention_tpu


def kv_head_mesh(k_pages):
    """The mesh whose `model` axis (size > 1) shards the pool in this trace, or None.

    The context mesh wins; otherwise the abstract mesh JAX attaches to a traced array's type
    when jit is called with arrays sharded over a mesh (JAX >= 0.7 records it even for `Auto`
    axes). A `model` axis that is already manual (we are inside someone's shard_map) is left
    alone: the arrays are per-device there.
    """
    return _mesh_splitting(k_pages, MODEL_AXIS)


def data_mesh(k_pages):
    """The mesh whose `data` axis (size > 1) splits the pool's pages in this trace, or None
    (found as `kv_head_mesh` finds its mesh; None inside a shard_map over `data`)."""
    return _mesh_splitting(k_pages, DATA_AXIS)


def _mesh_splitting(k_pages, axis: str):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(k_pages), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        return None
    if mesh.shape[axis] == 1 or axis in mesh.manual_axes:
        return None
    return mesh


def _shard_over_data(fn, mesh, args, k_scales, v_scales, kwargs):
    """Data-parallel attention: `fn` runs per (data, model) device on its shard's token rows,
    sequences and pages (the batch builder laid the arrays out shard by shard, with page ids
    local to the shard) and on its kv heads. Nothing crosses shards, so no collective."""
    rows = P(DATA_AXIS)
    specs = _AttentionSpecs(
        heads=P(DATA_AXIS, MODEL_AXIS, None),
        pages=P(DATA_AXIS, None, MODEL_AXIS, None),
        scales=P(DATA_AXIS, None, MODEL_AXIS),
        meta=(rows, P(DATA_AXIS, None), rows, rows),
    )
    return _shard_attention(fn, mesh, specs, args, k_scales, v_scales, kwargs, per_shard=True)


def _shard_over_kv_heads(kernel, mesh, args, k_scales, v_scales, kwargs):
    q, k_pages = args[0], args[1]
    devices = mesh.shape[MODEL_AXIS]
    if k_pages.shape[2] % devices or q.shape[1] % devices:
        raise ValueError(
            f"mesh axis {MODEL_AXIS!r} of size {devices} must divide the kv heads "
            f"({k_pages.shape[2]}) and query heads ({q.shape[1]})"
        )
    specs = _AttentionSpecs(
        heads=P(None, MODEL_AXIS, None),
        pages=P(None, None, MODEL_AXIS, None),
        scales=P(None, None, MODEL_AXIS),
        meta=(P(),) * 4,  # lengths, block tables, query offsets: replicated
    )
    return _shard_attention(kernel, mesh, specs, args, k_scales, v_scales, kwargs)


@dataclasses.dataclass(frozen=True)
class _AttentionSpecs:
    heads: P  # q and the output
    pages: P
    scales: P
    meta: tuple[P, P, P, P]  # kv_lens, block_tables, cu_q_lens, num_seqs


def _shard_attention(fn, mesh, specs, args, k_scales, v_scales, kwargs, per_shard=False):
    """`fn` under shard_map with `specs`; `per_shard`: `num_seqs` has one entry per data
    shard, and each device passes on its own."""
    quantized = k_scales is not None

    def local(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *scale_args):
        ks, vs = scale_args if quantized else (None, None)
        return fn(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            cu_q_lens,
            num_seqs[0] if per_shard else num_seqs,
            k_scales=ks,
            v_scales=vs,
            **kwargs,
        )

    in_specs = (specs.heads, specs.pages, specs.pages, *specs.meta)
    in_specs += (specs.scales, specs.scales) * quantized
    extra = (k_scales, v_scales) if quantized else ()
    return _shard_map(local, mesh, in_specs, specs.heads)(*args, *extra)


def _shard_map(fn, mesh, in_specs, out_specs):
    # A pallas_call's out_shape carries no manual-axis type, so varying-manual-axes checking
    # would reject it; the kernels' outputs vary over `model` exactly as their inputs do.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # JAX releases before jax.shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def write_kv(
    k_pages,
    v_pages,
    k_new,
    v_new,
    slot_mapping,
    k_scales=None,
    v_scales=None,
    *,
    impl: AttentionImpl = AttentionImpl.AUTO,
):
    """Scatter new K/V (and their int8 scales) into the pool; returns the updated arrays."""
    # One implementation on every backend: an XLA scatter of T rows, which XLA fuses with the
    # K/V projection's epilogue inside the jitted step. A Pallas write fused into the attention
    # kernel would save re-reading K/V new rows (T*K*D, small beside the context read); whether
    # that is measurable is a GPU question (see scripts/bench_kernels.py).
    del impl
    mesh = data_mesh(k_pages)
    if mesh is None:
        return reference.write_kv_reference(
            k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales
        )
    # Data shards: each writes its own token rows into its own pages (slots are shard-local).
    quantized = k_scales is not None
    pages, scales = P(DATA_AXIS, None, MODEL_AXIS, None), P(DATA_AXIS, None, MODEL_AXIS)
    new = P(DATA_AXIS, MODEL_AXIS, None)
    out_specs = (pages, pages) + (scales, scales) * quantized

    def local(k_pages, v_pages, k_new, v_new, slot_mapping, *scale_args):
        ks, vs = scale_args if quantized else (None, None)
        out = reference.write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping, ks, vs)
        return out if quantized else out[:2]

    in_specs = (pages, pages, new, new, P(DATA_AXIS)) + (scales, scales) * quantized
    extra = (k_scales, v_scales) if quantized else ()
    out = _shard_map(local, mesh, in_specs, out_specs)(
        k_pages, v_pages, k_new, v_new, slot_mapping, *extra
    )
    return out if quantized else (*out, None, None)
