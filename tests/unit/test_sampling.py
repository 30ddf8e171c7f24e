"""`pijax.sampling.sample` against a numpy reference of the same rules.

The reference: mask disallowed tokens, scale by temperature, keep the top-k, then keep the
smallest top-probability prefix whose mass before each token is under top-p, renormalize. Sampled
tokens must lie in that set, with the reference's frequencies over many draws; greedy rows take
the allowed argmax; a row's draw depends only on its seed and position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.sampling import SamplingInput, sample, unpack_bitmask

VOCAB = 40
WORDS = -(-VOCAB // 32)
ALL = np.full(WORDS, -1, np.int32)

sample_jit = jax.jit(sample)


def pack(allowed: np.ndarray) -> np.ndarray:
    """Bool [V] -> int32 bitmask words (bit t of word t // 32)."""
    bits = np.zeros(WORDS * 32, np.uint32)
    bits[: allowed.size] = allowed
    words = (bits.reshape(WORDS, 32) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint64)
    return words.astype(np.uint32).view(np.int32)


def reference_probs(logits, temperature, top_k, top_p, allowed=None) -> np.ndarray:
    """The sampling distribution over the vocabulary (float64)."""
    x = np.asarray(logits, np.float64) / temperature
    if allowed is not None:
        x = np.where(allowed, x, -np.inf)
    order = np.argsort(-x, kind="stable")
    k = VOCAB if top_k == 0 else min(top_k, VOCAB)
    kept = order[:k]
    kept = kept[np.isfinite(x[kept])]
    p = np.exp(x[kept] - x[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    kept, p = kept[before < top_p], p[before < top_p]
    out = np.zeros(VOCAB)
    out[kept] = p / p.sum()
    return out


def inputs(n, *, temperature, top_k=0, top_p=1.0, seed=0, positions=None, mask=ALL):
    return SamplingInput(
        temperature=jnp.full(n, temperature, jnp.float32),
        top_k=jnp.full(n, top_k, jnp.int32),
        top_p=jnp.full(n, top_p, jnp.float32),
        seed=jnp.asarray(np.broadcast_to(seed, n), jnp.int32),
        position=jnp.asarray(np.arange(n) if positions is None else positions, jnp.int32),
        token_bitmask=jnp.asarray(np.broadcast_to(mask, (n, WORDS)), jnp.int32),
    )


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(0, 2.0, VOCAB).astype(np.float32)


def test_unpack_bitmask_matches_numpy_bits():
    rng = np.random.default_rng(1)
    allowed = rng.random((3, VOCAB)) < 0.5
    words = np.stack([pack(a) for a in allowed])
    np.testing.assert_array_equal(np.asarray(unpack_bitmask(jnp.asarray(words), VOCAB)), allowed)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.8), (2.0, 1, 1.0)],
)
def test_draws_follow_the_reference_distribution(logits, temperature, top_k, top_p):
    n = 4000  # one row per draw: the same logits, positions 0..n-1 (fresh randomness each)
    tokens, _ = sample_jit(
        jnp.asarray(np.tile(logits, (n, 1))),
        inputs(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=11),
    )
    want = reference_probs(logits, temperature, top_k, top_p)
    got = np.bincount(np.asarray(tokens), minlength=VOCAB) / n
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want)), "token outside top-k/top-p"
    # Binomial standard error at n=4000 is <= 0.008: 0.035 is over 4 sigma.
    np.testing.assert_allclose(got, want, atol=0.035)


def test_bitmask_restricts_sampled_and_greedy_tokens(logits):
    allowed = np.zeros(VOCAB, bool)
    allowed[[3, 17, 33, 39]] = True
    mask = pack(allowed)
    n = 2000
    x = jnp.asarray(np.tile(logits, (n, 1)))
    tokens, _ = sample_jit(x, inputs(n, temperature=1.0, seed=5, mask=mask))
    got = np.bincount(np.asarray(tokens), minlength=VOCAB) / n
    want = reference_probs(logits, 1.0, 0, 1.0, allowed)
    assert set(np.flatnonzero(got)) <= {3, 17, 33, 39}
    np.testing.assert_allclose(got, want, atol=0.04)
    greedy, _ = sample_jit(x[:1], inputs(1, temperature=0.0, mask=mask))
    assert int(greedy[0]) == int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])


def test_greedy_is_the_argmax_and_logprobs_are_before_temperature():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3.0, (6, VOCAB)).astype(np.float32)
    temps = np.array([0, 0, 0, 0.5, 1.0, 3.0], np.float32)
    p = inputs(6, temperature=0.0, seed=np.arange(6))
    p.temperature = jnp.asarray(temps)
    tokens, logprobs = sample_jit(jnp.asarray(x), p)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[:3], x[:3].argmax(-1))
    shifted = x.astype(np.float64) - x.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        np.asarray(logprobs), log_softmax[np.arange(6), tokens], rtol=1e-5, atol=1e-5
    )


def test_a_draw_depends_on_seed_and_position_only(logits):
    """The same (seed, position) gives the same token alone, in any batch, in any row."""
    n = 64
    rng = np.random.default_rng(3)
    seeds = rng.integers(-(2**31), 2**31 - 1, n)
    positions = rng.integers(0, 10_000, n)
    rows = jnp.asarray(np.tile(logits, (n, 1)))
    batched, _ = sample_jit(rows, inputs(n, temperature=1.0, seed=seeds, positions=positions))
    perm = rng.permutation(n)
    shuffled, _ = sample_jit(
        rows, inputs(n, temperature=1.0, seed=seeds[perm], positions=positions[perm])
    )
    np.testing.assert_array_equal(np.asarray(shuffled), np.asarray(batched)[perm])
    alone, _ = sample_jit(
        rows[:1], inputs(1, temperature=1.0, seed=seeds[:1], positions=positions[:1])
    )
    assert int(alone[0]) == int(batched[0])
    # Different seeds (or positions) do draw differently: not every row gives one token.
    assert len(set(np.asarray(batched).tolist())) > 5
