"""On-device sampling: greedy, temperature, top-k, top-p, token masks, per-request seeds.

Everything is batched over sequences with per-sequence parameters, so one compiled step serves
any mix of greedy and sampled requests. Randomness is `fold_in(key(seed), position)`: a request's
draw depends only on its seed and the position of the token, never on its batch neighbours, so
the same seed gives the same output alone, batched, or recomputed after preemption.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingInput:
    temperature: Float[Array, "S"]  # 0 = greedy
    top_k: Int[Array, "S"]  # 0 = off
    top_p: Float[Array, "S"]  # 1 = off
    seed: Int[Array, "S"]  # uint32 bits carried as int32
    position: Int[Array, "S"]  # absolute position of the token being sampled
    token_bitmask: Int[Array, "S VW"]  # bit t of word t // 32 set = token t allowed


def unpack_bitmask(bitmask: Int[Array, "S VW"], vocab_size: int) -> Bool[Array, "S V"]:
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def sample(
    logits: Float[Array, "S V"], p: SamplingInput
) -> tuple[Int[Array, "S"], Float[Array, "S"]]:
    """Returns the sampled token and its log-probability under the model (before temperature)."""
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    allowed = unpack_bitmask(p.token_bitmask, vocab)
    logits = jnp.where(allowed, logits, -jnp.inf)
    logprobs = jax.nn.log_softmax(logits, axis=-1)

    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    # Sort once; top-k and top-p both become masks over the sorted order.
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    keep = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < p.top_p[:, None]  # always keeps the top token
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed, position, row):
        key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), position)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(p.seed, p.position, sorted_logits)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    tokens = jnp.where(p.temperature > 0, sampled, greedy)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_logprobs
