"""Ragged paged attention, GPU style (Pallas -> Triton), also run with interpret=True on CPU.

One kernel for the whole mixed batch (prefill chunks and decode tokens). Grid `(kv_heads,
query_tiles)`; see `common` for the tile map. A program loads its query tile once, then walks
its sequence's block table `pages_per_block` pages at a time: the page ids are a vector load
from the block table, and K/V are a gather of those pages from the pool (`k_ref[pages]`), so
only pages the sequence owns are read. Programs stop at the tile's causal frontier (and start at
its sliding-window edge), so a decode token reads its context once, and a prefill tile reads
only keys at or before its last token.

Layout. The pool keeps the engine's `[num_pages, page_size, num_kv_heads, head_dim]`. The
BlockSpec squeezes the kv-head axis, so a program sees `[num_pages, page_size, head_dim]` with a
stride of `num_kv_heads * head_dim` between keys: each key row is a contiguous `head_dim` run
(128-256 bytes in bf16), which is what a coalesced GPU load needs, so a head-major pool would not
read fewer bytes. It would make each page one contiguous run, which helps TPU DMAs more than
GPU loads (see `tpu.py`).

Head dims that are not powers of two (48, 80, 96: Triton tiles must be powers of two). The
kernel works at `width = next_pow2(head_dim)`: query tiles are zero-padded to it in the wrapper
(queries are small), K/V columns past `head_dim` are masked loads that read as zero (no byte is
read past a stored row, and the pool keeps its layout), and the padded output columns, zeros
times anything, are dropped by `scatter_output_tiles`. The cost is tile compute, not bandwidth.

Split-K. With `num_splits > 1` the grid gains a third axis: each program walks one partition
of its tile's K/V range and writes a normalized partial output with its log-sum-exp; a combine
pass (`common.combine_splits`, a few fused XLA ops) merges them. The split count is static and
comes from the grid size (`tuning.splits`): a pure-decode step of a few long sequences has few
tiles and gets split like a flash-decoding kernel, a big mixed step gets one partition and no
combine. This is how decode rows get split-K inside the engine's one attention call per layer,
without a second kernel or a host-side flag (see `decode.py` for the dedicated decode kernel).

Invariants: pages beyond `kv_len` and the null page 0 may be read (whole pages are loaded) but
are always masked; query rows of padded tokens and padded heads are computed and dropped;
every output row is written (zeros for padding) by `scatter_output_tiles`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pijax.kernels.paged_attention import common, tuning


def _kernel(
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
    num_splits: int,
    sm_scale: float,
    soft_cap,
    sliding_window,
    quantized: bool,
    interpret: bool,
):
    ks_ref, vs_ref = rest[:2] if quantized else (None, None)
    outs = rest[2:] if quantized else rest
    o_ref, lse_ref = outs if num_splits > 1 else (outs[0], None)
    tile = pl.program_id(1)
    seq, count, first_pos = seq_ref[tile], count_ref[tile], pos_ref[tile]
    rows, width = q_ref.shape  # width: head_dim padded to a power of two
    page_size = k_ref.shape[1]
    block_keys = pages_per_block * page_size

    row_tok = lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), group_pad)
    row_pos = first_pos + row_tok
    row_live = row_tok < count
    lo, hi = common.kv_range(first_pos, count, kv_lens_ref[seq], sliding_window)
    q = q_ref[...]

    def body(blk, carry):
        pages = bt_ref[seq, pl.ds(blk * pages_per_block, pages_per_block)]
        k = common.load_pages(k_ref, pages, width, interpret=interpret).reshape(block_keys, width)
        v = common.load_pages(v_ref, pages, width, interpret=interpret).reshape(block_keys, width)
        k_scale = v_scale = None
        if quantized:
            k_scale = ks_ref[pages].reshape(1, block_keys)
            v_scale = vs_ref[pages].reshape(1, block_keys)
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

    split = pl.program_id(2) if num_splits > 1 else 0
    start, stop = common.split_blocks(lo, hi, block_keys, split, num_splits)
    o, m, denom = lax.fori_loop(start, stop, body, common.init_carry(rows, width))
    o_ref[...] = common.normalize(o, denom).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = common.log_sum_exp(m, denom)


_STATIC = (
    "sm_scale",
    "soft_cap",
    "sliding_window",
    "block_rows",
    "pages_per_block",
    "num_splits",
    "interpret",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def ragged_paged_attention(
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
    num_splits: int | None = None,
    interpret: bool = False,
):
    """Same contract as `reference.ragged_paged_attention_reference`.

    `num_splits=None` picks the split-K factor from the grid size (`tuning.splits`)."""
    parts, lse, tm, tokens_per_tile = ragged_output_tiles(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        k_scales=k_scales,
        v_scales=v_scales,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        block_rows=block_rows,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        interpret=interpret,
    )
    out_tiles = parts[0] if lse is None else common.combine_splits(parts, lse).astype(q.dtype)
    return common.scatter_output_tiles(
        out_tiles,
        tm,
        cu_q_lens,
        num_seqs,
        num_heads=q.shape[1],
        num_tokens=q.shape[0],
        tokens_per_tile=tokens_per_tile,
        head_dim=q.shape[2],
    )


def ragged_output_tiles(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale,
    k_scales,
    v_scales,
    soft_cap,
    sliding_window,
    block_rows,
    pages_per_block,
    num_splits,
    interpret,
):
    """The kernel's raw outputs (every element written), its tile map and tokens per tile.

    Outputs: `[splits, K, tiles, rows, D]` partials and `[splits, K, tiles, rows, 1]`
    log-sum-exps when split, else the final `[1, K, tiles, rows, D]` in q's dtype and None.
    `D` here is the head dim padded to a power of two (Triton tiles); columns past the real
    head dim are zeros. Tests inspect them directly."""
    common.validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scales, v_scales)
    sizes = tuning.block_sizes("interpret" if interpret else "gpu")
    block_rows = block_rows or sizes.block_rows
    pages_per_block = pages_per_block or sizes.pages_per_block
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group_pad = common.next_pow2(num_heads // num_kv_heads)
    dim_pad = common.next_pow2(head_dim)
    tokens_per_tile = max(1, block_rows // group_pad)
    rows = tokens_per_tile * group_pad

    tm = common.tile_map(
        kv_lens, cu_q_lens, num_seqs, num_tokens=num_tokens, tokens_per_tile=tokens_per_tile
    )
    q_tiles = common.gather_query_tiles(
        q,
        tm,
        num_kv_heads=num_kv_heads,
        tokens_per_tile=tokens_per_tile,
        group_pad=group_pad,
        head_dim_pad=dim_pad,
    )
    num_tiles = q_tiles.shape[1]
    num_splits = num_splits or tuning.splits(num_kv_heads * num_tiles, sizes)
    # Pad the table to whole K/V tiles with null pages (always masked), so loads stay in bounds.
    width = pl.cdiv(block_tables.shape[1], pages_per_block) * pages_per_block
    block_tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))

    def whole(shape):
        return pl.BlockSpec(shape, lambda h, t, *_: (0,) * len(shape))

    page_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda h, t, *_: (0, 0, h, 0))
    in_specs = [whole((num_tiles,))] * 3 + [
        whole(kv_lens.shape),
        whole(block_tables.shape),
        pl.BlockSpec((None, None, rows, dim_pad), lambda h, t, *_: (h, t, 0, 0)),
        page_spec,
        page_spec,
    ]
    args = [tm.seq, tm.count, tm.first_pos, kv_lens, block_tables, q_tiles, k_pages, v_pages]
    quantized = k_scales is not None
    if quantized:
        scale_spec = pl.BlockSpec((num_pages, page_size, None), lambda h, t, *_: (0, 0, h))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]

    kernel = functools.partial(
        _kernel,
        group_pad=group_pad,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        quantized=quantized,
        interpret=interpret,
    )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(
            num_warps=sizes.num_warps, num_stages=sizes.num_stages
        )
    part = (num_splits, num_kv_heads, num_tiles, rows)
    if num_splits == 1:  # final output straight from the kernel, in q's dtype
        grid = (num_kv_heads, num_tiles)
        out_specs = [pl.BlockSpec((None, None, None, rows, dim_pad), lambda h, t: (0, h, t, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((*part, dim_pad), q.dtype)]
    else:
        grid = (num_kv_heads, num_tiles, num_splits)
        out_specs = [
            pl.BlockSpec((None, None, None, rows, dim_pad), lambda h, t, p: (p, h, t, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda h, t, p: (p, h, t, 0, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((*part, dim_pad), jnp.float32),
            jax.ShapeDtypeStruct((*part, 1), jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name="pijax_ragged_paged_attention",
    )(*args)
    parts, lse = (outs[0], None) if num_splits == 1 else outs
    return parts, lse, tm, tokens_per_tile
