"""Benchmark paged-attention kernels over a shape grid; writes JSON + Markdown.

    python scripts/bench_kernels.py                       # small grid (CPU: reference + interpret)
    python scripts/bench_kernels.py --grid=full           # accelerator grid

What runs, per backend, side by side in one process:
  cpu: the pure-JAX reference and the Pallas kernels in interpret mode, small sizes only. These
       are NOT performance figures (interpret mode emulates the kernel step by step); they show
       the harness works and give a relative sanity check.
  gpu: reference, our Triton ragged kernel, our split-K decode kernel (decode shapes), and JAX's
       bundled `jax.experimental.pallas.ops.gpu.paged_attention` (decode shapes; head-major
       pool built once outside the timed region).
  tpu: reference, our Mosaic kernel, and the bundled `ops.tpu.paged_attention` (decode shapes).
Every run also measures device copy bandwidth (read + write of a large array) and reports each
kernel's KV bytes read per second as a fraction of it: the roofline for a bandwidth-bound decode.
It also times the KV write (the XLA scatter the engine uses). A fused write-in-attention kernel
is not implemented; on a GPU the comparison to make is step time of (scatter + attention) vs one
kernel that writes the new rows and attends, at decode shapes where the scatter is a separate
launch.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from pijax.kernels.paged_attention import decode, ragged, reference
from pijax.kernels.paged_attention.cases import make_case

FLAGS = flags.DEFINE_enum("grid", "small", ["small", "full"], "shape grid to run")
ITERS = flags.DEFINE_integer("iters", 5, "timed iterations per measurement (median reported)")
OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "where JSON/Markdown go")
SEED = flags.DEFINE_integer("seed", 0, "seed for lengths and values")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    num_decode: int  # sequences with one new token
    prefill: int  # tokens of one prefill chunk (0: pure decode)
    context: int  # mean context length (log-normal spread, like claim lengths)
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    dtype: str  # bfloat16 | float32 | int8 (int8 pages, bf16 queries)


def grid(kind: str) -> list[Shape]:
    if kind == "small":  # CPU-sized: interpret mode copies whole inputs per grid step
        return [Shape("decode-tiny", 4, 0, 48, 2, 4, 64, 16, "float32"),
                Shape("mixed-tiny", 3, 24, 40, 2, 4, 64, 16, "float32"),
                Shape("decode-tiny-int8", 4, 0, 48, 2, 4, 64, 16, "int8")]
    shapes = []
    for batch in (1, 8, 32, 128):
        for context in (512, 2048, 8192, 32768):
            for group in (1, 4, 8):
                for dtype in ("bfloat16", "int8"):
                    shapes.append(Shape(f"decode-b{batch}-c{context}-g{group}-{dtype}", batch, 0,
                                        context, 8, group, 128, 16, dtype))
    for batch, chunk in ((8, 512), (32, 2048)):
        shapes.append(Shape(f"mixed-b{batch}-p{chunk}", batch, chunk, 4096, 8, 4, 128, 16,
                            "bfloat16"))
    return shapes


def build(shape: Shape, seed: int):
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(shape.context), 0.6, shape.num_decode), 1,
                   4 * shape.context).astype(int)
    seqs = [(1, int(n)) for n in lens]
    if shape.prefill:
        seqs.append((shape.prefill, shape.prefill + shape.context // 2))
    num_tokens = sum(q for q, _ in seqs)
    num_tokens = 32 * -(-num_tokens // 32) if num_tokens > 32 else num_tokens
    dtype = jnp.float32 if shape.dtype == "float32" else jnp.bfloat16
    # Table width a multiple of 8 pages: the bundled GPU op tiles the table by 8 pages.
    width = 8 * -(-max(-(-kv // shape.page_size) for _, kv in seqs) // 8)
    case = make_case(seqs, num_kv_heads=shape.num_kv_heads, group=shape.group,
                     head_dim=shape.head_dim, page_size=shape.page_size, dtype=dtype,
                     quantized=shape.dtype == "int8", num_tokens=num_tokens, width=width,
                     seed=seed)
    if shape.dtype == "int8":
        case = dataclasses.replace(case, q=case.q.astype(jnp.bfloat16))
    return case


def timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a read+write pass over a large array, on the default device."""
    n = (1 << 30 if jax.default_backend() != "cpu" else 1 << 26) // 4
    x = jnp.ones((n,), jnp.float32)
    seconds = timed(jax.jit(lambda a: a + 1.0), x, iters=iters)
    return 2 * x.nbytes / seconds


def kv_bytes(case) -> int:
    per_token = case.k_pages.shape[2] * case.k_pages.shape[3] * case.k_pages.dtype.itemsize * 2
    scale = 8 * case.k_pages.shape[2] if case.k_scales is not None else 0
    return sum(kv for _, kv in case.seqs) * (per_token + scale)


