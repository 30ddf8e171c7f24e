"""Ragged paged attention for Hopper through Pallas' Mosaic GPU backend (`plgpu.kernel`).

Why: JAX 0.11 deprecates Pallas' Triton backend; Mosaic GPU is its successor on Hopper (sm_90)
and later, with the bulk tensor copy engine (TMA) and warpgroup MMA (wgmma) exposed directly.

Same contract and tile map as `ragged.py` (`common.tile_map`): grid `(kv_heads, query_tiles)`,
one program per query tile of `64` rows (wgmma's M: `64 // group_pad` tokens of one sequence x
the group's query heads, so every head of a GQA group shares each K/V tile). A program

1. TMA-copies its query tile into swizzled shared memory;
2. walks its sequence's block table `block_kv` keys at a time (`block_kv // page_size` pages):
   each page of its kv head, `k_pages[page, :, head, :]` (a strided 2-D slab of the pool in its
   stored layout), is one TMA copy into a slice of the K (V) tile, each on its own barrier,
   into one of two staging slots so the next tile's copies overlap this tile's compute;
3. computes `q @ k.T` with wgmma into a register accumulator, masks (causal frontier, row
   liveness, sliding window), runs one online-softmax step in registers, and accumulates
   `p @ v` with wgmma (p staged through shared memory, v read there in place);
4. normalizes, writes the tile back through shared memory with a TMA store.

Split-K as in `ragged.py`: with `num_splits > 1` (static, from the grid size: a decode step of a
few long sequences) the grid gains a `split` axis, each program walks its share of the tile's
K/V range and writes a normalized float32 partial with its log-sum-exp, and the wrapper merges
them (`common.combine_splits`).

Programs start at the tile's sliding-window edge and stop at its causal frontier, so a decode
token reads its context once and only pages its sequence owns are read.

Quantized pages (int8, fp8 e4m3) are dequantized in the kernel: the 8-bit tile is TMA-copied into
its own SMEM tile, widened to q's dtype through registers into the tile wgmma reads (exact), and
the per-key scales (gathered per sequence by the wrapper, one contiguous row per K/V tile)
multiply the logits' and the probabilities' columns, as in the Triton kernels.

What this first version does NOT do (see `support.SUPPORTED` for what dispatch sends here):
  * warp specialization: one warpgroup both issues the copies and computes. K/V tiles are
    double-buffered where SMEM allows (`stages`): tile i+1's copies are in flight while tile i
    is computed on; the FlashAttention-3 structure of JAX's `attention_mgpu.py` (a producer
    warpgroup, two consumer warpgroups, deeper pipelines) is the next step. p goes to the PV
    wgmma through SMEM rather than registers;
  * head dims that are not multiples of 64, float32 queries (the Triton kernels take those).
It has never run on a GPU (none was available); its CPU checks are the Mosaic GPU interpreter
(`jax._src.pallas.mosaic_gpu.interpret`, private in JAX 0.10) and lowering for `cuda`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pijax.kernels.paged_attention import common, tuning

ROWS = 64  # wgmma M per warpgroup: one query tile
BLOCK_KV = 128  # keys per K/V tile (a multiple of 64: the PV wgmma's contraction tile) ...
BLOCK_KV_WIDE = 64  # ... and for head dims over 128, so the tiles fit in 227 KB of SMEM


def block_kv(head_dim: int) -> int:
    return BLOCK_KV if head_dim <= 128 else BLOCK_KV_WIDE


def _mgpu():
    """The Mosaic GPU Pallas module, or None where this JAX does not have it."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return None
    needed = ("kernel", "wgmma", "copy_gmem_to_smem", "Barrier", "SMEM", "ACC", "Layout")
    return plgpu if all(hasattr(plgpu, n) for n in needed) else None


def available() -> bool:
    """Whether this JAX can lower the kernel (sm_90+ is dispatch's check, not this one's)."""
    return _mgpu() is not None


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams


