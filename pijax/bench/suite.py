"""One bench run: the full engine, its baselines and the probes, side by side in one process.

Configurations (all on the identical request list, the same weights and the same pool memory):

  paged               the engine as designed (paged KV, prefix reuse, chunked prefill)
  contiguous          each request reserves KV for prompt + max_tokens at admission
                      (`reserve_full_length`: the pre-paging design)
  no-prefix-reuse     `enable_prefix_reuse=False`
  no-chunked-prefill  `enable_chunked_prefill=False`; its token budget is raised to the preset's
                      `no_chunked_prefill_max_num_batched_tokens` (>= the longest prompt), else a
                      long prompt could never run
  hf-transformers     the same weights through transformers `generate` in padded batches
  paged-first-call    (with --compare) the full engine as a user's first `generate` sees it:
                      no warm-up, an empty compilation cache, every compilation inside the run;
                      it runs first, before anything else in the process compiles a step
  paged-kv-<dtype>    (with --kv_cache_dtype=auto,<dtype>) the full engine, that KV dtype
  paged-mesh-<D>x<M>  (with --mesh_shapes) the full engine on a (D, M) mesh, the model loaded
                      onto it, at the same per-device KV budget (`meshes.py`)

Every engine is warmed up (`Engine.warmup()`: every bucket shape) before it is measured, and the
run records how many compilations happened after that (it must be 0). Engines of one model and
one pool shape share compiled step functions, so a configuration whose buckets an earlier one
already compiled skips the warm-up (recorded as such).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import jax

from pijax.bench import hf as hf_baseline
from pijax.bench import meshes, probes
from pijax.bench.driver import ArrivalMode, ArrivalSpec
from pijax.bench.metrics import DEFINITIONS, ratio, summarize
from pijax.bench.presets import BenchPreset
from pijax.bench.runner import ProgressBar, RunResult, run_engine, show_progress
from pijax.config import engine_config_from_overrides
from pijax.engine import Engine
from pijax.kv_pool import bytes_per_token, pool_nbytes
from pijax.model.loader import load_model
from pijax.sharding import make_mesh
from pijax.workload import POLICY_ZONE, Workload, generate_workload

log = logging.getLogger(__name__)

PAGED = "paged"
CONTIGUOUS = "contiguous"
NO_REUSE = "no-prefix-reuse"
NO_CHUNK = "no-chunked-prefill"
HF = "hf-transformers"
FIRST_CALL = "paged-first-call"
ENGINE_BASELINES = (CONTIGUOUS, NO_REUSE, NO_CHUNK)


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    compare: bool = False  # run the baselines too (and the first-call run of the full engine)
    sweep: bool = False  # Poisson rate sweep of the full engine
    hf: bool = True  # include hf-transformers in --compare when transformers is installed
    probes: bool = True
    progress: bool | None = None  # None: only on a terminal, never under CI
    note: str = ""  # appended to the caveat written into the results (e.g. "machine shared")
    engine_overrides: dict = dataclasses.field(default_factory=dict)  # every configuration
    # Further KV cache dtypes for the full engine, each a configuration `paged-kv-<dtype>` at the
    # same byte budget: e.g. ("int8",) beside the default "auto".
    kv_cache_dtypes: tuple[str, ...] = ()
    # (data, model) meshes, each a configuration `paged-mesh-<D>x<M>` at the same per-device KV
    # budget: e.g. ((1, 1), (2, 1), (1, 2), (2, 2)).
    mesh_shapes: tuple[tuple[int, int], ...] = ()


KV_PREFIX = "paged-kv-"


def kv_config_name(kv_cache_dtype: str) -> str:
    return f"{KV_PREFIX}{kv_cache_dtype}"


def config_overrides(preset: BenchPreset, name: str, common: dict | None = None) -> dict:
    """Engine keyword overrides of configuration `name`: the preset's engine section, then the
    options common to every configuration, then what makes this configuration what it is."""
    if name.startswith(KV_PREFIX):
        extra = {"kv_cache_dtype": name[len(KV_PREFIX) :]}
    elif (shape := meshes.mesh_of(name)) is not None:
        extra = {"mesh_shape": shape}
    else:
        extra = {
            PAGED: {},
            CONTIGUOUS: {"reserve_full_length": True},
            NO_REUSE: {"enable_prefix_reuse": False},
            NO_CHUNK: {
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": preset.no_chunk_budget,
            },
        }[name]
    return {**preset.engine, **(common or {}), **extra}


def pool_info(engine: Engine) -> dict:
    """What the configuration's KV memory bought: the same bytes hold more tokens of a smaller
    cache dtype (scales included), and the same bytes per device more tokens on a larger mesh."""
    cache = engine.config.cache
    return {
        "mesh_shape": list(engine.config.mesh_shape),
        "capacity_tokens": engine.kv_capacity_tokens,
        "device_bytes": meshes.pool_device_bytes(engine.kv_pool),
        "kv_heads_on_mesh": engine.model.mesh_config.num_kv_heads,
        "kv_cache_dtype": cache.kv_cache_dtype.value,
        "budget_bytes": cache.kv_cache_memory_bytes,
        "pool_bytes": pool_nbytes(engine.kv_pool),
        "bytes_per_token": bytes_per_token(
            engine.model_config, cache.kv_cache_dtype, engine.config.dtype.jnp
        ),
        "num_pages": int(engine.kv_pool[0].k.shape[0]),  # every shard's, null pages included
        "page_size": cache.page_size,
        "tokens": engine.kv_capacity_tokens,
    }


class Suite:
    def __init__(self, preset: BenchPreset, options: SuiteOptions = SuiteOptions()):
        self.preset = preset
        self.options = options
        self.progress = show_progress(options.progress)
        base = engine_config_from_overrides(**self._overrides(PAGED))
        if options.mesh_shapes:
            meshes.check_budget(self._overrides(PAGED))
        t = time.monotonic()
        self.model, self.mesh = self._load(base)
        self.model_load_s = time.monotonic() - t
        self.model_dtype = base.dtype
        self.workload = generate_workload(preset.workload)
        self._warm: dict[tuple, str] = {}  # compiled bucket grid -> the configuration that did it

    def _load(self, config) -> tuple:
        """The preset's model on `config.mesh_shape` (same source and seed on every mesh)."""
        mesh = make_mesh(config.mesh_shape)
        model = load_model(
            self.preset.model,
            dtype=config.dtype,
            mesh=mesh,
            attention_impl=config.attention_impl,
            seed=config.seed,
        )
        return model, mesh

    def _model_for(self, config) -> tuple:
        """The loaded model and mesh for `config`: the suite's own unless its mesh differs, then
        the model loaded onto that mesh (kept only while its configuration runs)."""
        if tuple(config.mesh_shape) == tuple(self.mesh.devices.shape):
            return self.model, self.mesh
        return self._load(config)

    def _overrides(self, name: str) -> dict:
        return config_overrides(self.preset, name, self.options.engine_overrides)

    # --- engines ------------------------------------------------------------------------------

    def make_engine(self, name: str, extra: dict | None = None) -> tuple[Engine, dict]:
        """A fresh engine for configuration `name` (and `extra` overrides that change no step
        shape, e.g. `overlap_scheduling`), warmed up, with the policy registered."""
        config = engine_config_from_overrides(**self._overrides(name), **(extra or {}))
        model, mesh = self._model_for(config)
        engine = Engine(model, config, mesh)
        engine.register_trusted_prefix(POLICY_ZONE, list(self.workload.policy), source="bench")
        key = (
            tuple(config.mesh_shape),  # another mesh is another model and another compilation
            engine.buckets,
            engine.blocks.num_usable_pages,
            engine.blocks.page_size,
            config.cache.kv_cache_dtype,
            config.dtype,
        )
        if key in self._warm:
            return engine, {
                "shared_with": self._warm[key],
                "shapes": 0,
                "seconds": 0.0,
                "compilations": 0,
            }
        t = time.monotonic()
        shapes = engine.warmup()
        info = {
            "shapes": shapes,
            "seconds": time.monotonic() - t,
            "compilations": engine.compile_count,
        }
        self._warm[key] = name
        return engine, info

    def run_config(
        self, name: str, workload: Workload, arrival: ArrivalSpec
    ) -> tuple[dict, RunResult]:
        engine, warm = self.make_engine(name)
        bar = ProgressBar(self.progress, workload.num_requests, name)
        try:
            run = run_engine(engine, workload, arrival, name=name, bar=bar)
        finally:
            bar.close()
        entry = {
            "engine": self._overrides(name),
            "pool": pool_info(engine),
            "warmup": warm,
            "summary": summarize(run),
        }
        del engine
        gc.collect()
        return entry, run

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> tuple[dict, dict[str, RunResult]]:
        p, opts = self.preset, self.options
        results: dict = {
            "schema_version": 1,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "preset": p.to_dict(),
            "engine_overrides": opts.engine_overrides,
            "environment": (env := environment()),
            "caveat": caveat(env, opts.note),
            "model": {
                "source": p.model,
                "load_s": self.model_load_s,
                **probes.model_info(self.model),
            },
            "workload": self.workload.summary(),
            "arrival": p.arrival.describe(),
            "definitions": DEFINITIONS,
            "configs": {},
        }
        runs: dict[str, RunResult] = {}
        t0 = time.monotonic()
        if opts.compare:  # first, while no step shape is compiled in this process
            log.info("bench: %s", FIRST_CALL)
            results["configs"][FIRST_CALL], runs[FIRST_CALL] = self.run_first_call()
        results["ceilings"] = probes.measure_ceilings(
            copy_mib=p.probes.copy_mib, matmul_n=p.probes.matmul_n
        )
        names = [
            PAGED,
            *(ENGINE_BASELINES if opts.compare else ()),
            *(kv_config_name(d) for d in opts.kv_cache_dtypes),
            *(meshes.mesh_config_name(m) for m in opts.mesh_shapes),
        ]
        for name in names:
            log.info("bench: %s", name)
            results["configs"][name], runs[name] = self.run_config(name, self.workload, p.arrival)
        if opts.mesh_shapes:
            results["meshes"] = meshes.mesh_rows(results["configs"])
        if opts.compare and opts.hf:
            reason = hf_baseline.skip_reason(jax.default_backend())
            if reason is None:
                results["configs"][HF], runs[HF] = self.run_hf()
            else:
                results["configs"][HF] = {"skipped": reason}
        if opts.probes:
            results["probes"] = self.run_probes(results["ceilings"])
        if opts.sweep:
            results["sweep"] = self.run_sweep(results["configs"][PAGED]["summary"])
        results["ratios"] = ratios(results["configs"])
        results["goals"] = goals(results)
        results["wall_s"] = time.monotonic() - t0
        return results, runs

    def run_first_call(self) -> tuple[dict, RunResult]:
        """The full engine without warm-up: compilations happen inside the run, as in a user's
        first call (the bench script points the persistent cache at an empty directory)."""
        config = engine_config_from_overrides(**self._overrides(PAGED))
        engine = Engine(self.model, config, self.mesh)
        engine.register_trusted_prefix(POLICY_ZONE, list(self.workload.policy), source="bench")
        bar = ProgressBar(self.progress, self.workload.num_requests, FIRST_CALL)
        try:
            run = run_engine(engine, self.workload, self.preset.arrival, name=FIRST_CALL, bar=bar)
        finally:
            bar.close()
        entry = {
            "engine": self._overrides(PAGED),
            "pool": pool_info(engine),
            "warmup": {"skipped": "first call: every compilation is inside the run"},
            "summary": summarize(run),
        }
        del engine
        gc.collect()
        return entry, run

    def run_hf(self) -> tuple[dict, RunResult]:
        with tempfile.TemporaryDirectory(prefix="pijax-bench-hf-") as tmp:
            t = time.monotonic()
            dtype = self.model_dtype.value
            path = hf_baseline.export_weights(self.model, Path(tmp) / "hf", dtype)
            model = hf_baseline.load(path, dtype)
            load_s = time.monotonic() - t
        threads = hf_baseline.tune_threads(model, self.preset.hf_batch_size)
        bar = ProgressBar(self.progress, self.workload.num_requests, HF)
        try:
            run = hf_baseline.run_hf(
                model,
                self.workload,
                self.preset.arrival,
                batch_size=self.preset.hf_batch_size,
                bar=bar,
            )
        finally:
            bar.close()
        del model
        gc.collect()
        return {
            "engine": {
                "batch_size": self.preset.hf_batch_size,
                "load_s": load_s,
                "torch_threads": threads,
            },
            "summary": summarize(run),
        }, run

    def run_probes(self, ceilings: dict) -> dict:
        pc = self.preset.probes
        out: dict = {"long_arrival": {}, "unloaded_ttft": {}, "prefill": {}}
        for name in [PAGED, *((NO_CHUNK,) if self.options.compare else ())]:
            engine, _ = self.make_engine(name)
            before = engine.compile_count
            budget = engine.config.scheduler.max_num_batched_tokens
            out["prefill"][name] = probes.prefill_flops_probe(
                engine, ceilings, prompt_tokens=min(budget, pc.long_prompt)
            )
            out["long_arrival"][name] = probes.long_arrival_probe(
                engine,
                decodes=pc.decodes,
                context=pc.context,
                steady_steps=pc.steady_steps,
                long_prompt=pc.long_prompt,
            )
            out["long_arrival"][name]["compilations_after_warmup"] = engine.compile_count - before
            if name == PAGED:
                la = out["long_arrival"][name]
                out["roofline"] = probes.decode_roofline(
                    engine, ceilings, la["steady_contexts"], la["steady_step_s"]
                )
            del engine
        for name in [PAGED, *((NO_REUSE,) if self.options.compare else ())]:
            engine, _ = self.make_engine(name)
            out["unloaded_ttft"][name] = probes.unloaded_ttft(
                engine, self.workload, pc.ttft_requests
            )
            del engine
        out["overlap"] = probes.overlap_idle_probe(
            lambda overlap: self.make_engine(PAGED, {"overlap_scheduling": overlap})[0]
        )
        gc.collect()
        return out

    def run_sweep(self, paged: dict) -> dict:
        """Poisson arrivals at multiples of the closed-loop capacity the paged engine showed."""
        sw = self.preset.sweep
        capacity = paged["conversations"] / paged["makespan_s"]  # conversations/s
        cfg = dataclasses.replace(self.preset.workload, num_conversations=sw.num_conversations)
        workload = generate_workload(cfg)
        points = []
        for m in sw.rates_per_capacity:
            rate = m * capacity
            entry, _ = self.run_config(PAGED, workload, ArrivalSpec(ArrivalMode.POISSON, rate=rate))
            s = entry["summary"]
            points.append(
                {
                    "rate_per_capacity": m,
                    "rate_conversations_per_s": rate,
                    "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
                    "claims_per_hour": s["throughput"]["claims_per_hour"],
                    "ttft_p50_s": s["latency_s"]["ttft"]["p50"],
                    "ttft_p99_s": s["latency_s"]["ttft"]["p99"],
                    "itl_p99_s": s["latency_s"]["itl"]["p99"],
                    "compilations_after_warmup": s["compilations_after_warmup"],
                }
            )
        return {
            "capacity_conversations_per_s": capacity,
            "num_conversations": sw.num_conversations,
            "points": points,
        }


