"""Benchmark the paged-attention kernels against the roofline and against JAX's bundled op.

    python scripts/bench_kernels.py                     # small grid (CPU: not a performance figure)
    python scripts/bench_kernels.py --grid=full         # the issue's grid, on a GPU or TPU
    python scripts/bench_kernels.py --grid=quick        # the goal shapes only (device_check.py)

The full grid: decode at batch {1, 8, 64, 256} x context {512, 2k, 8k, 32k} (plus batch 64 x 4k,
the shape the H100 goal names) with a Llama-3-8B attention shape (32 query heads, 8 kv heads,
head dim 128, 16-token pages), for bf16 and int8 pages (and fp8 e4m3 where the device has it);
and mixed ragged batches (decodes of log-normal context beside prefill chunks). Every sequence
of a decode shape has exactly `context` tokens; pages are drawn from a shuffled pool, so block
tables are non-contiguous. Token and sequence axes are padded the way the engine pads them.

Per shape, side by side in one process (all outputs checked against the reference, or against
our ragged kernel where the reference would not fit in memory):
  reference          the pure-JAX reference (the CPU engine path)
  ragged             our ragged kernel as the engine calls it (split-K chosen from grid size)
  decode split-K     our dedicated decode kernel (decode shapes)
  prefill+decode     mixed shapes only: the same batch as two calls, the decode kernel over the
                     decode rows and the ragged kernel over the prefill chunks
  jax bundled        `jax.experimental.pallas.ops.gpu.paged_attention` on GPU (bf16 and int8,
                     k_splits 1 and 16), `ops.tpu.paged_attention` on TPU (bf16): decode shapes,
                     over a head-major copy of the pool made outside the timed region
  write_kv           the KV write the engine uses (XLA scatter of the step's new rows)
Bytes moved = the KV each sequence owns (plus its scales) + queries read once + output written
once: the floor for a bandwidth-bound kernel. Achieved bandwidth is bytes / time; it is compared
with a read+write copy measured on the same device in the same run.

On CPU the small grid runs the Pallas kernels in interpret mode (the GPU-style kernels and the
bundled GPU op). Interpret mode emulates a kernel grid step by step on the host: those times are
NOT performance figures, they only show that the harness and every candidate run and agree.

A KV write fused into the attention kernel is not implemented; `write_kv` rows give the separate
scatter's cost, to weigh against the attention time of the same step.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from pijax.kernels import dispatch, quantization
from pijax.kernels.paged_attention import decode, ragged, reference
from pijax.kernels.paged_attention.cases import Case

GRID = flags.DEFINE_enum("grid", "small", ["small", "quick", "full"], "shape grid to run")
ITERS = flags.DEFINE_integer("iters", 10, "timed iterations per measurement (median reported)")
OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "where JSON and Markdown go")
SEED = flags.DEFINE_integer("seed", 0, "seed for lengths, page order and values")
ONLY = flags.DEFINE_string("only", "", "run only shapes whose name contains this")
MAX_REFERENCE_GB = flags.DEFINE_float(
    "max_reference_gb", 4.0, "skip the reference where its gather would exceed this"
)

NOT_A_FIGURE = (
    "CPU run: the reference and the Pallas kernels in interpret mode at toy sizes. "
    "NOT a performance figure."
)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    decodes: int  # sequences with one new token
    context: int  # tokens of context per decode (mixed shapes: log-normal around it)
    prefills: tuple[tuple[int, int], ...]  # (chunk tokens, context after the chunk)
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    kv_dtype: str  # float32 | bfloat16 | int8 | fp8_e4m3
    spread: bool = False  # log-normal decode contexts (claims of very mixed length)

    @property
    def q_dtype(self):
        return jnp.float32 if self.kv_dtype == "float32" else jnp.bfloat16

    @property
    def is_decode(self) -> bool:
        return not self.prefills


def kv_dtypes(backend: str) -> list[str]:
    if backend == "cpu":
        return ["float32", "int8"] + ["fp8_e4m3"] * _has_fp8(backend)
    return ["bfloat16", "int8"] + ["fp8_e4m3"] * _has_fp8(backend)


def _has_fp8(backend: str) -> bool:
    supports = getattr(quantization, "supports_fp8", None)
    return bool(supports and supports(backend))


def grid(kind: str, backend: str) -> list[Shape]:
    shapes = []
    if kind == "small":  # interpret mode copies whole inputs per grid step: toy sizes only
        for kv in kv_dtypes(backend):
            for batch, context in ((1, 100), (4, 40)):
                shapes.append(
                    Shape(f"decode-b{batch}-c{context}-{kv}", batch, context, (), 2, 4, 64, 16, kv)
                )
            shapes.append(
                Shape(f"mixed-b3-c40-p24-{kv}", 3, 40, ((24, 24),), 2, 4, 64, 16, kv, spread=True)
            )
        return shapes
    llama3_8b = dict(num_kv_heads=8, group=4, head_dim=128, page_size=16)
    if kind == "quick":  # the goal shapes: b64 x 4k decode per page dtype, one mixed batch
        for kv in kv_dtypes(backend):
            shapes.append(Shape(f"decode-b64-c4096-{kv}", 64, 4096, (), kv_dtype=kv, **llama3_8b))
        shapes.append(
            Shape(
                "mixed-b64-c4k-p2x512-bfloat16",
                64,
                4096,
                ((512, 512), (512, 2560)),
                kv_dtype="bfloat16",
                spread=True,
                **llama3_8b,
            )
        )
        return shapes
    for kv in kv_dtypes(backend):
        points = [(b, c) for b in (1, 8, 64, 256) for c in (512, 2048, 8192, 32768)]
        for batch, context in sorted(points + [(64, 4096)]):
            shapes.append(
                Shape(
                    f"decode-b{batch}-c{context}-{kv}", batch, context, (), kv_dtype=kv, **llama3_8b
                )
            )
        # A step of the engine under load: decodes of mixed length beside prefill chunks, one
        # starting a claim, one continuing a long one.
        shapes.append(
            Shape(
                f"mixed-b64-c4k-p2x512-{kv}",
                64,
                4096,
                ((512, 512), (512, 2560)),
                kv_dtype=kv,
                spread=True,
                **llama3_8b,
            )
        )
        shapes.append(
            Shape(
                f"mixed-b8-c8k-p2048-{kv}",
                8,
                8192,
                ((2048, 6144),),
                kv_dtype=kv,
                spread=True,
                **llama3_8b,
            )
        )
    return shapes


# ---------------------------------------------------------------------------- inputs on device


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def _random_pool(key, num_pages: int, shape: Shape):
    """Pages (and scales) generated on device chunk by chunk, so a 30 GB pool needs no host copy
    and no full-size float32 temporary."""
    chunk = min(num_pages, 2048)
    n = -(-num_pages // chunk)

    def one(k):
        x = jax.random.normal(
            k, (chunk, shape.page_size, shape.num_kv_heads, shape.head_dim), jnp.float32
        )
        if shape.kv_dtype == "int8":
            return quantization.quantize_int8(x)
        if shape.kv_dtype == "fp8_e4m3":
            return quantization.quantize_fp8(x)
        return x.astype(shape.kv_dtype), jnp.zeros((), jnp.float32)

    pages, scales = jax.jit(lambda keys: lax.map(one, keys))(jax.random.split(key, n))
    pages = pages.reshape(n * chunk, *pages.shape[2:])
    quantized = shape.kv_dtype in ("int8", "fp8_e4m3")
    return pages, (scales.reshape(n * chunk, *scales.shape[2:]) if quantized else None)


def build(shape: Shape, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    if shape.spread:
        ctx = np.clip(
            rng.lognormal(np.log(shape.context), 0.6, shape.decodes), 1, 4 * shape.context
        ).astype(int)
    else:
        ctx = np.full(shape.decodes, shape.context)
    seqs = [(1, int(c)) for c in ctx] + [tuple(p) for p in shape.prefills]  # decodes first
    pages_needed = [-(-kv // shape.page_size) for _, kv in seqs]
    width = _pow2(max(pages_needed), 4)  # the engine's block-table bucket
    num_tokens = _pow2(sum(q for q, _ in seqs), 16)  # the engine's token bucket
    max_seqs = _pow2(len(seqs), 4)
    num_pages = 1 + sum(pages_needed)

    key_k, key_v, key_q = jax.random.split(jax.random.key(seed), 3)
    k_pages, k_scales = _random_pool(key_k, num_pages, shape)
    v_pages, v_scales = _random_pool(key_v, num_pages, shape)
    num_heads = shape.num_kv_heads * shape.group
    q = jax.random.normal(key_q, (num_tokens, num_heads, shape.head_dim), shape.q_dtype)

    free = rng.permutation(np.arange(1, num_pages, dtype=np.int32))
    block_tables = np.zeros((max_seqs, width), np.int32)
    ends = np.cumsum(pages_needed)
    for s, (n, end) in enumerate(zip(pages_needed, ends, strict=True)):
        block_tables[s, :n] = free[end - n : end]
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[: len(seqs)] = [kv for _, kv in seqs]
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : len(seqs) + 1] = np.cumsum([ql for ql, _ in seqs])
    cu[len(seqs) + 1 :] = cu[len(seqs)]
    return Case(
        q=q,
        k_pages=k_pages,
        v_pages=v_pages,
        kv_lens=jnp.asarray(kv_lens),
        block_tables=jnp.asarray(block_tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray(len(seqs), jnp.int32),
        k_scales=k_scales,
        v_scales=v_scales,
        seqs=tuple(seqs),
    )


def bytes_moved(case: Case) -> int:
    """KV owned by the batch's sequences (+ scales), queries read once, output written once."""
    _, _, num_kv_heads, head_dim = case.k_pages.shape
    per_token = 2 * num_kv_heads * head_dim * case.k_pages.dtype.itemsize
    if case.k_scales is not None:
        per_token += 2 * num_kv_heads * case.k_scales.dtype.itemsize
    live_rows = sum(q for q, _ in case.seqs)
    q_bytes = live_rows * case.q.shape[1] * head_dim * case.q.dtype.itemsize
    return sum(kv for _, kv in case.seqs) * per_token + 2 * q_bytes


