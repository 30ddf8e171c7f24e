"""`scripts/bench.py --mesh_shapes`: the full engine on several (data, model) meshes of fake CPU
devices at one per-device KV budget, the model loaded onto each. The script itself asks XLA for
the devices (the test's environment has no XLA_FLAGS). Asserted: the report's structure, and that
capacity follows the mesh in the same bytes per device: the `model` axis splits each page over
tiny-random's 2 kv heads and the `data` axis gives each shard pages of its own, so (1, 2) and
(2, 1) each hold twice the tokens of (1, 1). No timing is asserted."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pijax.bench.meshes import (
    HOST_DEVICES_FLAG,
    devices_needed,
    mesh_config_name,
    mesh_of,
    parse_mesh_shapes,
    with_host_devices,
)
from pijax.bench.report import REQUIRED_KEYS
from pijax.bench.suite import PAGED
from pijax.config import ConfigError

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "bench.py"
MESHES = ((1, 1), (2, 1), (1, 2))


def test_mesh_shapes_parse_and_name():
    shapes = parse_mesh_shapes(["1x1", "2x1", " 1,2 ", ""])
    assert shapes == ((1, 1), (2, 1), (1, 2))
    assert devices_needed(shapes) == 2 and devices_needed([]) == 1
    assert mesh_config_name((2, 1)) == "paged-mesh-2x1"
    assert mesh_of("paged-mesh-2x1") == (2, 1) and mesh_of(PAGED) is None
    with pytest.raises(ConfigError, match="at most once"):
        parse_mesh_shapes(["1x2", "1,2"])
    with pytest.raises(ConfigError, match="mesh"):
        parse_mesh_shapes(["0x2"])


def test_host_devices_flag_added_once():
    assert with_host_devices("", 4) == f"{HOST_DEVICES_FLAG}=4"
    assert (
        with_host_devices("--xla_dump_to=/tmp/x", 2)
        == f"--xla_dump_to=/tmp/x {HOST_DEVICES_FLAG}=2"
    )
    assert with_host_devices(f"{HOST_DEVICES_FLAG}=8", 4) == f"{HOST_DEVICES_FLAG}=8"  # caller's
    assert with_host_devices("", 1) == ""


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-meshes") / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", CI="1")
    meshes = ",".join(f"{d}x{m}" for d, m in MESHES)
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--preset=smoke",
            "--noprobes",
            f"--mesh_shapes={meshes}",
            f"--out_dir={out}",
            "--compilation_cache_dir=",
            "--progress=off",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.mark.slow
def test_report_per_mesh(mesh_run):
    results, md = mesh_run
    for key in REQUIRED_KEYS:
        assert key in results, key
    assert results["environment"]["num_devices"] == devices_needed(MESHES)
    names = [mesh_config_name(m) for m in MESHES]
    assert list(results["configs"]) == [PAGED, *names]
    requests = results["workload"]["requests"]
    rows = results["meshes"]
    assert [r["config"] for r in rows] == names
    assert [tuple(r["mesh_shape"]) for r in rows] == list(MESHES)
    budget = results["preset"]["engine"]["kv_cache_memory_bytes"]
    for row, name in zip(rows, names, strict=True):
        s = results["configs"][name]["summary"]
        assert s["requests"] == requests, name  # the identical request list, all served
        assert s["compilations_after_warmup"] == 0, name
        assert row["output_tokens_per_s"] == s["throughput"]["output_tokens_per_s"] > 0
        assert row["budget_bytes_per_device"] == budget
        assert 0 < row["pool_bytes_per_device"] <= budget  # one budget per device, kept
        assert results["configs"][name]["engine"]["mesh_shape"] == list(row["mesh_shape"])
    assert "## Meshes at one per-device KV budget" in md
    for d, m in MESHES:
        assert f"| ({d}, {m}) |" in md


@pytest.mark.slow
def test_capacity_follows_model_axis(mesh_run):
    results, _ = mesh_run
    by_mesh = {tuple(r["mesh_shape"]): r for r in results["meshes"]}
    one, tp2 = by_mesh[(1, 1)], by_mesh[(1, 2)]
    ps = one["page_size"]
    # 2 kv heads over 2 devices: each device holds half of every page, so twice the pages fit
    # (the pool's one null page aside).
    assert 2 * one["capacity_tokens"] <= tp2["capacity_tokens"] <= 2 * one["capacity_tokens"] + ps
    assert tp2["capacity_over_first"] >= 2 and tp2["num_pages"] == 2 * one["num_pages"]
    assert one["kv_heads_on_mesh"] == tp2["kv_heads_on_mesh"] == 2


@pytest.mark.slow
def test_capacity_follows_data_axis(mesh_run):
    results, _ = mesh_run
    by_mesh = {tuple(r["mesh_shape"]): r for r in results["meshes"]}
    one, dp2 = by_mesh[(1, 1)], by_mesh[(2, 1)]
    # Each data shard has pages of its own in the same bytes per device: twice the tokens.
    assert 2 * one["capacity_tokens"] <= dp2["capacity_tokens"]
    assert dp2["capacity_tokens"] <= 2 * one["capacity_tokens"] + one["page_size"]
    assert dp2["pool_bytes_per_device"] == one["pool_bytes_per_device"]
    assert dp2["num_pages"] == 2 * one["num_pages"]  # every shard its own null page
    goals = {g["goal"]: g for g in results["goals"]}
    row = goals["data axis: KV capacity, mesh (2, 1) / (1, 1) at one per-device budget"]
    assert row["met"] is True and row["measured"] >= 2
