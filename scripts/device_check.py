"""One command that proves the accelerator path on a fresh GPU (or TPU) machine, in ~8 minutes.

    python scripts/device_check.py                 # on the GPU / TPU machine
    python scripts/device_check.py --dry_run       # on CPU: the whole plan, interpret/reference
                                                   # paths, toy sizes, under 5 minutes

Steps, each under its own time budget (a step that runs out records what it did not reach;
no step's failure stops the next one):

  a. correctness  every kernel the backend has (Triton ragged + decode on GPU, the Mosaic GPU
                  kernel on Hopper when JAX has it, the Mosaic TPU kernel on TPU) against the
                  pure-JAX reference over the support table's grid: every head dim, every GQA
                  ratio, page sizes 16/32, float / int8 / fp8 pages (rotated along the grid).
  b. kernels      `scripts/bench_kernels.py --grid=quick`: Llama-3-8B attention (32 q / 8 kv
                  heads, head dim 128), batch 64 x 4k context in bf16, int8 and fp8 pages, a
                  mixed ragged batch, copy bandwidth measured in the same run, JAX's bundled
                  paged-attention op as the peer (its functions, not a copy of them).
  c. generate     the README's first command, `python scripts/generate.py`.
  d. engine       `scripts/bench.py --preset=gpu-1b-quick --compare` (gpu-1b shortened to fit;
                  TPU too; the dry run: the smoke preset, no baselines, no probes).

Everything goes under one folder, `<out_root>/<date>-device-check-<device>[-dry-run]/`:
summary.md (the table printed last), device_check.json (every row), kernels-*.json/.md, the
logs of c and d, and d's results folder. Pack it with `tar` to bring it back from a lent
machine (benchmarks/README.md has the exact command line).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402  (a sibling script: its grid, timing and report functions)

from pijax.kernels import support  # noqa: E402
from pijax.kernels.paged_attention import decode, ragged, reference  # noqa: E402
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens  # noqa: E402
from pijax.kernels.quantization import dequantize, supports_fp8  # noqa: E402
from pijax.kernels.support import Kernel  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "CPU rehearsal: interpret/reference paths at toy sizes, smoke preset."
)
OUT_ROOT = flags.DEFINE_string("out_root", str(ROOT / "benchmarks" / "results"), "results root")
STEPS = flags.DEFINE_list(
    "steps",
    ["correctness", "kernels", "generate", "engine"],
    "steps to run, in order (also: tests, the kernel tests' fast lane on this machine)",
)
BUDGETS = flags.DEFINE_list(
    "budgets_s",
    ["90", "150", "90", "150", "300"],
    "seconds per step (correctness, kernels, generate, engine, tests); a step stops at its budget",
)
KERNEL_GRID = flags.DEFINE_enum(
    "kernel_grid",
    "quick",
    ["quick", "full"],
    "bench_kernels grid for step b (full: the issue's whole grid, for a longer TPU/GPU session)",
)
ENGINE_PRESET = flags.DEFINE_string(
    "engine_preset", None, "bench preset for step d (default gpu-1b-quick; dry run: smoke)"
)

RATIOS = (1, 2, 3, 4, 6, 8, 16)
PAGE_SIZES = (16, 32)
TOL = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2}  # rel err vs a float32 reference


# ---------------------------------------------------------------------------- a. correctness


@dataclasses.dataclass(frozen=True)
class Check:
    kernel: Kernel
    head_dim: int
    group: int
    page_size: int
    pages: str  # page dtype name
    q_dtype: str

    @property
    def name(self) -> str:
        return (
            f"{self.kernel.value} d{self.head_dim} g{self.group} ps{self.page_size} "
            f"{self.pages}/{self.q_dtype}"
        )


def backend_kernels(backend: str, dry_run: bool) -> dict[Kernel, str]:
    """Kernel -> how it runs here ("device", "interpret"), for every kernel this host can run."""
    from pijax.kernels.paged_attention import mosaic_gpu

    if backend == "tpu":
        return {Kernel.TPU_RAGGED: "device"}
    if backend == "gpu":
        out = {Kernel.TRITON_RAGGED: "device", Kernel.TRITON_DECODE: "device"}
        cap = support.gpu_capability()
        if mosaic_gpu.available() and cap is not None and cap >= (9, 0):
            out[Kernel.MOSAIC_GPU_RAGGED] = "device"
        return out
    out = {Kernel.TRITON_RAGGED: "interpret", Kernel.TRITON_DECODE: "interpret"}
    if mosaic_gpu.interpreter_available():
        out[Kernel.MOSAIC_GPU_RAGGED] = "interpret"
    return out


def check_grid(kernel: Kernel, backend: str, dry_run: bool) -> list[Check]:
    """Every head dim (ratio, page size and page dtype rotating along it), then every ratio at
    head dim 128; the dry run keeps one check per kernel."""
    table = support.SUPPORTED[kernel]
    pages = [p for p in ("bfloat16", "int8", "float8_e4m3fn") if p in table.kv_dtypes]
    if "float8_e4m3fn" in pages and not supports_fp8("cpu" if dry_run else backend):
        pages.remove("float8_e4m3fn")
    q_dtype = "float32" if dry_run and "float32" in table.q_dtypes else "bfloat16"
    ratios = [r for r in RATIOS if r <= table.max_group]
    sizes = [p for p in PAGE_SIZES if p in table.page_sizes]
    checks = []
    for i, head_dim in enumerate(table.head_dims):
        group, page_size, page = (
            ratios[i % len(ratios)],
            sizes[i % len(sizes)],
            pages[i % len(pages)],
        )
        checks.append(Check(kernel, head_dim, group, page_size, page, q_dtype))
    dim = 128 if 128 in table.head_dims else table.head_dims[-1]
    for i, group in enumerate(ratios):
        checks.append(Check(kernel, dim, group, sizes[-1 - i % len(sizes)], pages[-1], q_dtype))
    if dry_run:  # one check: a non-power-of-two head dim over quantized pages where listed
        odd = [c for c in checks if c.head_dim & (c.head_dim - 1) and c.pages != "bfloat16"]
        checks = (odd or checks)[:1]
    return checks


def check_case(check: Check, seed: int):
    decode_only = check.kernel is Kernel.TRITON_DECODE
    ps = check.page_size
    seqs = [(1, 1), (1, ps + 3), (1, 3 * ps)] if decode_only else mixed_seqs(ps, max_pages=3)
    quantized = check.pages in ("int8", "float8_e4m3fn")
    return make_case(
        seqs,
        num_kv_heads=2,
        group=check.group,
        head_dim=check.head_dim,
        page_size=ps,
        dtype=jnp.dtype(check.q_dtype) if check.pages != "float32" else jnp.float32,
        quantized=quantized,
        quant_dtype=jnp.dtype(check.pages) if quantized else jnp.int8,
        num_tokens=len(seqs) + 1 if decode_only else padded_tokens(seqs),
        max_seqs=len(seqs) + 1,
        seed=seed,
    )


def kernel_fn(kernel: Kernel, how: str):
    interpret = how == "interpret"
    if kernel is Kernel.TRITON_RAGGED:
        return lambda *a, **k: ragged.ragged_paged_attention(*a, **k, interpret=interpret)
    if kernel is Kernel.TRITON_DECODE:
        return lambda *a, **k: decode.paged_decode_attention(*a, **k, interpret=interpret)
    if kernel is Kernel.MOSAIC_GPU_RAGGED:
        from pijax.kernels.paged_attention import mosaic_gpu

        return mosaic_gpu.interpret_fn() if interpret else mosaic_gpu.ragged_paged_attention_mgpu
    from pijax.kernels.paged_attention import tpu

    return lambda *a, **k: tpu.ragged_paged_attention_tpu(*a, **k, interpret=interpret)


def run_check(check: Check, how: str, seed: int) -> dict:
    row = dict(check=check.name, kernel=check.kernel.value, how=how)
    start = time.perf_counter()
    try:
        case = check_case(check, seed)
        kw = dict(sm_scale=check.head_dim**-0.5)
        # A window on every other check, so the window masks run on the device too.
        if seed % 2:
            kw["sliding_window"] = 2 * check.page_size + 1
        out = kernel_fn(check.kernel, how)(*case.args(), **kw, **case.scale_kwargs())
        k, v = case.k_pages, case.v_pages
        if case.k_scales is not None:
            k, v = dequantize(k, case.k_scales), dequantize(v, case.v_scales)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        want = reference.ragged_paged_attention_reference(
            f32(case.q), f32(k), f32(v), *case.args()[3:], **kw
        )
        got, want = np.asarray(f32(out), np.float64), np.asarray(want, np.float64)
        live = int(case.cu_q_lens[case.num_seqs])
        err = float(np.max(np.abs(got[:live] - want[:live])) / np.max(np.abs(want[:live])))
        padded_zero = bool(np.all(got[live:] == 0))
        ok = np.isfinite(err) and err < TOL[check.q_dtype] and padded_zero
        row.update(rel_err=err, padded_rows_zero=padded_zero, ok=bool(ok))
    except Exception as exc:  # recorded, not raised: one failing shape must not hide the rest
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        row["traceback"] = traceback.format_exc(limit=6)[-2000:]
    row["seconds"] = time.perf_counter() - start
    return row


def step_correctness(ctx: dict, budget: float) -> dict:
    backend, dry_run = ctx["backend"], ctx["dry_run"]
    kernels = backend_kernels(backend, dry_run)
    rows, not_reached = [], []
    deadline = time.monotonic() + budget
    # Round-robin over kernels, so a budget cut leaves every kernel partly covered.
    grids = {k: check_grid(k, backend, dry_run) for k in kernels}
    order = [c for c in itertools.chain(*itertools.zip_longest(*grids.values())) if c]
    for seed, check in enumerate(order):
        if time.monotonic() > deadline:
            not_reached.append(check.name)
            continue
        row = run_check(check, kernels[check.kernel], seed)
        rows.append(row)
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['check']}", flush=True)
    missing = [k.value for k in Kernel if k not in kernels]
    passed = sum(r["ok"] for r in rows)
    return dict(
        ok=bool(rows) and passed == len(rows) and not not_reached,
        summary=f"{passed}/{len(rows)} checks pass"
        + (f", {len(not_reached)} not reached (budget)" if not_reached else "")
        + f"; kernels: {', '.join(f'{k.value} ({h})' for k, h in kernels.items())}"
        + (f"; not on this host: {', '.join(missing)}" if missing else ""),
        rows=rows,
        not_reached=not_reached,
    )


# ---------------------------------------------------------------------------- b. kernels


def step_kernels(ctx: dict, budget: float) -> dict:
    dry_run = ctx["dry_run"]
    kind, only = ("small", "decode-b4-c40-int8") if dry_run else (KERNEL_GRID.value, "")
    meta, rows, stem = bench_kernels.run_grid(
        kind,
        1 if dry_run else 10,
        ctx["out_dir"],
        only,
        on_shape=lambda name: print(f"  {name}: done", flush=True),
        deadline=time.monotonic() + budget,  # a shape already started runs to its end
    )
    goals = bench_kernels.goals(rows)
    errs = [r["rel_err"] for r in rows if r["rel_err"] is not None]
    ok = bool(rows) and all(e < 2e-2 for e in errs) and not meta["not_reached"]
    return dict(
        ok=ok,
        summary=f"{len({r['shape'] for r in rows})} shapes, {len(rows)} rows, max rel err "
        f"{max(errs, default=float('nan')):.1e}, copy BW {meta['copy_bandwidth_gbps']:.0f} GB/s"
        + ("" if dry_run else f"; {len(goals)} goal lines")
        + (f"; not reached (budget): {meta['not_reached']}" if meta["not_reached"] else ""),
        rows=rows,
        goals=goals,
        report=str(stem.with_suffix(".md").name),
    )


# ---------------------------------------------------------------------------- c, d. subprocesses


def _subprocess(name: str, argv: list[str], out_dir: pathlib.Path, budget: float) -> dict:
    log = out_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=budget,
        )
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        text = _text(exc.stdout) + _text(exc.stderr) + f"\n[device_check] timed out at {budget}s"
    log.write_text(text)
    return dict(rc=rc, seconds=time.perf_counter() - start, log=log.name, tail=text[-1500:])


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def step_generate(ctx: dict, budget: float) -> dict:
    argv = ["scripts/generate.py"] + (["--max_tokens=48"] if ctx["dry_run"] else [])
    res = _subprocess("generate", argv, ctx["out_dir"], budget)
    schema = "schema-valid: yes" in res["tail"]
    ok = res["rc"] == 0 and (schema or ctx["dry_run"])
    return dict(
        ok=ok,
        summary=f"rc {res['rc']}, {res['seconds']:.0f}s"
        + (", schema-valid findings" if schema else ", no schema-valid findings line"),
        **res,
    )


def step_engine(ctx: dict, budget: float) -> dict:
    preset = ENGINE_PRESET.value or ("smoke" if ctx["dry_run"] else "gpu-1b-quick")
    bench_dir = ctx["out_dir"] / f"engine-{preset}"
    argv = [
        "scripts/bench.py",
        f"--preset={preset}",
        "--hf=false",  # the transformers baseline needs torch on JAX's side of the machine
        "--progress=off",
        "--kv_cache_dtype=auto",
        "--compilation_cache_dir=",
        f"--out_dir={bench_dir}",
    ]
    # The dry run checks the plumbing on a shared CPU: no baselines, no probes (each baseline
    # is another engine warm-up; --compare with the smoke preset takes ~2 minutes there).
    argv += ["--probes=false"] if ctx["dry_run"] else ["--compare"]
    res = _subprocess("engine", argv, ctx["out_dir"], budget)
    results = bench_dir / "results.json"
    summary = f"rc {res['rc']}, {res['seconds']:.0f}s, preset {preset}"
    if results.exists():
        summary += f", results in {bench_dir.name}/"
    return dict(ok=res["rc"] == 0 and results.exists(), summary=summary, **res)


def step_tests(ctx: dict, budget: float) -> dict:
    """Optional (not in the default --steps): the kernel tests' fast lane on this machine."""
    argv = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "tests/kernels"]
    res = _subprocess("tests", argv, ctx["out_dir"], budget)
    last = res["tail"].strip().splitlines()[-1:] or [""]
    return dict(ok=res["rc"] == 0, summary=f"rc {res['rc']}: {last[0][:200]}", **res)