def reference_gb(case: Case) -> float:
    """Peak temporary of the reference: a 32-token chunk gathers its sequences' whole tables."""
    _, page_size, num_kv_heads, head_dim = case.k_pages.shape
    group = case.q.shape[1] // num_kv_heads
    keys = case.block_tables.shape[1] * page_size
    return 32 * keys * num_kv_heads * (2 * head_dim + group) * 4 / 1e9


# ---------------------------------------------------------------------------- candidates


def _sub_batch(case: Case, first: int, last: int):
    """Metadata of sequences [first, last) alone (their rows, lengths and tables)."""
    cu = np.asarray(case.cu_q_lens)
    lo, hi = int(cu[first]), int(cu[last])
    sub_cu = jnp.asarray(cu[first : last + 1] - lo)
    return (
        lo,
        hi,
        case.kv_lens[first:last],
        case.block_tables[first:last],
        sub_cu,
        jnp.asarray(last - first, jnp.int32),
    )


def candidates(shape: Shape, case: Case, backend: str, on_cpu: bool) -> dict:
    """name -> zero-argument function returning [T, H, D] attention output (bundled: [B, H, D])."""
    sm_scale = shape.head_dim**-0.5
    kw = dict(sm_scale=sm_scale, k_scales=case.k_scales, v_scales=case.v_scales)
    interpret = dict(interpret=True) if on_cpu else {}
    suffix = " (interpret)" if on_cpu else ""
    out = {}
    if reference_gb(case) <= MAX_REFERENCE_GB.value:
        ref = jax.jit(reference.ragged_paged_attention_reference, static_argnames="sm_scale")
        out["reference"] = lambda: ref(*case.args(), **kw)
    if backend == "tpu":
        from pijax.kernels.paged_attention import tpu

        out["ragged (mosaic)"] = lambda: tpu.ragged_paged_attention_tpu(*case.args(), **kw)
    else:
        out["ragged" + suffix] = lambda: ragged.ragged_paged_attention(
            *case.args(), **kw, **interpret
        )
        mosaic = _mosaic_gpu(case, on_cpu)
        if mosaic is not None:
            out["ragged mosaic-gpu" + suffix] = lambda: mosaic(*case.args(), **kw)
        if shape.is_decode:
            out["decode split-K" + suffix] = lambda: decode.paged_decode_attention(
                *case.args(), **kw, **interpret
            )
        else:
            out["prefill+decode as 2 calls" + suffix] = _two_calls(shape, case, kw, interpret)
    return out


