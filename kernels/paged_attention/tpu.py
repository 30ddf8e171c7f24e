"""Ragged paged attention for TPU (Pallas -> Mosaic), tested through the TPU interpreter.

Same tiling as `ragged.py` (grid `(kv_heads, query_tiles)`, tile map from `common`), but K/V
stay in HBM (`memory_space=ANY`) and the kernel moves pages itself:

* The tile map, `kv_lens` and the flattened block tables are scalar-prefetched into SMEM
  (`PrefetchScalarGridSpec`), so page ids are known before any DMA is issued.
* K/V tiles are `pages_per_block` page DMAs into a two-slot VMEM buffer: while the MXU works on
  slot `i % 2`, the DMAs for tile `i + 1` fill the other slot. All copies of one slot signal one
  DMA semaphore per kind; waiting on each descriptor consumes exactly its bytes.
* Int8 scales ride along as their own small DMAs (`[page_size]` float32 per page and head) and
  are applied to logits / probabilities, as on GPU.

Layout note (not changed; reported to the integrator): with the engine's
`[num_pages, page_size, num_kv_heads, head_dim]` pool, one page of one kv head is `page_size`
rows of `head_dim` elements at a stride of `num_kv_heads * head_dim`: a strided DMA of
`page_size` short bursts, and the scale slice `[page_size]` has a stride of `num_kv_heads`
floats. A head-major pool `[num_kv_heads, num_pages, page_size, head_dim]` (scales
`[num_kv_heads, num_pages, page_size]`) makes each page one contiguous burst and keeps int8
tiles (32, 128)-aligned. The expected gain is DMA efficiency on real TPUs; it is not measured
(no TPU here), so the engine layout stays as is until a TPU run shows the difference.

Untested on hardware: Mosaic's own compiler passes (layout inference, reshape of the scale
tile) run only when compiling for a real TPU; here the kernel is interpreted and jit-lowered.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pijax.kernels.paged_attention import common
from pijax.kernels.paged_attention.tuning import block_sizes

_K, _V, _KS, _VS = range(4)  # semaphore column per DMA kind


def _kernel(
    seq_ref,
    count_ref,
    pos_ref,
    kv_lens_ref,
    bt_ref,  # scalar prefetch (SMEM)
    q_ref,
    k_hbm,
    v_hbm,
    *rest,
    width: int,
    group_pad: int,
    pages_per_block: int,
    sm_scale: float,
    soft_cap,
    sliding_window,
    quantized: bool,
):
    if quantized:
        ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems = rest
    else:
        o_ref, k_buf, v_buf, sems = rest
    head, tile = pl.program_id(0), pl.program_id(1)
    seq, count, first_pos = seq_ref[tile], count_ref[tile], pos_ref[tile]
    rows, head_dim = q_ref.shape
    page_size = k_buf.shape[2]
    block_keys = pages_per_block * page_size

    def copies(blk, slot):
        descs = []
        for i in range(pages_per_block):
            page = bt_ref[seq * width + blk * pages_per_block + i]
            pairs = [
                (k_hbm.at[page, :, head], k_buf.at[slot, i], _K),
                (v_hbm.at[page, :, head], v_buf.at[slot, i], _V),
            ]
            if quantized:
                pairs += [
                    (ks_hbm.at[page, :, head], ks_buf.at[slot, i], _KS),
                    (vs_hbm.at[page, :, head], vs_buf.at[slot, i], _VS),
                ]
            descs += [
                pltpu.make_async_copy(src, dst, sems.at[slot, kind]) for src, dst, kind in pairs
            ]
        return descs

    lo, hi = common.kv_range(first_pos, count, kv_lens_ref[seq], sliding_window)
    blk_lo, blk_hi = lax.div(lo, block_keys), common.cdiv(hi, block_keys)

    @pl.when(blk_lo < blk_hi)
    def _():
        for d in copies(blk_lo, 0):
            d.start()

    row_tok = lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), group_pad)
    row_pos = first_pos + row_tok
    row_live = row_tok < count
    q = q_ref[...]

    def body(blk, carry):
        slot = lax.rem(blk - blk_lo, 2)

        @pl.when(blk + 1 < blk_hi)
        def _():  # prefetch the next tile into the other slot before computing on this one
            for d in copies(blk + 1, 1 - slot):
                d.start()

        for d in copies(blk, slot):
            d.wait()
        k = k_buf[slot].reshape(block_keys, head_dim)
        v = v_buf[slot].reshape(block_keys, head_dim)
        k_scale = v_scale = None
        if quantized:
            k_scale = ks_buf[slot].reshape(1, block_keys)
            v_scale = vs_buf[slot].reshape(1, block_keys)
        key_pos = blk * block_keys + lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)
        return common.softmax_step(
            carry,
            q,
            k,
            v,
            k_scale,
            v_scale,
            key_pos,
            row_pos,
            row_live,
            sm_scale=sm_scale,
            soft_cap=soft_cap,
            sliding_window=sliding_window,
        )

    o, _, denom = lax.fori_loop(blk_lo, blk_hi, body, common.init_carry(rows, head_dim))
    o_ref[...] = common.normalize(o, denom).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "sliding_window",
        "block_rows",
        "pages_per_block",
        "interpret",
    ),
)
def ragged_paged_attention_tpu(
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
    block_rows: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
):
    """Same contract as `reference.ragged_paged_attention_reference`.

    `interpret=True` runs the TPU interpreter (`pltpu.InterpretParams`) on any backend; it
    simulates SMEM/VMEM, DMAs and semaphores, and fills uninitialized buffers with NaN.
    """
    common.validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scales, v_scales)
    sizes = block_sizes("interpret" if interpret else "tpu")
    block_rows = block_rows or sizes.block_rows
    pages_per_block = pages_per_block or sizes.pages_per_block
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group_pad = common.next_pow2(num_heads // num_kv_heads)
    tokens_per_tile = max(1, block_rows // group_pad)
    rows = tokens_per_tile * group_pad

    tm = common.tile_map(
        kv_lens, cu_q_lens, num_seqs, num_tokens=num_tokens, tokens_per_tile=tokens_per_tile
    )
    q_tiles = common.gather_query_tiles(
        q, tm, num_kv_heads=num_kv_heads, tokens_per_tile=tokens_per_tile, group_pad=group_pad
    )
    num_tiles = q_tiles.shape[1]
    width = pl.cdiv(block_tables.shape[1], pages_per_block) * pages_per_block
    # 1-D in SMEM: a 2-D SMEM array pads its minor dimension to 128 words.
    flat_tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1]))).reshape(-1)

    quantized = k_scales is not None
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda h, t, *_: (h, t, 0, 0))
    in_specs = [tile_spec, hbm, hbm] + [hbm, hbm] * quantized
    scratch = [
        pltpu.VMEM((2, pages_per_block, page_size, head_dim), k_pages.dtype),
        pltpu.VMEM((2, pages_per_block, page_size, head_dim), v_pages.dtype),
    ]
    args = [q_tiles, k_pages, v_pages]
    if quantized:
        scratch += [pltpu.VMEM((2, pages_per_block, page_size), jnp.float32)] * 2
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    scratch.append(pltpu.SemaphoreType.DMA((2, 4)))

    kernel = functools.partial(
        _kernel,
        width=width,
        group_pad=group_pad,
        pages_per_block=pages_per_block,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        quantized=quantized,
    )
    out_tiles = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_kv_heads, num_tiles),
            in_specs=in_specs,
            out_specs=tile_spec,
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, num_tiles, rows, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="pijax_ragged_paged_attention_tpu",
    )(tm.seq, tm.count, tm.first_pos, kv_lens, flat_tables, *args)
    return common.scatter_output_tiles(
        out_tiles,
        tm,
        cu_q_lens,
        num_seqs,
        num_heads=num_heads,
        num_tokens=num_tokens,
        tokens_per_tile=tokens_per_tile,
    )
