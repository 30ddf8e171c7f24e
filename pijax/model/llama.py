"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral) in flax NNX.

One implementation, two ways in:
  * `__call__` runs a ragged, paged step: a flattened token axis, K/V written into the pool and
    attention through `pijax.kernels.dispatch` (the engine's path);
  * `forward_dense` runs ordinary causal attention over `[batch, length]` tokens with no cache
    (training and parity checks), optionally after a prefix shared by every row.

The engine never holds a live module: it splits it into a graph definition and a state pytree
(`nnx.split`) and merges them inside the jitted step, so the step stays a pure function of arrays.
Parameters carry logical axis names (`LOGICAL_AXES`), mapped to mesh axes in `pijax.sharding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from pijax.config import ModelConfig, RopeScaling
from pijax.kernels import dispatch
from pijax.kernels.dispatch import AttentionImpl
from pijax.kv_pool import KVPool, LayerKV
from pijax.model.metadata import AttentionMetadata


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_scaling is not None:
        inv = _llama3_scale(inv, cfg.rope_scaling)
    return inv


def _llama3_scale(inv_freq: jnp.ndarray, rs: RopeScaling) -> jnp.ndarray:
    # Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`, short ones
    # kept, and the band between interpolated smoothly.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    mid = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x: Float[Array, "... H D"], positions: Int[Array, "..."], inv_freq) -> Array:
    """Rotate-half rotary embedding (the HF convention), computed in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(din, dout, bias, dtype, rngs, scale=None):
    init = nnx.initializers.normal(stddev=scale if scale is not None else 1.0 / math.sqrt(din))
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=init,
        bias_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype,
        impl: AttentionImpl,
        rngs: nnx.Rngs,
        window: int | None = None,
    ):
        h, d = cfg.hidden_size, cfg.head_dim
        self.window = window  # sliding window in positions (None: full causal attention)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = _linear(h, cfg.num_heads * d, cfg.attention_bias, dtype, rngs)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, rngs)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * d, h, False, dtype, rngs)
        self.impl = impl
        self.sm_scale = 1.0 / math.sqrt(d)

    def _qkv(self, x, positions, inv_freq):
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(
        self, x: Float[Array, "T E"], positions, inv_freq, cache: LayerKV, meta: AttentionMetadata
    ) -> tuple[Array, LayerKV]:
        q, k, v = self._qkv(x, positions, inv_freq)
        kp, vp, ks, vs = dispatch.write_kv(
            cache.k, cache.v, k, v, meta.slot_mapping, cache.k_scale, cache.v_scale, impl=self.impl
        )
        out = dispatch.paged_attention(
            q,
            kp,
            vp,
            meta.kv_lens,
            meta.block_tables,
            meta.cu_q_lens,
            meta.num_seqs,
            sm_scale=self.sm_scale,
            impl=self.impl,
            k_scales=ks,
            v_scales=vs,
            sliding_window=self.window,
        )
        out = out.reshape(x.shape[0], self.num_heads * self.head_dim)
        return self.o_proj(out), LayerKV(kp, vp, ks, vs)

    def forward_dense(
        self, x: Float[Array, "B T E"], positions, inv_freq, past: tuple[Array, Array] | None = None
    ) -> tuple[Array, tuple[Array, Array]]:
        """Causal attention over `x`; with `past` (keys, values of shape [1, P, kv heads, D], one
        prefix that every row continues), each row also sees all P prefix positions first.
        Returns the output and `x`'s own (keys, values)."""
        q, k, v = self._qkv(x, positions, inv_freq)
        b, length = x.shape[:2]
        causal = jnp.tril(jnp.ones((length, length), bool))
        keys, values = k, v
        if past is not None:
            pk, pv = (jnp.broadcast_to(t, (b, *t.shape[1:])) for t in past)
            keys, values = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
            causal = jnp.concatenate([jnp.ones((length, pk.shape[1]), bool), causal], 1)
        if self.window is not None:  # key column c sits `offset + row - c` positions back
            offset = causal.shape[1] - length
            rows = jnp.arange(length)[:, None] + offset
            causal &= jnp.arange(causal.shape[1])[None, :] > rows - self.window
        group = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, length, self.num_kv_heads, group, self.head_dim).astype(jnp.float32)
        s = jnp.einsum("bqkgd,blkd->bkgql", qg, keys.astype(jnp.float32)) * self.sm_scale
        s = jnp.where(causal, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bkgql,blkd->bqkgd", p, values.astype(jnp.float32)).astype(x.dtype)
        return self.o_proj(o.reshape(b, length, self.num_heads * self.head_dim)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, False, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, dtype, impl: AttentionImpl, rngs: nnx.Rngs, layer: int = 0
    ):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, impl, rngs, window=cfg.layer_window(layer))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, positions, inv_freq, cache, meta):
        x, cache, _ = self.probed(x, positions, inv_freq, cache, meta, None)
        return x, cache

    def probed(self, x, positions, inv_freq, cache, meta, probe: LayerKV | None):
        """`__call__`; with `probe` (another pool's layer) the attention block also runs over it
        from the same normalized input, and the third result is (per-token squared error of
        that output against this one, per-token squared norm of this one, the new probe layer),
        float32 [T] each. The residual stream continues from `cache`'s run only."""
        h = self.input_layernorm(x)
        a, cache = self.self_attn(h, positions, inv_freq, cache, meta)
        extra = None
        if probe is not None:
            a_probe, probe = self.self_attn(h, positions, inv_freq, probe, meta)
            d = (a_probe - a).astype(jnp.float32)
            af = a.astype(jnp.float32)
            extra = (jnp.sum(d * d, -1), jnp.sum(af * af, -1), probe)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache, extra

    def forward_dense(self, x, positions, inv_freq, past=None):
        h, kv = self.self_attn.forward_dense(self.input_layernorm(x), positions, inv_freq, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):
    """Decoder + LM head. Parameter names follow HF's, so loading is a transpose, not a puzzle."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        attention_impl: AttentionImpl = AttentionImpl.AUTO,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype, attention_impl, rngs, layer=i) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)
        )

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "T"],
        positions: Int[Array, "T"],
        kv_pool: KVPool,
        meta: AttentionMetadata,
        logits_indices: Int[Array, "S"],
    ) -> tuple[Float[Array, "S V"], KVPool]:
        """Ragged paged forward: logits only at `logits_indices` (each sequence's last token)."""
        logits, kv_pool, _ = self.probed(tokens, positions, kv_pool, meta, logits_indices, None)
        return logits, kv_pool

    def probed(
        self,
        tokens: Int[Array, "T"],
        positions: Int[Array, "T"],
        kv_pool: KVPool,
        meta: AttentionMetadata,
        logits_indices: Int[Array, "S"],
        probe_pool: KVPool | None,
    ) -> tuple[Float[Array, "S V"], KVPool, tuple[Array, Array, KVPool] | None]:
        """`__call__` with an attention probe. With `probe_pool`, every layer's attention block
        also runs over `probe_pool` (written from the same input: this run's residual stream), and
        the third result is (squared error [T L], squared reference norm [T L], new probe pool):
        each layer's own error from reading another pool (e.g. a quantized one), not the error
        carried up from the layers below. Without it, exactly `__call__`."""
        inv_freq = rope_inv_freq(self.config)
        x = self.embed_tokens(tokens)
        new_pool, err2, ref2, new_probe = [], [], [], []
        probes = probe_pool if probe_pool is not None else (None,) * len(kv_pool)
        for layer, cache, probe in zip(self.layers, kv_pool, probes, strict=True):
            x, cache, extra = layer.probed(x, positions, inv_freq, cache, meta, probe)
            new_pool.append(cache)
            if extra is not None:
                err2.append(extra[0])
                ref2.append(extra[1])
                new_probe.append(extra[2])
        probe_out = None
        if probe_pool is not None:
            probe_out = (jnp.stack(err2, -1), jnp.stack(ref2, -1), tuple(new_probe))
        return self._logits(x[logits_indices]), tuple(new_pool), probe_out

    def forward_dense(
        self, tokens: Int[Array, "B T"], prefix: Int[Array, "Tp"] | None = None
    ) -> Float[Array, "B T V"]:
        """Logits at every position of `tokens`. With `prefix`, each row continues the same
        prefix tokens: the logits equal those of `concatenate([prefix, row])` at the row's
        positions, but the prefix runs once (batch 1) instead of once per row, which is most of
        the saving when a long shared prompt (a policy scaffold) opens every training sequence.
        """
        inv_freq = rope_inv_freq(self.config)
        start = 0 if prefix is None else prefix.shape[0]
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed_tokens(tokens)
        if prefix is None:
            for layer in self.layers:
                x, _ = layer.forward_dense(x, positions, inv_freq)
            return self._logits(x)
        xp = self.embed_tokens(prefix[None])
        prefix_positions = jnp.arange(start)[None]
        for layer in self.layers:
            xp, past = layer.forward_dense(xp, prefix_positions, inv_freq)
            x, _ = layer.forward_dense(x, positions, inv_freq, past)
        return self._logits(x)


# Logical axes of each parameter, by the last two names of its path. `pijax.sharding` maps them to
# mesh axes; anything unlisted is replicated.
LOGICAL_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
}
