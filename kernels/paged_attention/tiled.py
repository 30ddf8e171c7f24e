"""Tiled paged attention in plain XLA: the CPU path, costing what the live tokens own.

Same contract as `reference.ragged_paged_attention_reference` (argument layout, padding rules,
zero output on padded rows). The reference gathers a sequence's whole block table, padded to the
step's width bucket, for every query row (padding rows included); on CPU that gather, not the
matmuls, is the step. This implementation gathers K/V once per (sequence, query tile):

- Sequences with one new token (decode) are compacted to the front and handled `DECODE_BATCH`
  at a time; each gathers its own pages once.
- Longer query runs (prefill, chunked prefill) are cut into tiles of `PREFILL_ROWS` consecutive
  tokens of one sequence (tiles never straddle sequences), `PREFILL_BATCH` tiles at a time; the
  tile's pages are gathered once and shared by all its rows and all query heads of a kv head.
- Both walk the context in chunks of `KV_CHUNK` tokens with an online softmax, and only over the
  chunks the batch's tiles can see: from the first position inside the sliding window to the
  tile's last (causal) position. Loop trip counts are data (`lax.while_loop`), so padding rows,
  padded sequences and padded block-table width gather and compute nothing, and a step's cost
  follows its live tokens, not its shape bucket.

Batching tiles amortizes the per-iteration cost of an XLA loop on CPU; the price is that a batch
walks the union of its tiles' chunk ranges (masked work for the shorter ones). Tiles of one
prefill are consecutive, so their ranges mostly coincide. These sizes are static and chosen for a
CPU (a few cores, caches of a few MiB); the Pallas kernels are the accelerator paths.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pijax.kernels.quantization import dequantize

PREFILL_ROWS = 32  # query tokens per prefill tile
PREFILL_BATCH = 2  # prefill tiles per loop iteration
DECODE_BATCH = 16  # decode sequences per loop iteration
KV_CHUNK = 256  # context tokens per inner-loop iteration (rounded to whole pages)

_M_INIT = -1e30  # running max starts finite so exp(-inf - m) is 0, never nan


def ragged_paged_attention_tiled(
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
    """Attention of each query token over its sequence's pages; see the module docstring."""
    num_tokens, num_heads, head_dim = q.shape
    max_seqs = kv_lens.shape[0]
    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0).astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    attend = _TileAttention(
        q, k_pages, v_pages, k_scales, v_scales, block_tables, sm_scale, soft_cap, sliding_window
    )
    # One spare row at the end takes the writes of dead tile rows (dropped afterwards).
    out = jnp.zeros((num_tokens + 1, num_heads, head_dim), jnp.float32)

    # Decode: the sequences with exactly one new token, compacted to the front.
    is_decode = q_lens == 1
    num_decode = jnp.sum(is_decode).astype(jnp.int32)
    (dec_seq,) = jnp.nonzero(is_decode, size=max_seqs, fill_value=0)
    dec_seq = dec_seq.astype(jnp.int32)
    dec_count = (jnp.arange(max_seqs) < num_decode).astype(jnp.int32)
    dec_tiles = (
        dec_seq,
        cu_q_lens[dec_seq],
        dec_count,
        kv_lens[dec_seq] - 1,
    )
    out = attend.run(out, dec_tiles, num_decode, rows=1, batch=min(DECODE_BATCH, max_seqs))

    # Prefill: runs of more than one token, cut into tiles of PREFILL_ROWS rows.
    rows = min(PREFILL_ROWS, num_tokens)
    pre_lens = jnp.where(is_decode, 0, q_lens)
    tiles_per_seq = (pre_lens + rows - 1) // rows
    ends = jnp.cumsum(tiles_per_seq).astype(jnp.int32)
    starts = ends - tiles_per_seq
    num_tiles = -(-num_tokens // rows) + max_seqs  # static bound: every seq adds <= 1 partial
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), max_seqs - 1).astype(jnp.int32)
    j = t - starts[seq]
    used = t < ends[-1]
    count = jnp.where(used, jnp.clip(pre_lens[seq] - j * rows, 0, rows), 0)
    pre_tiles = (
        seq,
        cu_q_lens[seq] + j * rows,
        count.astype(jnp.int32),
        kv_lens[seq] - pre_lens[seq] + j * rows,
    )
    out = attend.run(out, pre_tiles, ends[-1], rows=rows, batch=min(PREFILL_BATCH, num_tiles))
    return out[:num_tokens].astype(q.dtype)


