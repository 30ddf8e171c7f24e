"""Pieces shared by the Pallas kernels: input validation, the ragged query-tile map, and one
online-softmax step over a K/V tile.

Everything here is plain jnp on values, so the same step lowers through Triton (GPU), Mosaic
(TPU) and the interpreter; kernels differ only in how a K/V tile gets into registers/VMEM.

Query tiles. A kernel program owns `rows = tokens_per_tile * group_pad` query rows: up to
`tokens_per_tile` consecutive tokens of ONE sequence, each with all the query heads of one kv
head (padded to a power of two). Row `r` is token `r // group_pad`, head `r % group_pad` of the
group. Tiles never straddle sequences, so a tile has one block table and one causal frontier;
the number of tiles is bounded by `cdiv(T, tokens_per_tile) + max_seqs`, a static grid size.
`tile_map` computes the tile -> (sequence, first token, live tokens, first position) table
outside the kernel; it is a few hundred int32s, passed to the kernel as data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -jnp.inf  # logits outside the causal / window range
M_INIT = -1e30  # running max starts finite so exp(MASKED - m) is 0, never nan


def cdiv(a, b: int):
    """Ceil-divide of non-negative in-kernel ints. Truncating `lax.div` rather than `//`: floor
    division lowers through `sign`, which Mosaic lowers per TPU generation (and which a
    non-negative operand does not need)."""
    return lax.div(a + (b - 1), b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def load_pages(ref, pages, width: int, *, interpret: bool):
    """K or V of `pages` as `[len(pages), page_size, width]`, where `width >= head_dim` (the
    stored width, `ref.shape[-1]`) is the kernel's power-of-two tile width: columns past
    `head_dim` read as zeros, so they add nothing to `q @ k.T` and produce output columns that
    the wrapper drops. The pool keeps its stored layout; on Triton the padding is a masked load
    (no bytes read past each row), in interpret mode a pad of the loaded value."""
    head_dim = ref.shape[-1]
    if width == head_dim:
        return ref[pages]
    if interpret:
        return jnp.pad(ref[pages], ((0, 0), (0, 0), (0, width - head_dim)))
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    col = lax.broadcasted_iota(jnp.int32, (pages.shape[0], ref.shape[1], width), 2)
    # `other` as a typed array: Triton's lowering cannot splat an int constant into fp8.
    zero = jnp.zeros(col.shape, ref.dtype)
    return plgpu.load(ref.at[pages, :, pl.ds(0, width)], mask=col < head_dim, other=zero)


def validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scales, v_scales):
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(
            f"q must be [T, H, D] and k_pages [P, PS, K, D]; got {q.shape}, {k_pages.shape}"
        )
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q heads/dim {q.shape[1:]} do not fit kv heads/dim {k_pages.shape[2:]}")
    num_seqs_max = block_tables.shape[0]
    if kv_lens.shape != (num_seqs_max,) or cu_q_lens.shape != (num_seqs_max + 1,):
        raise ValueError(
            f"kv_lens {kv_lens.shape} / cu_q_lens {cu_q_lens.shape} do not match "
            f"block_tables {block_tables.shape}"
        )
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales must both be given or both be None")
    if k_scales is not None and k_scales.shape != k_pages.shape[:3]:
        raise ValueError(f"scales must be [P, PS, K] = {k_pages.shape[:3]}; got {k_scales.shape}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileMap:
    seq: jax.Array  # [NT] sequence of the tile
    first_token: jax.Array  # [NT] row of the ragged q axis where the tile starts
    count: jax.Array  # [NT] live tokens in the tile (0 for unused tiles)
    first_pos: jax.Array  # [NT] position in its sequence of the tile's first token
    tile_start: jax.Array  # [S] first tile of each sequence


def tile_map(kv_lens, cu_q_lens, num_seqs, *, num_tokens: int, tokens_per_tile: int) -> TileMap:
    max_seqs = kv_lens.shape[0]
    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    tiles = (q_lens + tokens_per_tile - 1) // tokens_per_tile
    ends = jnp.cumsum(tiles)
    starts = ends - tiles
    num_tiles = -(-num_tokens // tokens_per_tile) + max_seqs
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), max_seqs - 1).astype(jnp.int32)
    j = t - starts[seq]
    used = t < ends[-1]
    count = jnp.where(used, jnp.clip(q_lens[seq] - j * tokens_per_tile, 0, tokens_per_tile), 0)
    first_pos = kv_lens[seq] - q_lens[seq] + j * tokens_per_tile
    first_token = jnp.where(used, cu_q_lens[seq] + j * tokens_per_tile, 0)
    return TileMap(
        seq,
        first_token.astype(jnp.int32),
        count.astype(jnp.int32),
        first_pos.astype(jnp.int32),
        starts.astype(jnp.int32),
    )


def gather_query_tiles(
    q,
    tm: TileMap,
    *,
    num_kv_heads: int,
    tokens_per_tile: int,
    group_pad: int,
    head_dim_pad: int | None = None,
):
    """[T, H, D] -> [K, NT, tokens_per_tile * group_pad, head_dim_pad] (rows of dead tokens are
    copies; columns past D are zeros)."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    tok = jnp.minimum(tm.first_token[:, None] + jnp.arange(tokens_per_tile), num_tokens - 1)
    qt = q[tok].reshape(-1, tokens_per_tile, num_kv_heads, group, head_dim)
    extra = (head_dim_pad or head_dim) - head_dim
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, group_pad - group), (0, extra)))
    qt = qt.transpose(2, 0, 1, 3, 4)
    return qt.reshape(num_kv_heads, -1, tokens_per_tile * group_pad, head_dim + extra)


