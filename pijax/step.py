"""The jitted step: `step(params, kv_pool, batch) -> (packed_results, kv_pool)`, pool donated.

A pure function of arrays: the model's graph definition is closed over (static), its state is an
argument, and nothing outside the returned values changes. The input goes to the device packed in
one int32 buffer (`pack_step_input`: one host->device transfer per step) and the results come back
packed in one `int32[2, S]` array (token ids; log-probs bit-cast): one device->host copy.

`StepFunction.compare_pools` is the one documented variant: the same step (same batch builder,
same model methods, same sampled tokens) that also runs a reference-precision pool and an
attention probe and returns per-token comparisons; it is compiled only when something (the
quantization gate) asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from pijax.batch import StepInput
from pijax.kv_pool import KVPool
from pijax.sampling import sample

_TRACE_COUNT = 0
_JITTED: dict = {}


def pack_step_input(batch: StepInput) -> tuple[np.ndarray, tuple]:
    """A step's input as one int32 buffer (float32 fields bit-cast) and its layout (the tree
    structure and each field's shape and dtype: static, one per bucket shape), so a step costs
    one host->device transfer instead of one per field."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    parts, fields = [], []
    for x in leaves:
        x = np.asarray(x)
        if x.dtype not in (np.int32, np.float32):
            raise TypeError(f"step input fields must be int32 or float32; got {x.dtype}")
        parts.append(np.ascontiguousarray(x).reshape(-1).view(np.int32))
        fields.append((x.shape, x.dtype.name))
    return np.concatenate(parts), (treedef, tuple(fields))


def unpack_step_input(buf, layout) -> StepInput:
    """`pack_step_input` undone (on the device, inside the jitted step: slices are free)."""
    treedef, fields = layout
    leaves, offset = [], 0
    for shape, dtype in fields:
        n = math.prod(shape)
        x = buf[offset : offset + n].reshape(shape)
        if dtype != "int32":
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        leaves.append(x)
        offset += n
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _step_impl(
    graphdef: nnx.GraphDef,
    params_def,
    logits_sharding,
    row_sharding,
    vocab_sharding,
    param_leaves,
    kv_pool: KVPool,
    prev: Int[Array, "2 SM"],
    buf: Int[Array, "N"],
    layout,
):
    global _TRACE_COUNT
    _TRACE_COUNT += 1  # Python runs only while tracing: this counts compilations
    batch = unpack_step_input(buf, layout)
    params = jax.tree_util.tree_unflatten(params_def, param_leaves)
    model = nnx.merge(graphdef, params)
    # Overlapped scheduling: a decode's input token is the previous step's output, read here on
    # the device rather than through the host.
    tokens = jnp.where(
        batch.prev_index >= 0, prev[0, jnp.maximum(batch.prev_index, 0)], batch.tokens
    )
    if row_sharding is not None:  # data shards: each computes its own rows (weights replicated)
        tokens = jax.lax.with_sharding_constraint(tokens, row_sharding)
    logits, kv_pool = model(tokens, batch.positions, kv_pool, batch.meta, batch.logits_indices)
    # The LM head is vocab-parallel: each device computes its slice of the vocabulary, then the
    # logits are gathered once and every device samples alike. Without the first constraint
    # GSPMD would satisfy the second by gathering the LM head's weights instead (all of them,
    # every step: a GB for a 128k vocabulary) and computing the logits replicated.
    if vocab_sharding is not None and logits.shape[-1] % vocab_sharding.mesh.shape["model"] == 0:
        logits = jax.lax.with_sharding_constraint(logits, vocab_sharding)
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
    tokens, logprobs = sample(logits, batch.sampling)
    packed = jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)])
    # One results shape for every bucket (`max_seqs` columns), so the next step's `prev` input
    # adds no compilations.
    return jnp.pad(packed, ((0, 0), (0, prev.shape[1] - packed.shape[1]))), kv_pool


