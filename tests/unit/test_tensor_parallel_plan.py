"""The tensor-parallel plan (which model axes a model allows, how kv heads are replicated) and the
kv-head widening, on one device: the multi-device checks are in tests/e2e/test_tensor_parallel.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pijax.config import ConfigError
from pijax.model.llama import LOGICAL_AXES
from pijax.sharding import (
    param_spec,
    plan_tensor_parallel,
    replicate_kv_heads,
)
from pijax.testing import tiny_model_config


@pytest.mark.parametrize(
    ("kv", "heads", "axis", "replicas"),
    [(8, 32, 1, 1), (8, 32, 4, 1), (8, 32, 8, 1), (8, 64, 16, 2), (2, 4, 4, 2), (1, 8, 8, 8)],
)
def test_plan_splits_or_replicates_kv_heads(kv, heads, axis, replicas):
    cfg = tiny_model_config(num_kv_heads=kv, num_heads=heads, intermediate_size=128)
    plan = plan_tensor_parallel(cfg, axis)
    assert plan.kv_head_replicas == replicas
    assert plan.kv_heads_on_mesh == max(kv, axis)
    assert plan.mesh_config(cfg).num_kv_heads == max(kv, axis)
    assert plan.kv_heads_on_mesh % axis == 0


@pytest.mark.parametrize(
    ("kv", "heads", "axis", "field"),
    [
        (3, 12, 4, "num_key_value_heads=3"),  # neither divides the other
        (4, 8, 16, "num_attention_heads=8"),  # query heads cannot be split 16 ways
        (4, 8, 3, "num_attention_heads=8"),
    ],
)
def test_plan_refuses_with_the_field(kv, heads, axis, field):
    cfg = tiny_model_config(num_kv_heads=kv, num_heads=heads, intermediate_size=96)
    with pytest.raises(ConfigError, match=field):
        plan_tensor_parallel(cfg, axis, "config.json")


def test_mlp_must_split():
    cfg = tiny_model_config(intermediate_size=100)
    with pytest.raises(ConfigError, match="intermediate_size=100"):
        plan_tensor_parallel(cfg, 8)


def test_spec_replicates_a_dimension_the_axis_does_not_divide():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    assert param_spec(("vocab", "embed"), (320, 64), mesh) == PartitionSpec("model", None)
    assert param_spec(None, (320, 64), mesh) == PartitionSpec()


def test_widened_kv_heads_repeat_each_head_in_place():
    cfg = tiny_model_config(num_kv_heads=2, num_heads=4, head_dim=3, hidden_size=5)
    plan = plan_tensor_parallel(cfg, 4)  # 2 kv heads on 4 devices: each twice
    rng = np.random.default_rng(0)
    k = rng.standard_normal((5, 2 * 3)).astype(np.float32)  # [embed, kv heads x head_dim]
    b = rng.standard_normal((2 * 3,)).astype(np.float32)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rep = NamedSharding(mesh, PartitionSpec())
    params = nnx.State({"k_proj": {"kernel": jax.numpy.asarray(k), "bias": jax.numpy.asarray(b)}})
    target = jax.tree.map(lambda _: rep, params)
    out = replicate_kv_heads(params, LOGICAL_AXES, plan, target)
    wk, wb = np.asarray(out["k_proj"]["kernel"]), np.asarray(out["k_proj"]["bias"])
    assert wk.shape == (5, 4 * 3) and wb.shape == (4 * 3,)
    heads = k.reshape(5, 2, 3)
    for j in range(4):  # widened head j is checkpoint head j // 2
        np.testing.assert_array_equal(wk[:, 3 * j : 3 * j + 3], heads[:, j // 2])
        np.testing.assert_array_equal(wb[3 * j : 3 * j + 3], b[3 * (j // 2) : 3 * (j // 2) + 3])