def scatter_output_tiles(
    out_tiles,
    tm: TileMap,
    cu_q_lens,
    num_seqs,
    *,
    num_heads: int,
    num_tokens: int,
    tokens_per_tile: int,
    head_dim: int | None = None,
):
    """Inverse of `gather_query_tiles`: [K, NT, rows, Dp] -> [T, H, D]; padded rows are zero."""
    head_dim = head_dim or out_tiles.shape[-1]
    out_tiles = out_tiles[..., :head_dim]
    num_kv_heads, num_tiles = out_tiles.shape[:2]
    group = num_heads // num_kv_heads
    o = out_tiles.reshape(num_kv_heads, num_tiles, tokens_per_tile, -1, head_dim)[..., :group, :]
    o = o.transpose(1, 2, 0, 3, 4).reshape(num_tiles * tokens_per_tile, num_heads, head_dim)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").clip(0, cu_q_lens.shape[0] - 2)
    off = t - cu_q_lens[seq]
    row = (tm.tile_start[seq] + off // tokens_per_tile) * tokens_per_tile + off % tokens_per_tile
    valid = t < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], o[jnp.where(valid, row, 0)], 0).astype(out_tiles.dtype)


def dot_nt(a, b):
    """a @ b.T with float32 accumulation; f32 inputs get full precision (no TF32 on GPU)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_nn(a, b):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def softmax_step(
    carry,
    q,
    k,
    v,
    k_scale,
    v_scale,
    key_pos,
    row_pos,
    row_live,
    *,
    sm_scale: float,
    soft_cap,
    sliding_window,
):
    """One flash-attention step of the query tile over a K/V tile.

    q: [R, D]; k, v: [N, D] in the pool dtype (int8 and fp8 e4m3 are cast to q's dtype in
    registers, which is exact in bf16 and f32: |x| <= 127 needs 7 significant bits, e4m3 has 4
    and a narrower exponent range); k_scale, v_scale: [1, N] float32 or None; key_pos: [1, N];
    row_pos, row_live: [R, 1]. Scales fold into the logits' columns (K) and into the
    probabilities' columns (V), so the tile is never expanded to float in memory.
    """
    o, m, denom = carry
    s = dot_nt(q, k.astype(q.dtype))
    if k_scale is not None:
        s = s * k_scale
    s = s * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = (key_pos <= row_pos) & row_live
    if sliding_window is not None:
        mask &= key_pos > row_pos - sliding_window
    s = jnp.where(mask, s, MASKED)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    denom = denom * correction + jnp.sum(p, axis=1, keepdims=True)
    if v_scale is not None:
        p = p * v_scale
    o = o * correction + dot_nn(p.astype(q.dtype), v.astype(q.dtype))
    return o, m_next, denom


def init_carry(rows: int, head_dim: int):
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows, 1), M_INIT, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )


def normalize(o, denom):
    """Final flash division; rows that saw no key (padding) come out as exact zeros."""
    seen = denom > 0
    return jnp.where(seen, o / jnp.where(seen, denom, 1.0), 0.0)


def kv_range(first_pos, count, kv_len, sliding_window):
    """Key positions [lo, hi) a tile of `count` tokens starting at `first_pos` can see."""
    hi = jnp.where(count > 0, jnp.minimum(kv_len, first_pos + count), 0)
    lo = 0 if sliding_window is None else jnp.maximum(0, first_pos - sliding_window + 1)
    return lo, hi


def split_blocks(lo, hi, block_keys: int, split, num_splits: int):
    """K/V tiles [start, stop) that partition `split` of `num_splits` walks for keys [lo, hi).

    Each partition gets an equal share of the tiles this query tile actually needs (so a short
    sequence's spare partitions are empty and exit at once); with one split, all of them."""
    blk_lo, blk_hi = lax.div(lo, block_keys), cdiv(hi, block_keys)
    if num_splits == 1:
        return blk_lo, blk_hi
    per_split = cdiv(jnp.maximum(blk_hi - blk_lo, 0), num_splits)
    start = blk_lo + split * per_split
    return start, jnp.minimum(start + per_split, blk_hi)


def log_sum_exp(m, denom):
    """A partition's log-sum-exp from its running max and denominator; -inf if it saw no key."""
    return jnp.where(denom > 0, m + jnp.log(jnp.maximum(denom, 1e-30)), -jnp.inf)


def combine_splits(out_parts, lse_parts):
    """Merge split-K partitions: `[P, ..., D]` normalized partial outputs and `[P, ..., 1]`
    log-sum-exps -> `[..., D]`:  out = sum_p exp(lse_p - lse) * out_p,  lse = logsumexp_p lse_p.
    Rows no partition saw (padding) come out as zeros."""
    lse_max = jnp.max(lse_parts, axis=0)
    safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lse_parts - safe_max)  # exactly 0 for partitions that saw no key
    total = jnp.sum(weights, axis=0)
    out = jnp.sum(weights * out_parts, axis=0)
    return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