class StepFunction:
    """The jitted step for one model on one mesh, and the compilations it caused.

    Engines of the same model graph and mesh share one jitted function (and so its compilation
    cache): a second engine over the same model compiles nothing new.

    Per-call host cost matters (DESIGN.md: Python work per step far below device time), so the
    graph definition and the params' tree structure are bound into the jitted function once
    instead of being hashed as static arguments every step, and the params go in as a flat list
    of arrays, flattened once per params object rather than re-sorting the state's keys per step.
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, pool_shardings, max_seqs: int = 0):
        self.compile_count = 0
        self._max_seqs = max_seqs  # results are padded to this many sequences (0: no padding)
        self._no_prev: dict = {}  # the `prev` input of a step with nothing pending
        self._graphdef = graphdef
        self._mesh = mesh
        self._pool_shardings = pool_shardings
        self._replicated = NamedSharding(mesh, PartitionSpec())
        # Token rows split over `data` (the batch is laid out shard by shard, `batch.py`).
        self._rows = NamedSharding(mesh, PartitionSpec("data")) if mesh.shape["data"] > 1 else None
        self._vocab = (
            NamedSharding(mesh, PartitionSpec(None, "model")) if mesh.shape["model"] > 1 else None
        )
        self._params = None  # the params object last flattened, and its leaves
        self._leaves: list = []
        self._jitted = None
        self._probes: dict = {}  # probe variants (`compare_pools`), compiled on demand

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
                functools.partial(
                    _step_impl,
                    self._graphdef,
                    params_def,
                    self._replicated,
                    self._rows,
                    self._vocab,
                ),
                donate_argnums=(1,),
                static_argnums=(4,),
                out_shardings=(self._replicated, self._pool_shardings),
            )
        self._jitted = _JITTED[key]
        self._params, self._leaves, self._params_def = params, leaves, params_def

    def __call__(self, params, kv_pool: KVPool, batch: StepInput, prev: jax.Array | None = None):
        """Dispatches asynchronously; returns (device result, new pool). `prev`: the previous
        step's device result, where `batch.prev_index` reads pending tokens from."""
        if params is not self._params:
            self._bind(params)
        if prev is None:
            cols = self._max_seqs or batch.logits_indices.shape[0]
            if cols not in self._no_prev:
                zeros = np.zeros((2, cols), np.int32)
                self._no_prev[cols] = jax.device_put(zeros, self._replicated)
            prev = self._no_prev[cols]
        buf, layout = pack_step_input(batch)
        buf = jax.device_put(buf, self._replicated)  # the step's one host->device transfer
        before = _TRACE_COUNT
        out = self._jitted(self._leaves, kv_pool, prev, buf, layout)
        self.compile_count += _TRACE_COUNT - before
        return out

    def compiled_text(self, params, kv_pool: KVPool, batch: StepInput) -> str:
        """The optimized HLO of the step compiled for `batch`'s shapes (what runs on the device:
        its collectives, fusions). Compiles; runs nothing and donates nothing."""
        if params is not self._params:
            self._bind(params)
        cols = self._max_seqs or batch.logits_indices.shape[0]
        prev = jax.device_put(np.zeros((2, cols), np.int32), self._replicated)
        buf, layout = pack_step_input(batch)
        buf = jax.device_put(buf, self._replicated)
        lowered = self._jitted.lower(self._leaves, kv_pool, prev, buf, layout)
        return lowered.compile().as_text()

    def compare_pools(
        self, params, kv_pool: KVPool, ref_pool: KVPool, probe_pool: KVPool, batch: StepInput
    ) -> tuple[jax.Array, PoolComparison, KVPool, KVPool, KVPool]:
        """The step's probe variant (compiled on first use, per shape): the same step over
        `kv_pool` (same sampled tokens), plus a run over `ref_pool` (the same pages in reference
        precision) and `probe_pool` (pages in `kv_pool`'s dtype written from the reference run's
        residual stream), compared at every token row. Returns (packed results, comparison,
        kv_pool, ref_pool, probe_pool); all three pools are donated. What the quantization
        gate's teacher forcing measures (`pijax.quant_gate`)."""
        if params is not self._params:
            self._bind(params)
        shardings = lambda pool: jax.tree_util.tree_map(lambda x: x.sharding, pool)  # noqa: E731
        key = (
            self._params_def,
            jax.tree_util.tree_structure(ref_pool),
            tuple(jax.tree_util.tree_leaves(shardings(ref_pool))),
            jax.tree_util.tree_structure(probe_pool),
            tuple(jax.tree_util.tree_leaves(shardings(probe_pool))),
        )
        if key not in self._probes:
            self._probes[key] = jax.jit(
                functools.partial(_compare_impl, self._graphdef, self._params_def),
                donate_argnums=(1, 2, 3),
                static_argnums=(5,),
                out_shardings=(
                    self._replicated,
                    self._replicated,
                    self._pool_shardings,
                    shardings(ref_pool),
                    shardings(probe_pool),
                ),
            )
        buf, layout = pack_step_input(batch)
        buf = jax.device_put(buf, self._replicated)
        before = _TRACE_COUNT
        out = self._probes[key](self._leaves, kv_pool, ref_pool, probe_pool, buf, layout)
        self.compile_count += _TRACE_COUNT - before
        return out

    @staticmethod
    def unpack(packed: np.ndarray, columns: int | list[int]) -> list[tuple[int, float]]:
        """(token, log-prob) per sequence: of the first `columns` columns, or of the listed ones
        (`batch.result_columns`, for a step with data shards)."""
        cols = slice(0, columns) if isinstance(columns, int) else np.asarray(columns, np.intp)
        tokens = packed[0, cols]
        logprobs = np.ascontiguousarray(packed[1, cols]).view(np.float32)
        return list(zip(tokens.tolist(), logprobs.tolist(), strict=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PoolComparison:
    """Per token row of a `compare_pools` step: the step's pool against the reference pool."""

    kl: Float[Array, "T"]  # KL(reference || step pool) of the next-token distributions
    top1_agree: Bool[Array, "T"]  # their argmaxes agree
    attn_err2: Float[Array, "T L"]  # per layer: squared error of the probe pool's attention
    attn_ref2: Float[Array, "T L"]  # per layer: squared norm of the reference attention


def _compare_impl(graphdef, params_def, param_leaves, kv_pool, ref_pool, probe_pool, buf, layout):
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    batch = unpack_step_input(buf, layout)
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(params_def, param_leaves))
    rows = jnp.arange(batch.tokens.shape[0])
    logits, kv_pool = model(batch.tokens, batch.positions, kv_pool, batch.meta, rows)
    ref_logits, ref_pool, (err2, ref2, probe_pool) = model.probed(
        batch.tokens, batch.positions, ref_pool, batch.meta, rows, probe_pool
    )
    lp, lp_ref = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(ref_logits, -1)
    comparison = PoolComparison(
        kl=jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), -1),
        top1_agree=jnp.argmax(ref_logits, -1) == jnp.argmax(logits, -1),
        attn_err2=err2,
        attn_ref2=ref2,
    )
    tokens, logprobs = sample(logits[batch.logits_indices], batch.sampling)
    packed = jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)])
    return packed, comparison, kv_pool, ref_pool, probe_pool
