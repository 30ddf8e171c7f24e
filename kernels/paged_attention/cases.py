"""Random paged-attention inputs for tests and benchmarks (host-side numpy, then device arrays).

A case is a list of `(q_len, kv_len)` per live sequence plus padding: the ragged token axis is
padded to `num_tokens`, the sequence axis to `max_seqs` (padded sequences have `q_len = 0`,
`kv_len = 0` and block tables of null pages), and the block-table width to `width` (extra
entries point at page 0, the null page). Live pages are drawn from a shuffled pool, so block
tables are non-contiguous and out of order; the null page and every unused page hold random
values too, so a kernel that reads an unowned page shows up as a wrong answer, not a lucky zero.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pijax.kernels.quantization import quantize


@dataclasses.dataclass(frozen=True)
class Case:
    q: jnp.ndarray  # [T, H, D]
    k_pages: jnp.ndarray  # [P, PS, K, D]
    v_pages: jnp.ndarray
    kv_lens: jnp.ndarray  # [S] int32
    block_tables: jnp.ndarray  # [S, W] int32
    cu_q_lens: jnp.ndarray  # [S + 1] int32
    num_seqs: jnp.ndarray  # [] int32
    k_scales: jnp.ndarray | None  # [P, PS, K] float32, quantized (int8 / fp8) pools only
    v_scales: jnp.ndarray | None
    seqs: tuple[tuple[int, int], ...]  # the live (q_len, kv_len) pairs

    def args(self):
        return (
            self.q,
            self.k_pages,
            self.v_pages,
            self.kv_lens,
            self.block_tables,
            self.cu_q_lens,
            self.num_seqs,
        )

    def scale_kwargs(self):
        return dict(k_scales=self.k_scales, v_scales=self.v_scales)


def make_case(
    seqs,
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    dtype=jnp.float32,
    quantized: bool = False,
    quant_dtype=jnp.int8,
    num_tokens: int | None = None,
    max_seqs: int | None = None,
    width: int | None = None,
    num_pages: int | None = None,
    seed: int = 0,
) -> Case:
    rng = np.random.default_rng(seed)
    seqs = tuple((int(a), int(b)) for a, b in seqs)
    for q_len, kv_len in seqs:
        if not 0 < q_len <= kv_len:
            raise ValueError(f"need 0 < q_len <= kv_len; got {(q_len, kv_len)}")
    pages_needed = [-(-kv // page_size) for _, kv in seqs]
    total_q = sum(q for q, _ in seqs)
    num_tokens = num_tokens or total_q
    max_seqs = max_seqs or len(seqs)
    width = width or max(pages_needed)
    num_pages = num_pages or (1 + sum(pages_needed) + 3)  # a few pages nobody owns
    if num_tokens < total_q or max_seqs < len(seqs) or width < max(pages_needed):
        raise ValueError("num_tokens, max_seqs and width must cover the live sequences")
    if num_pages < 1 + sum(pages_needed):
        raise ValueError(f"num_pages={num_pages} cannot hold {sum(pages_needed)} pages + null")

    free = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((max_seqs, width), np.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        block_tables[s, :n] = free[used : used + n]
        used += n
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[: len(seqs)] = [kv for _, kv in seqs]
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : len(seqs) + 1] = np.cumsum([q for q, _ in seqs])
    cu[len(seqs) + 1 :] = total_q

    num_heads = num_kv_heads * group
    q = rng.standard_normal((num_tokens, num_heads, head_dim), np.float32)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    k_scales = v_scales = None
    if quantized:
        k, k_scales = quantize(jnp.asarray(k), quant_dtype)
        v, v_scales = quantize(jnp.asarray(v), quant_dtype)
    else:
        k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    return Case(
        q=jnp.asarray(q, dtype),
        k_pages=k,
        v_pages=v,
        kv_lens=jnp.asarray(kv_lens),
        block_tables=jnp.asarray(block_tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray(len(seqs), jnp.int32),
        k_scales=k_scales,
        v_scales=v_scales,
        seqs=seqs,
    )


def dense_attention_numpy(case: Case, *, sm_scale: float, soft_cap=None, sliding_window=None):
    """Naive float64 attention, one sequence at a time, straight from the case's definition."""
    q = np.asarray(case.q, np.float64)
    k_pages = np.asarray(case.k_pages.astype(jnp.float32), np.float64)
    v_pages = np.asarray(case.v_pages.astype(jnp.float32), np.float64)
    if case.k_scales is not None:
        k_pages = k_pages * np.asarray(case.k_scales, np.float64)[..., None]
        v_pages = v_pages * np.asarray(case.v_scales, np.float64)[..., None]
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // num_kv_heads
    bt = np.asarray(case.block_tables)
    cu = np.asarray(case.cu_q_lens)
    out = np.zeros_like(q)
    for s, (q_len, kv_len) in enumerate(case.seqs):
        pos = np.arange(kv_len)
        pages = bt[s, pos // page_size]
        k = np.repeat(k_pages[pages, pos % page_size], group, axis=1)  # [L, H, D]
        v = np.repeat(v_pages[pages, pos % page_size], group, axis=1)
        qs = q[cu[s] : cu[s] + q_len]  # [Q, H, D]
        logits = np.einsum("qhd,lhd->hql", qs, k) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * np.tanh(logits / soft_cap)
        q_pos = kv_len - q_len + np.arange(q_len)
        mask = pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= pos[None, :] > q_pos[:, None] - sliding_window
        logits = np.where(mask[None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[cu[s] : cu[s] + q_len] = np.einsum("hql,lhd->qhd", p, v)
    return out


def mixed_seqs(page_size: int, max_pages: int = 4):
    """Decode and prefill rows at the edges that break paged kernels.

    Context lengths 1, exactly a page, one past a page, and the block-table maximum; a full-page
    prefill, a chunked prefill that starts mid-page, and prefill + decode at the maximum.
    """
    max_len = max_pages * page_size
    return [
        (1, 1),
        (1, page_size),
        (1, page_size + 1),
        (page_size, page_size),
        (5, 2 * page_size + 3),
        (1, max_len),
        (3, max_len),
    ]


def padded_tokens(seqs, multiple: int = 32) -> int:
    """Token-axis bucket with at least one padded row (the reference chunks by 32 tokens)."""
    total = sum(q for q, _ in seqs) + 1
    return multiple * -(-total // multiple)