class _TileAttention:
    """Runs batches of query tiles over their context chunks; holds the step's static pieces."""

    def __init__(self, q, k_pages, v_pages, k_scales, v_scales, block_tables, sm_scale, soft_cap,
                 sliding_window):  # fmt: skip
        self.q = q
        self.k_pages, self.v_pages = k_pages, v_pages
        self.k_scales, self.v_scales = k_scales, v_scales
        self.block_tables = block_tables
        self.sm_scale, self.soft_cap, self.window = sm_scale, soft_cap, sliding_window
        _, self.page_size, self.num_kv_heads, self.head_dim = k_pages.shape
        self.width = block_tables.shape[1]
        self.chunk_pages = max(1, min(KV_CHUNK // self.page_size, self.width))
        self.chunk = self.chunk_pages * self.page_size

    def run(self, out, tiles, num_tiles, *, rows: int, batch: int):
        """Attend `num_tiles` (traced) tiles, `batch` per iteration.

        `tiles` = (seq, first_token, count, first_pos), each [N]: tile i holds query rows
        `first_token[i] + r` for `r < count[i]`, at positions `first_pos[i] + r`. Tiles past
        `num_tiles` are never touched.
        """
        seq, first_token, count, first_pos = tiles
        n = seq.shape[0]
        pad = (-n) % batch  # so every batch's slice is in bounds
        if pad:
            seq, first_token, first_pos = (
                jnp.pad(a, (0, pad)) for a in (seq, first_token, first_pos)
            )
            count = jnp.pad(count, (0, pad))

        def body(carry):
            i, out = carry
            start = i * batch
            b_seq, b_tok, b_count, b_pos = (
                lax.dynamic_slice_in_dim(a, start, batch)
                for a in (seq, first_token, count, first_pos)
            )
            b_count = jnp.where(start + jnp.arange(batch) < num_tiles, b_count, 0)
            o = self._attend(b_seq, b_tok, b_count, b_pos, rows)
            r = jnp.arange(rows)
            dump = out.shape[0] - 1
            dst = jnp.where(r[None, :] < b_count[:, None], b_tok[:, None] + r[None, :], dump)
            out = out.at[dst.reshape(-1)].set(o.reshape(batch * rows, *o.shape[2:]))
            return i + 1, out

        num_batches = (num_tiles + batch - 1) // batch
        _, out = lax.while_loop(lambda c: c[0] < num_batches, body, (jnp.int32(0), out))
        return out

    def _attend(self, seq, first_token, count, first_pos, rows: int):
        """[B] tiles -> [B, rows, H, D] float32 (rows past `count` are garbage or zero).

        Layout: per (tile, kv head) a [rows * group, D] query block against [chunk, D] keys, so
        both products are plain batched matmuls over (tile, kv head).
        """
        batch = seq.shape[0]
        num_tokens, num_heads, head_dim = self.q.shape
        kv, group, c = self.num_kv_heads, num_heads // self.num_kv_heads, self.chunk
        qrows = rows * group
        r = jnp.arange(rows)
        tok = jnp.minimum(first_token[:, None] + r[None, :], num_tokens - 1)
        qt = self.q[tok].astype(jnp.float32) * self.sm_scale  # [B, R, H, D]
        qt = qt.reshape(batch, rows, kv, group, head_dim).transpose(0, 2, 1, 3, 4)
        qt = qt.reshape(batch, kv, qrows, head_dim)  # row = r * group + g
        q_pos = first_pos[:, None] + r[None, :]  # [B, R]
        row_live = r[None, :] < count[:, None]
        last = first_pos + jnp.maximum(count, 1) - 1  # last position each tile attends from
        lo_pos = jnp.zeros_like(first_pos)
        if self.window is not None:
            lo_pos = jnp.maximum(0, first_pos - self.window + 1)
        live = count > 0
        lo = jnp.min(jnp.where(live, lo_pos // c, jnp.iinfo(jnp.int32).max))
        hi = jnp.max(jnp.where(live, last // c + 1, 0))
        lo = jnp.minimum(lo, hi)

        def chunk_body(carry):
            ci, m, denom, acc = carry
            cols = jnp.minimum(ci * self.chunk_pages + jnp.arange(self.chunk_pages), self.width - 1)
            pages = self.block_tables[seq[:, None], cols[None, :]]  # [B, CP]
            k = self._load(self.k_pages, self.k_scales, pages, batch, c)  # [B, K, C, D]
            v = self._load(self.v_pages, self.v_scales, pages, batch, c)
            s = jnp.einsum("bkqd,bkcd->bkqc", qt, k)
            if self.soft_cap is not None:
                s = self.soft_cap * jnp.tanh(s / self.soft_cap)
            key_pos = ci * c + jnp.arange(c)
            mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & row_live[:, :, None]
            if self.window is not None:
                mask &= key_pos[None, None, :] > q_pos[:, :, None] - self.window
            mask = jnp.broadcast_to(mask[:, :, None, :], (batch, rows, group, c))
            s = jnp.where(mask.reshape(batch, 1, qrows, c), s, -jnp.inf)  # [B, K, RG, C]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            denom = alpha * denom + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("bkqc,bkcd->bkqd", p, v)
            return ci + 1, m_new, denom, acc

        shape = (batch, kv, qrows)
        init = (
            lo,
            jnp.full(shape, _M_INIT, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32),
        )
        _, _, denom, acc = lax.while_loop(lambda c_: c_[0] < hi, chunk_body, init)
        o = acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # rows that saw no key stay zero
        o = o.reshape(batch, kv, rows, group, head_dim).transpose(0, 2, 1, 3, 4)
        return o.reshape(batch, rows, num_heads, head_dim)

    def _load(self, pages, scales, idx, batch: int, c: int):
        """The chunk's K or V rows, [B, K, C, D] float32, dequantized."""
        x = dequantize(pages[idx], None if scales is None else scales[idx])
        return x.reshape(batch, c, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