def candidates(shape: Shape, case, backend: str):
    kw = dict(sm_scale=shape.head_dim**-0.5, **case.scale_kwargs())
    out = {"reference": functools.partial(jax.jit(
        reference.ragged_paged_attention_reference, static_argnames=("sm_scale",)), **kw)}
    decode_only = shape.prefill == 0
    if backend == "cpu":
        out["ragged (interpret)"] = functools.partial(ragged.ragged_paged_attention, **kw,
                                                      interpret=True)
        if decode_only:
            out["decode split-K (interpret)"] = functools.partial(
                decode.paged_decode_attention, **kw, interpret=True)
    elif backend == "tpu":
        from pijax.kernels.paged_attention import tpu

        out["ragged (mosaic)"] = functools.partial(tpu.ragged_paged_attention_tpu, **kw)
    else:
        out["ragged (triton)"] = functools.partial(ragged.ragged_paged_attention, **kw)
        if decode_only:
            out["decode split-K (triton)"] = functools.partial(decode.paged_decode_attention,
                                                               **kw)
    if decode_only and backend in ("gpu", "tpu") and case.k_scales is None:
        out["jax bundled paged_attention"] = bundled_op(case, backend)
    return out


def bundled_op(case, backend: str):
    """JAX's own paged decode op over a head-major copy of the pool (copy made once, untimed)."""
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu import paged_attention as op
        extra = dict(k_splits=1)
    else:
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as op
        extra = dict(pages_per_compute_block=4)
    k_hm = jnp.transpose(case.k_pages, (2, 0, 1, 3))
    v_hm = jnp.transpose(case.v_pages, (2, 0, 1, 3))
    live = len(case.seqs)
    q = case.q[:live]
    lengths = case.kv_lens[:live]
    tables = case.block_tables[:live]
    fn = jax.jit(functools.partial(op.paged_attention, **extra))
    return lambda *_: fn(q, k_hm, v_hm, tables, lengths) if backend == "gpu" else fn(
        q, k_hm, v_hm, lengths, tables)


def write_kv_time(case, iters: int) -> float:
    rows = case.q.shape[0]
    k_new = jnp.ones((rows, *case.k_pages.shape[2:]), jnp.float32)
    slots = jnp.arange(rows, dtype=jnp.int32) + case.k_pages.shape[1]
    fn = jax.jit(lambda kp, vp, ks, vs: reference.write_kv_reference(kp, vp, k_new, k_new, slots,
                                                                      ks, vs))
    return timed(fn, case.k_pages, case.v_pages, case.k_scales, case.v_scales, iters=iters)


def main(argv):
    del argv
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    on_cpu = backend == "cpu"
    bandwidth = copy_bandwidth(ITERS.value)
    rows = []
    for shape in grid(FLAGS.value):
        case = build(shape, SEED.value)
        nbytes = kv_bytes(case)
        for name, fn in candidates(shape, case, backend).items():
            seconds = timed(fn, *case.args(), iters=ITERS.value)
            rows.append(dict(shape=shape.name, impl=name, seconds=seconds, kv_bytes=nbytes,
                             kv_gbps=nbytes / seconds / 1e9,
                             fraction_of_copy_bw=nbytes / seconds / bandwidth))
        rows.append(dict(shape=shape.name, impl="write_kv (xla scatter)",
                         seconds=write_kv_time(case, ITERS.value), kv_bytes=None, kv_gbps=None,
                         fraction_of_copy_bw=None))
        print(f"{shape.name}: done", flush=True)

    device = jax.devices()[0]
    meta = dict(backend=backend, device=getattr(device, "device_kind", str(device)),
                jax=jax.__version__, host=platform.node(), grid=FLAGS.value,
                copy_bandwidth_gbps=bandwidth / 1e9, iters=ITERS.value,
                when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                note=("CPU run: reference and Pallas interpret mode at toy sizes. NOT a "
                      "performance figure." if on_cpu else "accelerator run"))
    out_dir = pathlib.Path(OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{backend}-{FLAGS.value}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Paged-attention kernels: {meta['device']} ({backend})", "",
             f"**{meta['note']}**", "",
             f"jax {meta['jax']}, grid `{meta['grid']}`, median of {meta['iters']}, "
             f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s (same run), {meta['when']}",
             "", "| shape | impl | ms | KV GB/s | of copy BW |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        gbps = "" if r["kv_gbps"] is None else f"{r['kv_gbps']:.2f}"
        frac = "" if r["fraction_of_copy_bw"] is None else f"{r['fraction_of_copy_bw']:.1%}"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | {gbps} | {frac} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    app.run(main)