def _mosaic_gpu(case: Case, on_cpu: bool):
    """The Mosaic GPU kernel where it can run this case (Hopper + JAX with Mosaic GPU; on CPU
    its interpreter when the installed JAX has one), else None."""
    from pijax.kernels import support
    from pijax.kernels.support import AttentionShape, Kernel

    try:
        from pijax.kernels.paged_attention import mosaic_gpu
    except ImportError:
        return None
    shape = AttentionShape.of(case.q, case.k_pages)
    if support.why_not(Kernel.MOSAIC_GPU_RAGGED, shape) is not None:
        return None
    if on_cpu:
        return mosaic_gpu.interpret_fn() if mosaic_gpu.interpreter_available() else None
    cap = support.gpu_capability()
    if not mosaic_gpu.available() or cap is None or cap < (9, 0):
        return None
    return mosaic_gpu.ragged_paged_attention_mgpu


def _two_calls(shape: Shape, case: Case, kw: dict, interpret: dict):
    pages = (case.k_pages, case.v_pages)
    d_lo, d_hi, *dmeta = _sub_batch(case, 0, shape.decodes)
    p_lo, p_hi, *pmeta = _sub_batch(case, shape.decodes, len(case.seqs))

    @jax.jit
    def both(q):
        dec = decode.paged_decode_attention(q[d_lo:d_hi], *pages, *dmeta, **kw, **interpret)
        pre = ragged.ragged_paged_attention(q[p_lo:p_hi], *pages, *pmeta, **kw, **interpret)
        return jnp.concatenate([dec, pre, jnp.zeros_like(q[p_hi:])])

    return lambda: both(case.q)