def interpreter_available() -> bool:
    """Whether this JAX ships the Mosaic GPU interpreter (private module; JAX 0.10+)."""
    return available() and _interpret_params() is not None


def reset_interpreter() -> None:
    """After a kernel fails under the interpreter, its global state must be reset."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    except ImportError:
        return
    reset = getattr(ipc, "reset_gpu_interpret_mode_state", None)
    if reset is not None:
        reset()


def interpret_fn(detect_races: bool = False):
    """The kernel run by the Mosaic GPU interpreter on CPU (same signature). With
    `detect_races`, the interpreter tracks SMEM/GMEM accesses by vector clocks and
    `races_found()` says afterwards whether two unordered accesses touched the same bytes."""
    return functools.partial(ragged_paged_attention_mgpu, interpret=True, detect_races=detect_races)


def races_found() -> bool:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    return bool(ipc.get_races().races_found)


def _body(
    seq_ref,
    count_ref,
    pos_ref,
    kv_lens_ref,
    bt_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    group_pad: int,
    pages_per_block: int,
    sm_scale: float,
    soft_cap,
    sliding_window,
    interpret: bool,
    quantized: bool,
    num_splits: int,
    slots: int,
):
    plgpu = _mgpu()
    bkv = block_kv(k_ref.shape[3])
    ks_ref, vs_ref = rest[:2] if quantized else (None, None)
    outs = rest[2:] if quantized else rest
    o_ref, lse_ref = outs if num_splits > 1 else (outs[0], None)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[3]
    dtype = q_ref.dtype
    wgmma_layout = plgpu.Layout.WGMMA

    # Register layouts matter to the Mosaic GPU compiler only; its interpreter has no rule for
    # `layout_cast` or laid-out iotas, and computes the same values without them.
    def layout(x, lay):
        return x if interpret else plgpu.layout_cast(x, lay)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

    def widen(x):
        # e4m3 -> bf16 has no direct conversion on sm_90 with CUDA 12 ptxas; through f32 is
        # exact (both hold every e4m3 value) and costs registers, not bandwidth.
        if x.dtype != jnp.int8:
            x = x.astype(jnp.float32)
        return x.astype(dtype)

    def vector(ref):  # a [bkv] float32 SMEM vector as a column vector of an S tile
        if interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=wgmma_layout.reduce(0))

    def scoped(q_smem, k_smem, v_smem, p_smem, q_bar, k_bars, v_bars, *extra):
        quant, split_bufs = (extra[:6], extra[6:]) if quantized else ((), extra)
        head, tile = lax.axis_index("kv"), lax.axis_index("tile")
        seq, count, first_pos = seq_ref[tile], count_ref[tile], pos_ref[tile]
        lo, hi = common.kv_range(first_pos, count, kv_lens_ref[seq], sliding_window)
        split = lax.axis_index("split") if num_splits > 1 else 0
        blk_lo, blk_hi = common.split_blocks(lo, hi, bkv, split, num_splits)

        plgpu.copy_gmem_to_smem(q_ref.at[head, tile], q_smem, q_bar.at[0])
        plgpu.barrier_wait(q_bar.at[0])

        shape = (ROWS, bkv)
        rows, cols = iota(shape, 0), iota(shape, 1)
        row_tok = lax.div(rows, jnp.int32(group_pad))
        row_pos = first_pos + row_tok
        row_live = row_tok < count

        # Copies land in `slots` staging buffers (the pool's dtype: quantized pools are widened
        # into k_smem / v_smem after they arrive; float pools are read by wgmma in place).
        k_stage, v_stage = (quant[0], quant[1]) if quantized else (k_smem, v_smem)

        def issue(blk, slot):
            """Start the TMA copies of K/V tile `blk` (and its scales) into `slot`."""
            for i in range(pages_per_block):
                page = bt_ref[seq, blk * pages_per_block + i]
                dst = (slot, pl_ds(i * page_size, page_size))
                bar = slot * pages_per_block + i
                plgpu.copy_gmem_to_smem(k_ref.at[page, :, head], k_stage.at[dst], k_bars.at[bar])
                plgpu.copy_gmem_to_smem(v_ref.at[page, :, head], v_stage.at[dst], v_bars.at[bar])
            if quantized:  # this tile's scales: one contiguous row per kind (see the wrapper)
                keys = (head, seq, pl_ds(blk * bkv, bkv))
                plgpu.copy_gmem_to_smem(ks_ref.at[keys], quant[2].at[slot], quant[4].at[slot])
                plgpu.copy_gmem_to_smem(vs_ref.at[keys], quant[3].at[slot], quant[5].at[slot])

        if slots == 2:  # prologue: the first tile's copies

            @_pl().when(blk_lo < blk_hi)
            def _():
                issue(blk_lo, 0)

        def step(blk, carry):
            acc, m, denom = carry
            if slots == 2:
                slot = lax.rem(blk - blk_lo, 2)

                @_pl().when(blk + 1 < blk_hi)
                def _():  # the next tile streams in while this one is computed on
                    issue(blk + 1, 1 - slot)

            else:
                slot = 0
                issue(blk, slot)
            for i in range(pages_per_block):
                plgpu.barrier_wait(k_bars.at[slot * pages_per_block + i])
            if quantized:
                # Dequantize in the kernel: the 8-bit tile is cast to q's dtype through
                # registers (exact for int8 and e4m3 in bf16) into the tile wgmma reads; the
                # per-key scales multiply the logits' and the probabilities' columns.
                k_tile, v_tile = k_smem, v_smem
                k_tile[...] = widen(k_stage[slot])
                plgpu.barrier_wait(quant[4].at[slot])
                plgpu.commit_smem()
            else:
                k_tile, v_tile = k_stage.at[slot], v_stage.at[slot]

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
                return acc_ref[...]

            if interpret:  # JAX 0.10's interpreter cannot apply `transpose_ref` in a wgmma
                s = common.dot_nt(q_smem[...], k_tile[...])
            else:
                s = _pl().run_scoped(qk, plgpu.ACC(shape, jnp.float32))
            if quantized:
                s = s * lax.broadcast_in_dim(vector(quant[2].at[slot]), shape, [1])
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            key_pos = blk * bkv + cols
            mask = (key_pos <= row_pos) & row_live
            if sliding_window is not None:
                mask &= key_pos > row_pos - sliding_window
            s = jnp.where(mask, s, common.MASKED)
            m_next = jnp.maximum(m, s.max(axis=1))
            correction = jnp.exp(m - m_next)
            p = jnp.exp(s - lax.broadcast_in_dim(m_next, shape, [0]))
            denom = denom * correction + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
            for i in range(pages_per_block):
                plgpu.barrier_wait(v_bars.at[slot * pages_per_block + i])
            if quantized:
                plgpu.barrier_wait(quant[5].at[slot])
                p = p * lax.broadcast_in_dim(vector(quant[3].at[slot]), shape, [1])
                v_tile[...] = widen(v_stage[slot])

            # p goes through shared memory (wgmma's A operand from SMEM) rather than registers:
            # JAX 0.10's interpreter runs wgmma on SMEM operands only, and this way the device
            # and the interpreter run the same PV code. Costs a 16 KB SMEM round trip per tile.
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_tile)
                return acc_ref[...]

            # A fresh accumulator added in registers (rather than `run_state` over `acc`,
            # which the Mosaic GPU interpreter does not run): one more 64 x D f32 tile live.
            acc = acc + _pl().run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
            return acc, m_next, denom

        reduced = wgmma_layout.reduce(1)
        carry = (
            layout(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
            layout(jnp.full((ROWS,), common.M_INIT, jnp.float32), reduced),
            layout(jnp.zeros((ROWS,), jnp.float32), reduced),
        )
        acc, m, denom = lax.fori_loop(blk_lo, blk_hi, step, carry)
        seen = denom > 0
        scale = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
        out = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
        if num_splits == 1:
            q_smem[...] = out.astype(dtype)  # the query tile's buffer holds the output tile
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[0, head, tile])
        else:  # a normalized float32 partial and its log-sum-exp, merged by the wrapper
            o_smem, lse_smem = split_bufs
            o_smem[...] = out
            lse_smem[...] = common.log_sum_exp(m, denom)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, head, tile])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, head, tile])
        plgpu.wait_smem_to_gmem(0)

    def transforms(dt, width):
        swizzle = min(128, width * jnp.dtype(dt).itemsize)  # bytes of one swizzled row
        return (
            plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
            plgpu.SwizzleTransform(swizzle),
        )

    quant = []
    if quantized:
        page_dtype = k_ref.dtype
        staged = (slots, bkv, head_dim)
        quant = [
            plgpu.SMEM(staged, page_dtype, transforms=transforms(page_dtype, head_dim)),
            plgpu.SMEM(staged, page_dtype, transforms=transforms(page_dtype, head_dim)),
            plgpu.SMEM((slots, bkv), jnp.float32),
            plgpu.SMEM((slots, bkv), jnp.float32),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_barriers=slots),
        ]
    kv_tile = (bkv, head_dim) if quantized else (slots, bkv, head_dim)
    _pl().run_scoped(
        scoped,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=transforms(dtype, head_dim)),
        plgpu.SMEM(kv_tile, dtype, transforms=transforms(dtype, head_dim)),
        plgpu.SMEM(kv_tile, dtype, transforms=transforms(dtype, head_dim)),
        plgpu.SMEM((ROWS, bkv), dtype, transforms=transforms(dtype, bkv)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=slots * pages_per_block),
        plgpu.Barrier(num_barriers=slots * pages_per_block),
        *quant,
        *(
            [
                plgpu.SMEM(
                    (ROWS, head_dim), jnp.float32, transforms=transforms(jnp.float32, head_dim)
                ),
                plgpu.SMEM((ROWS,), jnp.float32),
            ]
            if num_splits > 1
            else []
        ),
    )


SMEM_BUDGET = 200 * 1024  # bytes; Hopper gives a block up to 227 KB


def stages(head_dim: int, bkv: int, itemsize: int, quantized: bool, num_splits: int) -> int:
    """K/V staging buffers: 2 (the next tile's copies overlap this tile's compute) when they fit
    in SMEM beside the query, probability and output tiles, else 1."""

    def smem(slots: int) -> int:
        tile = bkv * head_dim
        total = ROWS * head_dim * itemsize + ROWS * bkv * itemsize  # q (and output), p
        total += 2 * slots * tile * (1 if quantized else itemsize)  # K, V staging
        total += 2 * tile * itemsize + 2 * slots * bkv * 4 if quantized else 0  # widened, scales
        total += ROWS * head_dim * 4 + ROWS * 4 if num_splits > 1 else 0  # f32 partial, lse
        return total

    return 2 if smem(2) <= SMEM_BUDGET else 1


def _pl():
    from jax.experimental import pallas as pl

    return pl


def pl_ds(start, size):
    return _pl().ds(start, size)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "sliding_window",
        "num_splits",
        "interpret",
        "detect_races",
    ),
)
def ragged_paged_attention_mgpu(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    k_scales=None,
    v_scales=None,
    soft_cap=None,
    sliding_window=None,
    num_splits: int | None = None,
    interpret: bool = False,
    detect_races: bool = False,
):
    """Same contract as `reference.ragged_paged_attention_reference`, for the shapes
    `support.SUPPORTED[Kernel.MOSAIC_GPU_RAGGED]` lists.

    `num_splits=None` picks the split-K factor from the grid size (`tuning.splits`), as the
    Triton ragged kernel does."""
    plgpu = _mgpu()
    if plgpu is None:
        raise NotImplementedError("this JAX has no Pallas Mosaic GPU backend")
    common.validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scales, v_scales)
    quantized = k_scales is not None
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    bkv = block_kv(head_dim)
    if head_dim % 64 or bkv % page_size or (k_pages.dtype != q.dtype and not quantized):
        raise ValueError(
            f"Mosaic GPU kernel: head_dim {head_dim} must be a multiple of 64, page_size "
            f"{page_size} divide {bkv}, and float pages ({k_pages.dtype}) match q "
            f"({q.dtype})"
        )
    group_pad = common.next_pow2(num_heads // num_kv_heads)
    if group_pad > ROWS:
        raise ValueError(f"GQA group {num_heads // num_kv_heads} exceeds {ROWS} rows")
    tokens_per_tile = ROWS // group_pad
    pages_per_block = bkv // page_size

    tm = common.tile_map(
        kv_lens, cu_q_lens, num_seqs, num_tokens=num_tokens, tokens_per_tile=tokens_per_tile
    )
    q_tiles = common.gather_query_tiles(
        q, tm, num_kv_heads=num_kv_heads, tokens_per_tile=tokens_per_tile, group_pad=group_pad
    )
    num_tiles = q_tiles.shape[1]
    sizes = tuning.block_sizes("interpret" if interpret else "gpu")
    num_splits = num_splits or tuning.splits(num_kv_heads * num_tiles, sizes)
    width = -(-block_tables.shape[1] // pages_per_block) * pages_per_block
    block_tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))

    body = functools.partial(
        _body,
        group_pad=group_pad,
        pages_per_block=pages_per_block,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        interpret=interpret,
        quantized=quantized,
        num_splits=num_splits,
        slots=stages(head_dim, bkv, jnp.dtype(q.dtype).itemsize, quantized, num_splits),
    )
    # `interpret` is passed only when set, so a JAX whose `plgpu.kernel` lacks it still lowers.
    extra = dict(interpret=_interpret_params()(detect_races=detect_races)) if interpret else {}
    part = (num_splits, *q_tiles.shape)
    if num_splits == 1:  # the final output straight from the kernel, in q's dtype
        out_type = [jax.ShapeDtypeStruct(part, q.dtype)]
        grid, names = (num_kv_heads, num_tiles), ("kv", "tile")
    else:
        out_type = [
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part[:-1], jnp.float32),
        ]
        grid, names = (num_kv_heads, num_tiles, num_splits), ("kv", "tile", "split")
    kernel = plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=names, **extra)
    args = [tm.seq, tm.count, tm.first_pos, kv_lens, block_tables, q_tiles, k_pages, v_pages]
    if quantized:
        # Each sequence's scales gathered through its block table, kv-head-major:
        # [K, S, W * PS], so a K/V tile's 128 scales are one contiguous TMA row (a page's own
        # 16-32 floats are under the 128-byte minimum copy). Cost: 4 bytes per owned key and
        # head per kind, read and written (~6% on top of the int8 pages at head_dim 128); a
        # pool that kept its scales head-major per page would not need it (not changed here).
        def by_sequence(x):
            x = x.astype(jnp.float32)[block_tables]  # [S, W, PS, K]
            return x.reshape(x.shape[0], -1, num_kv_heads).transpose(2, 0, 1)

        args += [by_sequence(k_scales), by_sequence(v_scales)]
    outs = kernel(*args)
    if num_splits == 1:
        out_tiles = outs[0][0]
    else:
        out_tiles = common.combine_splits(outs[0], outs[1][..., None]).astype(q.dtype)
    return common.scatter_output_tiles(
        out_tiles,
        tm,
        cu_q_lens,
        num_seqs,
        num_heads=num_heads,
        num_tokens=num_tokens,
        tokens_per_tile=tokens_per_tile,
    )