# --- comparisons ------------------------------------------------------------------------------


def _get(summary: dict, *path):
    x = summary
    for k in path:
        if x is None:
            return None
        x = x.get(k)
    return x


RATIO_METRICS = {
    # name: (path in the summary, True if higher is better)
    "output_tokens_per_s": (("throughput", "output_tokens_per_s"), True),
    "claims_per_hour": (("throughput", "claims_per_hour"), True),
    "peak_concurrency": (("concurrency", "peak"), True),
    "ttft_p50": (("latency_s", "ttft", "p50"), False),
    "ttft_p99": (("latency_s", "ttft", "p99"), False),
    "itl_p99": (("latency_s", "itl", "p99"), False),
    "tpot_p50": (("latency_s", "tpot", "p50"), False),
    "e2e_p50": (("latency_s", "e2e", "p50"), False),
}


def ratios(configs: dict) -> dict:
    """Each configuration's figures over the full engine's, as `config / paged`."""
    paged = configs.get(PAGED, {}).get("summary")
    out = {}
    for name, entry in configs.items():
        s = entry.get("summary")
        if name == PAGED or s is None:
            continue
        out[name] = {
            m: ratio(_get(s, *path), _get(paged, *path)) for m, (path, _) in RATIO_METRICS.items()
        }
    return out