def bundled(shape: Shape, case: Case, backend: str, on_cpu: bool) -> dict:
    """JAX's own paged decode op over a head-major copy of the pool (made here, untimed)."""
    if not shape.is_decode:
        return {}
    pool_bytes = sum(x.nbytes for x in (case.k_pages, case.v_pages))
    if not _fits(pool_bytes):
        print(f"{shape.name}: no room for a head-major copy of the pool; bundled op skipped")
        return {}
    live = len(case.seqs)
    # The bundled ops take no softmax scale: queries come pre-scaled.
    q = (case.q[:live].astype(jnp.float32) * shape.head_dim**-0.5).astype(case.q.dtype)
    lengths, tables = case.kv_lens[:live], case.block_tables[:live]
    to_head_major = jax.jit(lambda x: jnp.moveaxis(x, 2, 0))
    k_hm, v_hm = to_head_major(case.k_pages), to_head_major(case.v_pages)
    out = {}
    if backend in ("gpu", "cpu"):
        from jax.experimental.pallas.ops.gpu import paged_attention as gpu_op

        scales = {}
        if case.k_scales is not None:
            if case.k_pages.dtype != jnp.int8:
                return {}  # the bundled GPU op knows int8 scales only
            scales = dict(
                k_scales_pages=to_head_major(case.k_scales),
                v_scales_pages=to_head_major(case.v_scales),
            )
        width = tables.shape[1]
        for k_splits in (1,) if on_cpu else (1, 16):
            if width % k_splits:
                continue
            fn = jax.jit(
                lambda q, k, v, t, n, ks=k_splits: gpu_op.paged_attention(
                    q, k, v, t, n, **scales, k_splits=ks, interpret=on_cpu
                )
            )
            name = f"jax bundled gpu op (k_splits={k_splits})" + (" (interpret)" * on_cpu)
            out[name] = lambda fn=fn: fn(q, k_hm, v_hm, tables, lengths)
    elif backend == "tpu" and case.k_scales is None:
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_op

        fn = jax.jit(lambda q, k, v, n, t: tpu_op(q, k, v, n, t, pages_per_compute_block=8))
        out["jax bundled tpu op"] = lambda: fn(q, k_hm, v_hm, lengths, tables)
    return out


def _fits(extra_bytes: int) -> bool:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats or "bytes_limit" not in stats:
        return True
    return stats.get("bytes_in_use", 0) + extra_bytes < 0.9 * stats["bytes_limit"]


# ---------------------------------------------------------------------------- measurement