STEP_FNS = {
    "correctness": step_correctness,
    "kernels": step_kernels,
    "generate": step_generate,
    "engine": step_engine,
    "tests": step_tests,
}


# ---------------------------------------------------------------------------- main


def device_name(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    from pijax.bench.suite import device_slug

    return device_slug()


def summary_table(ctx: dict, results: dict) -> str:
    lines = [
        f"# Device check: {ctx['device_kind']} ({ctx['backend']}), jax {jax.__version__}"
        + (" - DRY RUN (CPU, interpret/reference paths, toy sizes)" if ctx["dry_run"] else ""),
        "",
        f"{ctx['when']}, {ctx['seconds']:.0f} s in all.",
        "",
        "| step | result | seconds | detail |",
        "| --- | --- | ---: | --- |",
    ]
    for name, res in results.items():
        verdict = "ok" if res.get("ok") else "FAIL"
        lines.append(f"| {name} | {verdict} | {res['seconds']:.0f} | {res['summary']} |")
    goals = results.get("kernels", {}).get("goals") or []
    if goals and not ctx["dry_run"]:
        lines += ["", "Kernel goals (bench_kernels.goals):", ""] + [f"- {g}" for g in goals]
    failed = [r for r in results.get("correctness", {}).get("rows", []) if not r["ok"]]
    if failed:
        lines += ["", "Failed checks:", ""]
        lines += [f"- {r['check']}: {r.get('error') or r.get('rel_err')}" for r in failed[:20]]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    start = time.perf_counter()
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    dry_run = DRY_RUN.value
    if backend != "cpu" and dry_run:
        raise app.UsageError("--dry_run is the CPU rehearsal; run without it on an accelerator")
    unknown = [s for s in STEPS.value if s not in STEP_FNS]
    if unknown or len(BUDGETS.value) != len(STEP_FNS):
        raise app.UsageError(
            f"--steps must be a subset of {list(STEP_FNS)} (got {unknown}); --budgets_s needs "
            f"{len(STEP_FNS)} values (got {len(BUDGETS.value)})"
        )
    budgets = dict(zip(STEP_FNS, (float(b) for b in BUDGETS.value), strict=True))
    date = datetime.date.today().isoformat()
    folder = f"{date}-device-check-{device_name(backend)}" + ("-dry-run" if dry_run else "")
    out_dir = pathlib.Path(OUT_ROOT.value) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    ctx = dict(
        backend=backend,
        dry_run=dry_run,
        out_dir=out_dir,
        device_kind=getattr(device, "device_kind", str(device)),
        capability=support.gpu_capability() if backend == "gpu" else None,
        when=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    results = {}
    for name in STEPS.value:
        print(f"[{name}] budget {budgets[name]:.0f}s", flush=True)
        t = time.perf_counter()
        try:
            res = STEP_FNS[name](ctx, budgets[name])
        except Exception as exc:  # a broken step is a result too; the next step still runs
            res = dict(ok=False, summary=f"{type(exc).__name__}: {str(exc)[:300]}")
            res["traceback"] = traceback.format_exc(limit=8)
        res["seconds"] = time.perf_counter() - t
        results[name] = res
        print(f"[{name}] {'ok' if res['ok'] else 'FAIL'}: {res['summary']}", flush=True)
    ctx["seconds"] = time.perf_counter() - start
    table = summary_table(ctx, results)
    (out_dir / "summary.md").write_text(table)
    meta = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in ctx.items()}
    (out_dir / "device_check.json").write_text(
        json.dumps(dict(meta=meta, results=results), indent=1, default=str)
    )
    print(f"\nresults: {out_dir}\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