def goals(results: dict) -> list[dict]:
    """The issue's goals, measured (never asserted): target, measured value, met or not."""
    cfg = results["configs"]
    pr = results.get("probes", {})
    s = {k: v.get("summary") for k, v in cfg.items()}
    paged = s.get(PAGED)
    rows = []

    def add(goal: str, target: str, value, ok):
        rows.append(
            {
                "goal": goal,
                "target": target,
                "measured": value,
                "met": None if value is None else bool(ok(value)),
            }
        )

    def over(name, path, inverse=False):
        if s.get(name) is None or paged is None:
            return None
        a, b = _get(paged, *path), _get(s[name], *path)
        return ratio(b, a) if inverse else ratio(a, b)

    add(
        "paged vs contiguous: output tokens/s",
        ">= 2x",
        over(CONTIGUOUS, ("throughput", "output_tokens_per_s")),
        lambda v: v >= 2,
    )
    add(
        "paged vs contiguous: peak concurrency",
        ">= 3x",
        over(CONTIGUOUS, ("concurrency", "peak")),
        lambda v: v >= 3,
    )
    add(
        "waste (allocated but unwritten slots)",
        "<= 4%",
        _get(paged, "memory", "waste_mean"),
        lambda v: v <= 0.04,
    )
    add(
        "prefix reuse: median TTFT, no-reuse / reuse (workload run)",
        ">= 4x",
        over(NO_REUSE, ("latency_s", "ttft", "p50"), inverse=True),
        lambda v: v >= 4,
    )
    ut = pr.get("unloaded_ttft", {})
    if PAGED in ut and NO_REUSE in ut:
        add(
            "prefix reuse: median TTFT, no-reuse / reuse (unloaded, one at a time)",
            ">= 4x",
            ratio(ut[NO_REUSE]["ttft_p50_s"], ut[PAGED]["ttft_p50_s"]),
            lambda v: v >= 4,
        )
    la = pr.get("long_arrival", {})
    if PAGED in la:
        add(
            "chunked prefill: p99 ITL during a long arrival / without it",
            "<= 2x",
            la[PAGED]["p99_during_over_before"],
            lambda v: v <= 2,
        )
    if NO_CHUNK in la:
        rows.append(
            {
                "goal": "(reference) unchunked: p99 ITL during a long arrival / without it",
                "target": "-",
                "measured": la[NO_CHUNK]["p99_during_over_before"],
                "met": None,
            }
        )
    add(
        "paged vs hf-transformers: output tokens/s (warm: after warm-up)",
        ">= 2x",
        over(HF, ("throughput", "output_tokens_per_s")),
        lambda v: v >= 2,
    )
    if s.get(FIRST_CALL) is not None and s.get(HF) is not None:
        path = ("throughput", "output_tokens_per_s")
        add(
            "paged vs hf-transformers: output tokens/s (first call: no warm-up, empty "
            "compilation cache)",
            ">= 2x",
            ratio(_get(s[FIRST_CALL], *path), _get(s[HF], *path)),
            lambda v: v >= 2,
        )
    pf = pr.get("prefill", {})
    if PAGED in pf:
        add(
            "prefill-only steps: achieved FLOP/s / matmul rate (same run)",
            ">= 0.5",
            pf[PAGED]["achieved_over_matmul_rate"],
            lambda v: v >= 0.5,
        )
    if NO_CHUNK in pf:
        rows.append(
            {
                "goal": "(reference) prefill-only, one long prompt per step (no-chunked-prefill "
                "budget): achieved FLOP/s / matmul rate",
                "target": "-",
                "measured": pf[NO_CHUNK]["achieved_over_matmul_rate"],
                "met": None,
            }
        )
    # probes["overlap"] (`probes.overlap_idle_probe`): the same steady decode, overlap on and off.
    ov = pr.get("overlap") or {}
    add(
        "overlap: device idle share of wall time between steps, steady decode",
        "<= 5%",
        ov.get("idle_share"),
        lambda v: v <= 0.05,
    )
    if ov.get("sync_idle_share") is not None:
        rows.append(
            {
                "goal": "(reference) synchronous loop: device idle share between steps, same "
                "steady decode",
                "target": "-",
                "measured": ov["sync_idle_share"],
                "met": None,
            }
        )
    if "roofline" in pr:
        add(
            "decode step: roofline floor / measured step time",
            ">= 0.6",
            pr["roofline"]["floor_over_measured"],
            lambda v: v >= 0.6,
        )
    compiles = [
        e["summary"]["compilations_after_warmup"]
        for name, e in cfg.items()
        if name != FIRST_CALL
        and e.get("summary")
        and e["summary"]["compilations_after_warmup"] is not None
    ]
    add("compilations after warm-up (all engine runs)", "== 0", sum(compiles), lambda v: v == 0)
    data_axis = meshes.capacity_ratio(results.get("meshes", []), (2, 1), (1, 1))
    if data_axis is not None:  # issue 16: the data axis multiplies the pool, not replicates it
        add(
            "data axis: KV capacity, mesh (2, 1) / (1, 1) at one per-device budget",
            ">= 2x",
            data_axis,
            lambda v: v >= 2,
        )
    return rows


def environment() -> dict:
    dev = jax.devices()[0]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "git": rev or None,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def caveat(env: dict, note: str = "") -> str:
    """What the figures are, said in the results themselves: CPU runs are not performance
    figures (DESIGN.md: absolute figures only from a GPU run, with the device named)."""
    if env["backend"] == "cpu":
        text = (
            f"CPU figures, not performance figures: {env['cpu_count']}-core CPU "
            f"({env.get('cpu_model') or 'unknown model'}), no accelerator. Only ratios "
            "between configurations measured side by side in this run carry meaning."
        )
    else:
        text = f"{env['num_devices']} × {env['device']} ({env['backend']})."
    return f"{text} {note}".strip()


def device_slug() -> str:
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    kind = jax.devices()[0].device_kind.lower()
    for name in ("h200", "h100", "a100", "l4", "v5e", "v5p", "v6e", "v4"):
        if name in kind.replace(" ", ""):
            return name
    return "".join(c if c.isalnum() else "-" for c in kind).strip("-") or backend
