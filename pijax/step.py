"""The jitted step: `step(params, kv_pool, batch) -> (packed_results, kv_pool)`, pool donated.

A pure function of arrays: the model's graph definition is closed over (static), its state is an
argument, and nothing outside the returned values changes. Results come back packed in one
`int32[2, S]` array (token ids; log-probs bit-cast) so the host pays one device->host copy per
step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pijax.batch import StepInput
from pijax.kv_pool import KVPool
from pijax.sampling import sample

_TRACE_COUNT = 0
_JITTED: dict = {}


def _step_impl(
    graphdef: nnx.GraphDef,
    params_def,
    logits_sharding,
    param_leaves,
    kv_pool: KVPool,
    batch: StepInput,
):
    global _TRACE_COUNT
    _TRACE_COUNT += 1  # Python runs only while tracing: this counts compilations
    params = jax.tree_util.tree_unflatten(params_def, param_leaves)
    model = nnx.merge(graphdef, params)
    logits, kv_pool = model(
        batch.tokens, batch.positions, kv_pool, batch.meta, batch.logits_indices
    )
    # The LM head is vocab-parallel: gather the logits once, then sample on every device alike.
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
    tokens, logprobs = sample(logits, batch.sampling)
    packed = jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)])
    return packed, kv_pool


class StepFunction:
    """The jitted step for one model on one mesh, and the compilations it caused.

    Engines of the same model graph and mesh share one jitted function (and so its compilation
    cache): a second engine over the same model compiles nothing new.

    Per-call host cost matters (DESIGN.md: Python work per step far below device time), so the
    graph definition and the params' tree structure are bound into the jitted function once
    instead of being hashed as static arguments every step, and the params go in as a flat list
    of arrays, flattened once per params object rather than re-sorting the state's keys per step.
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, pool_shardings):
        self.compile_count = 0
        self._graphdef = graphdef
        self._mesh = mesh
        self._pool_shardings = pool_shardings
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._params = None  # the params object last flattened, and its leaves
        self._leaves: list = []
        self._jitted = None

    def _bind(self, params) -> None:
        leaves, params_def = jax.tree_util.tree_flatten(params)
        key = (
            self._graphdef,
            params_def,
            self._mesh,
            jax.tree_util.tree_structure(self._pool_shardings),
            tuple(jax.tree_util.tree_leaves(self._pool_shardings)),
        )
        if key not in _JITTED:
            _JITTED[key] = jax.jit(
                functools.partial(_step_impl, self._graphdef, params_def, self._replicated),
                donate_argnums=(1,),
                out_shardings=(self._replicated, self._pool_shardings),
            )
        self._jitted = _JITTED[key]
        self._params, self._leaves = params, leaves

    def __call__(self, params, kv_pool: KVPool, batch: StepInput):
        """Dispatches asynchronously; returns (device result, new pool)."""
        if params is not self._params:
            self._bind(params)
        batch = jax.device_put(batch, self._replicated)
        before = _TRACE_COUNT
        out = self._jitted(self._leaves, kv_pool, batch)
        self.compile_count += _TRACE_COUNT - before
        return out

    @staticmethod
    def unpack(packed: np.ndarray, num_seqs: int) -> list[tuple[int, float]]:
        tokens = packed[0, :num_seqs]
        logprobs = packed[1, :num_seqs].view(np.float32)
        return list(zip(tokens.tolist(), logprobs.tolist(), strict=True))
