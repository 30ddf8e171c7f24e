"""The mesh sweep (`scripts/bench.py --mesh_shapes=1x1,2x1,1x2,2x2`): the full engine on each
(data, model) mesh, at one per-device KV byte budget, on the identical request list.

Each mesh is a configuration `paged-mesh-<D>x<M>` of the suite (`suite.py` runs it like any
other): the model is loaded onto that mesh (same source, same seed) and the pool is sized from the
preset's `kv_cache_memory_bytes`, which is per device, so the pool's capacity follows the mesh:

  * the `model` axis splits every page over the kv heads, so M devices hold M times the tokens,
    up to the kv head count; beyond it each kv head is replicated (`pijax.sharding`) and capacity
    stops growing (more compute, not more KV);
  * the `data` axis gives each data shard pages of its own, so D shards hold D times the tokens
    (where the data axis only replicates the pool, D shards hold what one does).

A budget of `num_pages` would fix the capacity whatever the mesh, so the sweep refuses one.

On CPU the devices are fake (`--xla_force_host_platform_device_count`, set by the script before
JAX starts) and share the cores: the capacity is the figure; tokens/s there are not a
performance figure. This module knows nothing about how the engine splits the pool: it reads
`Engine.kv_capacity_tokens` and the pool arrays' shardings.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax

from pijax.config import ConfigError, parse_mesh

MESH_PREFIX = "paged-mesh-"
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"

Shape = tuple[int, int]


def parse_mesh_shapes(items: Iterable[str]) -> tuple[Shape, ...]:
    """`["1x1", "2x1"]` (or `"2,1"`-style items) -> ((1, 1), (2, 1)); duplicates refused."""
    shapes = tuple(parse_mesh(item.strip()) for item in items if item.strip())
    if len(set(shapes)) != len(shapes):
        raise ConfigError(f"mesh_shapes: each mesh at most once; got {list(items)}")
    return shapes


def mesh_config_name(shape: Shape) -> str:
    return f"{MESH_PREFIX}{shape[0]}x{shape[1]}"


def mesh_of(name: str) -> Shape | None:
    """The mesh of configuration `name` (`paged-mesh-2x1` -> (2, 1)); None for any other."""
    if not name.startswith(MESH_PREFIX):
        return None
    return parse_mesh(name[len(MESH_PREFIX) :])


def devices_needed(shapes: Iterable[Shape]) -> int:
    return max((d * m for d, m in shapes), default=1)


def with_host_devices(xla_flags: str, n: int) -> str:
    """`xla_flags` with N fake host (CPU) devices asked for, unless it already names a count
    (a count set by the caller wins; a mesh it cannot hold fails with the devices it needs)."""
    if n <= 1 or HOST_DEVICES_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {HOST_DEVICES_FLAG}={n}".strip()


def check_budget(overrides: dict) -> None:
    """The sweep compares meshes at one per-device byte budget; a page count would not follow
    the mesh."""
    if overrides.get("num_pages") is not None:
        raise ConfigError(
            "mesh_shapes: the pool must be sized by kv_cache_memory_bytes (per device), not "
            f"num_pages={overrides['num_pages']}: a page count does not follow the mesh"
        )
    if overrides.get("kv_cache_memory_bytes") is None:
        raise ConfigError(
            "mesh_shapes: set kv_cache_memory_bytes (the per-device KV budget; a preset's engine "
            "section or --engine_opt=kv_cache_memory_bytes=N), so every mesh gets the same bytes "
            "per device"
        )


def pool_device_bytes(pool) -> int:
    """Bytes of the pool one device holds (the largest shard of each array, summed)."""
    total = 0
    for x in jax.tree_util.tree_leaves(pool):
        n = x.dtype.itemsize
        for dim in x.sharding.shard_shape(x.shape):
            n *= dim
        total += n
    return total


def mesh_rows(configs: dict) -> list[dict]:
    """One row per mesh configuration, in run order: capacity and throughput, each also over the
    first mesh's."""
    rows = []
    for name, entry in configs.items():
        shape, s = mesh_of(name), entry.get("summary")
        if shape is None or s is None:
            continue
        pool = entry["pool"]
        rows.append(
            {
                "config": name,
                "mesh_shape": list(shape),
                "devices": shape[0] * shape[1],
                "budget_bytes_per_device": pool["budget_bytes"],
                "pool_bytes_per_device": pool["device_bytes"],
                "kv_heads_on_mesh": pool["kv_heads_on_mesh"],
                "page_size": pool["page_size"],
                "num_pages": pool["num_pages"],
                "capacity_tokens": pool["capacity_tokens"],
                "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
                "peak_concurrency": s["concurrency"]["peak"],
                "preemptions": s["memory"]["preemptions"],
            }
        )
    for row in rows:
        base = rows[0]
        row["capacity_over_first"] = row["capacity_tokens"] / base["capacity_tokens"]
        tps, base_tps = row["output_tokens_per_s"], base["output_tokens_per_s"]
        row["output_tokens_per_s_over_first"] = tps / base_tps if tps and base_tps else None
    return rows


def capacity_ratio(rows: list[dict], shape: Shape, over: Shape) -> float | None:
    """capacity(shape) / capacity(over), when both meshes ran."""
    by_shape = {tuple(r["mesh_shape"]): r["capacity_tokens"] for r in rows}
    if shape not in by_shape or over not in by_shape:
        return None
    return by_shape[shape] / by_shape[over]


def mesh_table(rows: list[dict]) -> str:
    first = rows[0]["mesh_shape"]
    rows_md = [
        "| mesh (data, model) | devices | KV budget / device | pool bytes / device | kv heads "
        f"on mesh | pages | capacity (tokens) | × ({first[0]}, {first[1]}) | output tok/s | × "
        f"({first[0]}, {first[1]}) | peak conc. | preempt. |",
        "|---|" + "---|" * 11,
    ]
    for r in rows:
        d, m = r["mesh_shape"]
        tps, rel = r["output_tokens_per_s"], r["output_tokens_per_s_over_first"]
        rows_md.append(
            f"| ({d}, {m}) | {r['devices']} | {r['budget_bytes_per_device'] / 2**20:.2f} MiB "
            f"| {r['pool_bytes_per_device'] / 2**20:.2f} MiB | {r['kv_heads_on_mesh']} "
            f"| {r['num_pages']} "
            f"| {r['capacity_tokens']:,} | {r['capacity_over_first']:.2f}× "
            f"| {'–' if tps is None else f'{tps:.3g}'} | {'–' if rel is None else f'{rel:.2f}×'} "
            f"| {r['peak_concurrency']} | {r['preemptions']} |"
        )
    return "\n".join(rows_md)