def timed(fn, iters: int) -> tuple[float, jax.Array]:
    result = jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a read + write pass over a large array on the default device."""
    n = (1 << 30 if jax.default_backend() != "cpu" else 1 << 26) // 4
    x = jnp.ones((n,), jnp.float32)
    step = jax.jit(lambda a: a + 1.0)
    seconds, _ = timed(lambda: step(x), iters)
    return 2 * x.nbytes / seconds


def write_kv_seconds(case: Case, iters: int) -> tuple[float, int]:
    """The engine's KV write for this step (every new token's K/V into its slot): seconds, and
    bytes written (K and V rows of the step's tokens, padding included, plus their scales)."""
    rows, page_size = case.q.shape[0], case.k_pages.shape[1]
    new = jax.random.normal(jax.random.key(1), (rows, *case.k_pages.shape[2:]), case.q.dtype)
    bt, cu = np.asarray(case.block_tables), np.asarray(case.cu_q_lens)
    slots = np.zeros(rows, np.int32)  # padded rows write into the null page
    for s, (q_len, kv_len) in enumerate(case.seqs):
        pos = np.arange(kv_len - q_len, kv_len)
        slots[cu[s] : cu[s] + q_len] = bt[s, pos // page_size] * page_size + pos % page_size
    slots = jnp.asarray(slots)
    write = jax.jit(lambda kp, vp, ks, vs: dispatch.write_kv(kp, vp, new, new, slots, ks, vs))
    seconds, _ = timed(
        lambda: write(case.k_pages, case.v_pages, case.k_scales, case.v_scales), iters
    )
    written = 2 * rows * new[0].size * case.k_pages.dtype.itemsize
    if case.k_scales is not None:
        written += 2 * rows * case.k_pages.shape[2] * case.k_scales.dtype.itemsize
    return seconds, written


def rel_err(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (got, want))
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def run_shape(shape: Shape, backend: str, bandwidth: float, iters: int) -> list[dict]:
    on_cpu = backend == "cpu"
    case = build(shape, SEED.value)
    nbytes = bytes_moved(case)
    base = dict(
        shape=shape.name,
        kv_dtype=shape.kv_dtype,
        decodes=shape.decodes,
        context=shape.context,
        prefill_tokens=sum(q for q, _ in shape.prefills),
        bytes=nbytes,
    )
    rows, outputs = [], {}
    live = sum(q for q, _ in case.seqs)
    fns = candidates(shape, case, backend, on_cpu)
    for name, fn in fns.items():
        seconds, result = timed(fn, iters)
        outputs[name] = result
        rows.append(
            dict(
                base,
                impl=name,
                seconds=seconds,
                gbps=nbytes / seconds / 1e9,
                of_copy_bw=nbytes / seconds / bandwidth,
            )
        )
    truth_name = (
        "reference"
        if "reference" in outputs
        else next(n for n in outputs if n.startswith("ragged"))
    )
    truth = outputs[truth_name][:live]
    for row in rows:
        row["rel_err"] = rel_err(outputs[row["impl"]][:live], truth)
        row["checked_against"] = truth_name
    outputs.clear()
    for name, fn in bundled(shape, case, backend, on_cpu).items():
        seconds, result = timed(fn, iters)
        rows.append(
            dict(
                base,
                impl=name,
                seconds=seconds,
                gbps=nbytes / seconds / 1e9,
                of_copy_bw=nbytes / seconds / bandwidth,
                rel_err=rel_err(result, truth),
                checked_against=truth_name,
            )
        )
    seconds, written = write_kv_seconds(case, iters)
    rows.append(
        dict(
            base,
            impl="write_kv (xla scatter)",
            seconds=seconds,
            bytes=written,
            gbps=written / seconds / 1e9,
            of_copy_bw=written / seconds / bandwidth,
            rel_err=None,
            checked_against=None,
        )
    )
    return rows


# ---------------------------------------------------------------------------- report


def _best(rows, shape_name, prefixes):
    cands = [
        r
        for r in rows
        if r["shape"] == shape_name and any(r["impl"].startswith(p) for p in prefixes)
    ]
    return min(cands, key=lambda r: r["seconds"]) if cands else None


def goals(rows: list[dict]) -> list[str]:
    """The issue's H100 goals, evaluated on whatever this run measured."""
    ours = ("ragged", "decode split-K", "ragged mosaic-gpu")
    lines = []
    for r in rows:
        if r["shape"] == "decode-b64-c4096-bfloat16" and r["impl"].split(" (")[0] in ours:
            lines.append(
                f"b64 x 4k bf16, {r['impl']}: {r['of_copy_bw']:.0%} of copy bandwidth (goal >= 80%)"
            )
    for r in rows:
        if r["shape"].startswith("decode-") and r["shape"].endswith("-int8"):
            bf16_name = r["shape"][: -len("int8")] + "bfloat16"
            a, b = _best(rows, bf16_name, ours), _best(rows, r["shape"], ours)
            if a and b and r is b:
                lines.append(
                    f"{r['shape']}: int8 {a['seconds'] / b['seconds']:.2f}x faster "
                    f"than bf16 (goal >= 1.6x)"
                )
    for shape in sorted({r["shape"] for r in rows}):
        peer = _best(rows, shape, ("jax bundled",))
        mine = _best(rows, shape, ("decode split-K", "ragged"))
        if peer and mine:
            lines.append(
                f"{shape}: ours ({mine['impl']}) {peer['seconds'] / mine['seconds']:.2f}x "
                f"the speed of {peer['impl']} (goal >= 1.0x)"
            )
        two = _best(rows, shape, ("prefill+decode",))
        one = _best(rows, shape, ("ragged",))
        if two and one:
            lines.append(
                f"{shape}: one ragged launch {two['seconds'] / one['seconds']:.2f}x the "
                f"speed of two calls (goal > 1.0x)"
            )
    return lines


def write_report(meta: dict, rows: list[dict], out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{meta['backend']}-{meta['grid']}"
    goal_lines = goals(rows)
    stem.with_suffix(".json").write_text(
        json.dumps(dict(meta=meta, goals=goal_lines, rows=rows), indent=1)
    )

    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = [
        f"# Paged-attention kernels: {meta['device']} ({meta['backend']})",
        "",
        f"**{meta['note']}**",
        "",
        f"jax {meta['jax']}, grid `{meta['grid']}`, median of {meta['iters']}, read+write "
        f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s (same run), {meta['when']}.",
        "Bytes = owned KV (+ scales) + queries + output; GB/s = bytes / time. rel err is "
        "max |out - truth| / max |truth| against the column `vs`.",
        "",
        "| shape | impl | ms | MB moved | GB/s | of copy BW | rel err | vs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['impl']} | {r['seconds'] * 1e3:.3f} | "
            f"{r['bytes'] / 1e6:.2f} | {num(r['gbps'], '.2f')} | "
            f"{num(r['of_copy_bw'], '.1%')} | {num(r['rel_err'], '.1e')} | "
            f"{r['checked_against'] or ''} |"
        )
    lines += ["", "## Goals (from the issue, stated for an H100)", ""]
    if meta["backend"] == "cpu":
        lines.append("Not evaluated: interpret-mode times say nothing about kernel speed.")
    else:
        lines += [f"- {g}" for g in goal_lines] or ["- no goal shape in this grid"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def run_grid(kind: str, iters: int, out_dir, only: str = "", on_shape=None, deadline=None):
    """Measure every shape of grid `kind` (names containing `only`); write the report. Returns
    (meta, rows, report stem). `on_shape(name)` is called after each shape (progress); shapes
    not started by `deadline` (a `time.monotonic()` value) are listed in meta["not_reached"]."""
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    bandwidth = copy_bandwidth(iters)
    rows, not_reached = [], []
    for shape in grid(kind, backend):
        if only not in shape.name:
            continue
        if deadline is not None and time.monotonic() > deadline:
            not_reached.append(shape.name)
            continue
        rows += run_shape(shape, backend, bandwidth, iters)
        if on_shape:
            on_shape(shape.name)
    device = jax.devices()[0]
    meta = dict(
        backend=backend,
        device=getattr(device, "device_kind", str(device)),
        jax=jax.__version__,
        host=platform.node(),
        grid=kind,
        copy_bandwidth_gbps=bandwidth / 1e9,
        iters=iters,
        when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        note=NOT_A_FIGURE if backend == "cpu" else "accelerator run",
        not_reached=not_reached,
    )
    stem = write_report(meta, rows, pathlib.Path(out_dir))
    return meta, rows, stem


def main(argv):
    del argv
    _, _, stem = run_grid(
        GRID.value,
        ITERS.value,
        OUT_DIR.value,
        ONLY.value,
        on_shape=lambda name: print(f"{name}: done", flush=True),
    )
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    app.run(main)
