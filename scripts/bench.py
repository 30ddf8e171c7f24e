"""Benchmark the engine on the payment-integrity mix, with its baselines side by side.

    python scripts/bench.py --preset=smoke                 # seconds: the plumbing
    python scripts/bench.py --preset=cpu --compare         # minutes on a 2-core CPU
    python scripts/bench.py --preset=cpu --kv_cache_dtype=auto,int8   # KV dtypes, same bytes
    python scripts/bench.py --preset=gpu-8b --compare --sweep
    python scripts/bench.py --preset=cpu --target=HOST:PORT           # over gRPC, a running server
    python scripts/bench.py --preset=smoke --noprobes --mesh_shapes=1x1,2x1,1x2,2x2  # meshes

Writes results.json, results.md and PNG plots into --out_dir (default
benchmarks/results/<date>-<device>-<preset>/). Presets live in configs/bench/.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from absl import app, flags

from pijax import flags as engine_flags

FLAGS = flags.FLAGS
# The preset names the model; --kv_cache_dtype is a list here and the compilation cache a
# process-wide setting, so those three keep the bench's own meaning.
engine_flags.define_engine_flags(exclude=["model", "kv_cache_dtype", "compilation_cache_dir"])
flags.DEFINE_string("preset", "cpu", "Bench preset in configs/bench/ (smoke, cpu, gpu-1b, gpu-8b).")
flags.DEFINE_bool(
    "compare",
    False,
    "Also run the baselines (contiguous, no-prefix-reuse, "
    "no-chunked-prefill, hf-transformers) on the identical request list.",
)
flags.DEFINE_bool("sweep", False, "Also sweep Poisson arrival rates (full engine only).")
flags.DEFINE_bool(
    "hf", True, "With --compare, include the transformers baseline (needs the reference extra)."
)
flags.DEFINE_bool("probes", True, "Run the roofline, long-arrival and unloaded-TTFT probes.")
flags.DEFINE_string(
    "out_dir", None, "Results folder (default: benchmarks/results/<date>-<device>-<preset>)."
)
flags.DEFINE_enum(
    "progress",
    "auto",
    ["auto", "on", "off"],
    "Progress bar over requests: auto = only on a terminal and never under CI.",
)
flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Persistent XLA compilation cache (default: the engine's, ~/.cache/pijax/jax; 'off' or '' "
    "= off). With --compare the run uses a fresh empty directory instead, so the first-call "
    "figure includes every compilation.",
)
flags.DEFINE_string(
    "target",
    None,
    "host:port of a running pijax server: run the workload over "
    "gRPC against it instead of in-process (no baselines, no probes).",
)
flags.DEFINE_string("api_key", None, "API key for --target (else $PIJAX_API_KEY).")
flags.DEFINE_multi_string(
    "engine_opt",
    [],
    "Engine override KEY=VALUE applied to every configuration, for options without a flag of "
    "their own (e.g. kv_cache_memory_bytes=4194304); repeatable.",
)
flags.DEFINE_list(
    "kv_cache_dtype",
    [],
    "KV cache dtype(s) (default: the preset's): the first "
    "is every configuration's; each further one adds a configuration "
    "paged-kv-<dtype> of the full engine at the same KV byte budget (e.g. "
    "auto,int8: capacity and throughput side by side). Choices: auto, int8, "
    "fp8_e4m3 (GPU/TPU only).",
)
flags.DEFINE_list(
    "mesh_shapes",
    [],
    "(data, model) meshes as DxM, e.g. 1x1,2x1,1x2,2x2: each adds a configuration "
    "paged-mesh-DxM of the full engine, the model loaded onto that mesh, at the same per-device "
    "KV byte budget (kv_cache_memory_bytes), so the pool's capacity follows the mesh. On CPU the "
    "script asks XLA for enough fake devices (--xla_force_host_platform_device_count) unless "
    "XLA_FLAGS already names a count.",
)
flags.DEFINE_integer(
    "clients",
    None,
    "Closed-loop clients, overriding the preset's arrivals "
    "(e.g. with --engine_opt=max_num_seqs=16, so the pool, not the sequence "
    "limit, bounds concurrency).",
)
flags.DEFINE_string(
    "note",
    "",
    "Free text appended to the caveat written into the results "
    "(e.g. what else ran on the machine).",
)


def engine_overrides() -> dict:
    """Engine options from flags, applied on top of the preset in every configuration."""
    out = engine_flags.engine_overrides()
    out.pop("kv_cache_dtype", None)  # this script's list-valued flag of the same name
    if FLAGS.kv_cache_dtype:
        out["kv_cache_dtype"] = FLAGS.kv_cache_dtype[0]
    for item in FLAGS.engine_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise app.UsageError(f"--engine_opt must be KEY=VALUE; got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def default_out_dir(preset: str) -> Path:
    from pijax.bench.suite import device_slug

    date = datetime.date.today().isoformat()
    return (
        Path(__file__).resolve().parents[1]
        / "benchmarks"
        / "results"
        / f"{date}-{device_slug()}-{preset}"
    )


def request_host_devices(mesh_shapes: tuple, base_mesh: tuple[int, int] | None) -> None:
    """Enough fake CPU devices for every mesh, asked for before JAX starts its backends (XLA
    reads XLA_FLAGS once, when the first backend is created)."""
    from pijax.bench.meshes import devices_needed, with_host_devices

    n = devices_needed([*mesh_shapes, *([base_mesh] if base_mesh else [])])
    os.environ["XLA_FLAGS"] = with_host_devices(os.environ.get("XLA_FLAGS", ""), n)


def main(argv):
    del argv
    from pijax.bench.meshes import parse_mesh_shapes

    mesh_shapes = parse_mesh_shapes(FLAGS.mesh_shapes)
    if mesh_shapes and FLAGS.target:
        raise app.UsageError("--mesh_shapes runs engines in-process; it cannot go with --target")
    request_host_devices(mesh_shapes, engine_overrides().get("mesh_shape"))
    logging.getLogger().setLevel(logging.INFO if FLAGS.progress != "off" else logging.WARNING)

    from pijax.config import resolve_compilation_cache_dir
    from pijax.engine import use_compilation_cache

    cache_dir = resolve_compilation_cache_dir(FLAGS.compilation_cache_dir)
    if cache_dir and FLAGS.compare and not FLAGS.target:
        cache_dir = tempfile.mkdtemp(prefix="pijax-bench-xla-")  # the first call sees it empty
        atexit.register(shutil.rmtree, cache_dir, True)
    use_compilation_cache(cache_dir)
    from pijax.bench import report
    from pijax.bench.presets import load_bench_preset
    from pijax.bench.suite import Suite, SuiteOptions

    preset = load_bench_preset(FLAGS.preset)
    if FLAGS.clients is not None:
        from pijax.bench.driver import ArrivalMode, ArrivalSpec

        preset = dataclasses.replace(
            preset, arrival=ArrivalSpec(ArrivalMode.CLOSED, clients=FLAGS.clients)
        )
    progress = {"auto": None, "on": True, "off": False}[FLAGS.progress]
    out_dir = Path(FLAGS.out_dir) if FLAGS.out_dir else default_out_dir(preset.name)
    if FLAGS.target:
        from pijax.bench.remote import run_remote

        results, runs = run_remote(
            preset,
            FLAGS.target,
            api_key=FLAGS.api_key or os.environ.get("PIJAX_API_KEY"),
            progress=progress,
            note=FLAGS.note,
        )
    else:
        options = SuiteOptions(
            compare=FLAGS.compare,
            sweep=FLAGS.sweep,
            hf=FLAGS.hf,
            probes=FLAGS.probes,
            progress=progress,
            engine_overrides=engine_overrides(),
            kv_cache_dtypes=tuple(FLAGS.kv_cache_dtype[1:]),
            mesh_shapes=mesh_shapes,
            note=FLAGS.note,
        )
        results, runs = Suite(preset, options).run()
    files = report.write(results, runs, out_dir)
    print(report.markdown(results))
    print(f"wrote {', '.join(files)} to {out_dir}")


if __name__ == "__main__":
    app.run(main)
