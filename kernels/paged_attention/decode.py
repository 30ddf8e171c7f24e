"""Paged decode attention with split-K, GPU style (Pallas -> Triton), interpret=True on CPU.

For batches where every live sequence has exactly one new token (pure decode steps). Decode is
bandwidth-bound and its parallelism is `kv_heads * seqs` programs, too few to fill a GPU when a
handful of long claims decode alone. So each sequence's context is also cut into `splits`
partitions (grid `(kv_heads, seqs, splits)`; the count is static, from the grid size, see
`tuning.splits`), sized per sequence from its own `kv_len` (a short sequence's spare partitions
exit at once), and a combine pass merges the partial results by their log-sum-exp:

    lse = logsumexp_p(lse_p);   out = sum_p exp(lse_p - lse) * out_p

where `out_p` is partition p's normalized output and `lse_p` its log-sum-exp (-inf when it saw
no key). The combine is a few elementwise ops over `[splits, seqs, heads, head_dim]` that XLA
fuses; it reads `splits` times the output size, small beside the KV it replaces.

The query tile is the group's heads padded to at least 16 rows (the minimum `tl.dot` tile);
padded rows cost compute, not KV bandwidth. Page reads and masking are as in `ragged.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pijax.kernels.paged_attention import common, tuning

_MIN_DOT_ROWS = 16


def _kernel(
    kv_lens_ref,
    bt_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    soft_cap,
    sliding_window,
    quantized: bool,
    interpret: bool,
):
    if quantized:
        ks_ref, vs_ref, o_ref, lse_ref = rest
    else:
        (o_ref, lse_ref), ks_ref, vs_ref = rest, None, None
    seq, split = pl.program_id(1), pl.program_id(2)
    rows, width = q_ref.shape  # width: head_dim padded to a power of two (see ragged.py)
    block_keys = pages_per_block * k_ref.shape[1]
    kv_len = kv_lens_ref[seq]
    pos = kv_len - 1  # the one new token; kv_len == 0 (padded sequence) leaves nothing to do
    lo, hi = common.kv_range(pos, jnp.minimum(kv_len, 1), kv_len, sliding_window)
    start, stop = common.split_blocks(lo, hi, block_keys, split, num_splits)

    row_pos = jnp.full((rows, 1), pos, jnp.int32)
    row_live = row_pos >= 0
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

    o, m, denom = lax.fori_loop(start, stop, body, common.init_carry(rows, width))
    o_ref[...] = common.normalize(o, denom)
    lse_ref[...] = common.log_sum_exp(m, denom)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "sliding_window",
        "pages_per_block",
        "num_splits",
        "interpret",
    ),
)
def paged_decode_attention(
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
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
):
    """The ragged contract, restricted to `q_len <= 1` for every sequence (pure decode).

    Live sequences with q_len > 1 would get only their first token attended; callers must use
    `ragged_paged_attention` for mixed batches.
    """
    out_parts, lse_parts, live = decode_partials(
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
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        interpret=interpret,
    )
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_pages.shape[2]
    o = common.combine_splits(out_parts, lse_parts)[:, :, :group, :head_dim]  # [K, S, G, D]
    o = o.transpose(1, 0, 2, 3).reshape(-1, num_heads, head_dim).astype(q.dtype)
    dest = jnp.where(live, cu_q_lens[:-1], num_tokens)  # padded sequences scatter nowhere
    return jnp.zeros_like(q).at[dest].set(o, mode="drop")


def decode_partials(
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
    pages_per_block,
    num_splits,
    interpret,
):
    """Per-partition outputs `[P, K, S, rows, Dp]` (Dp: head_dim padded to a power of two; the
    padded columns are zeros) and log-sum-exps `[P, K, S, rows, 1]` (every
    element written), and the live-sequence mask; tests inspect them directly."""
    common.validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scales, v_scales)
    sizes = tuning.block_sizes("interpret" if interpret else "gpu")
    pages_per_block = pages_per_block or sizes.pages_per_block
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    rows = max(_MIN_DOT_ROWS, common.next_pow2(group))
    dim_pad = common.next_pow2(head_dim)
    num_splits = num_splits or tuning.splits(num_kv_heads * max_seqs, sizes)

    live = jnp.arange(max_seqs) < num_seqs
    live &= cu_q_lens[1:] > cu_q_lens[:-1]
    kv_lens = jnp.where(live, kv_lens, 0)  # a padded sequence reads nothing
    tok = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)
    qs = q[tok].reshape(max_seqs, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, rows - group), (0, dim_pad - head_dim)))
    width = pl.cdiv(block_tables.shape[1], pages_per_block) * pages_per_block
    block_tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))

    def whole(shape):
        return pl.BlockSpec(shape, lambda h, s, p: (0,) * len(shape))

    page_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda h, s, p: (0, 0, h, 0))
    in_specs = [
        whole(kv_lens.shape),
        whole(block_tables.shape),
        pl.BlockSpec((None, None, rows, dim_pad), lambda h, s, p: (h, s, 0, 0)),
        page_spec,
        page_spec,
    ]
    args = [kv_lens, block_tables, qs, k_pages, v_pages]
    quantized = k_scales is not None
    if quantized:
        scale_spec = pl.BlockSpec((num_pages, page_size, None), lambda h, s, p: (0, 0, h))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]

    part = (num_splits, num_kv_heads, max_seqs, rows)
    kernel = functools.partial(
        _kernel,
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
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, max_seqs, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dim_pad), lambda h, s, p: (p, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda h, s, p: (p, h, s, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, dim_pad), jnp.float32),
            jax.ShapeDtypeStruct((*part, 1), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="pijax_paged_decode_attention",
    )(*args)

    return out_parts, lse_parts, live
