"""`forward_dense` with a shared prefix: the same logits as prepending the prefix to every row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pijax.config import ModelConfig
from pijax.model.llama import LlamaModel


@pytest.mark.slow
def test_shared_prefix_matches_concatenated_rows_and_gradients():
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    graphdef, params = nnx.split(LlamaModel(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(rng.integers(0, 64, size=7), jnp.int32)
    rows = jnp.asarray(rng.integers(0, 64, size=(3, 11)), jnp.int32)
    full = jnp.concatenate([jnp.broadcast_to(prefix, (3, 7)), rows], axis=1)

    # Jitted: one compiled program is far faster than running the ops eagerly.
    @jax.jit
    def shared(p):
        return nnx.merge(graphdef, p).forward_dense(rows, prefix)

    @jax.jit
    def concatenated(p):
        return nnx.merge(graphdef, p).forward_dense(full)[:, 7:]

    np.testing.assert_allclose(shared(params), concatenated(params), rtol=1e-5, atol=1e-5)

    # Training differentiates through the shared prefix: its gradient is the rows' sum.
    g_shared = jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(shared(p)))))(params)
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(concatenated(p)))))(params)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
