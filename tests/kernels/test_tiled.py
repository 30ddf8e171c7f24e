"""The tiled XLA attention (the CPU path) against the pure-JAX reference, on the kernels' cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pijax.kernels import dispatch
from pijax.kernels.paged_attention import reference, tiled
from pijax.kernels.paged_attention.cases import make_case, mixed_seqs, padded_tokens
from pijax.testing import run_on_cpu_devices

_STATIC = ("sm_scale", "soft_cap", "sliding_window")
tiled_jit = jax.jit(tiled.ragged_paged_attention_tiled, static_argnames=_STATIC)
reference_jit = jax.jit(reference.ragged_paged_attention_reference, static_argnames=_STATIC)


def both(case, **kw):
    args = (*case.args(),)
    got = tiled_jit(*args, **case.scale_kwargs(), **kw)
    want = reference_jit(*args, **case.scale_kwargs(), **kw)
    return np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))


def assert_close(got, want, tol=2e-5):
    scale = np.max(np.abs(want))
    assert scale > 0
    assert np.max(np.abs(got - want)) / scale < tol


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_tiled_matches_reference(group, head_dim, page_size):
    seqs = mixed_seqs(page_size)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        num_tokens=padded_tokens(seqs),
        max_seqs=len(seqs) + 2,
        width=5,
        seed=group * 1000 + head_dim + page_size,
    )
    got, want = both(case, sm_scale=head_dim**-0.5)
    assert_close(got, want)
    total = int(case.cu_q_lens[case.num_seqs])
    assert np.all(got[total:] == 0), "padded rows must be zero"


@pytest.mark.slow
def test_tiled_long_prefill_many_tiles_and_chunks():
    """Prefills spanning several query tiles and context chunks, beside decodes, in one step."""
    page_size = 16
    seqs = [(100, 300), (1, 700), (70, 70), (1, 33), (40, 520)]
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=page_size,
        num_tokens=256,
        max_seqs=8,
        width=48,
        seed=11,
    )
    got, want = both(case, sm_scale=0.125)
    assert_close(got, want)


def test_tiled_many_decodes_more_than_one_batch():
    """More decode sequences than one decode batch, with shuffled tables of different lengths."""
    rng = np.random.default_rng(2)
    seqs = [(1, int(n)) for n in rng.integers(1, 200, size=tiled.DECODE_BATCH + 5)]
    case = make_case(
        seqs, num_kv_heads=2, group=4, head_dim=64, page_size=16, num_tokens=32, max_seqs=32
    )
    got, want = both(case, sm_scale=0.125)
    assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("soft_cap,window", [(30.0, None), (None, 7), (5.0, 20), (None, 300)])
def test_tiled_soft_cap_and_window(soft_cap, window):
    seqs = [*mixed_seqs(16), (90, 400)]
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=16,
        num_tokens=padded_tokens(seqs),
        width=25,
        seed=7,
    )
    got, want = both(case, sm_scale=0.125, soft_cap=soft_cap, sliding_window=window)
    assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("quant_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_tiled_quantized_pages(quant_dtype):
    seqs = mixed_seqs(16)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        page_size=16,
        quantized=True,
        quant_dtype=quant_dtype,
        num_tokens=padded_tokens(seqs),
        width=4,
        seed=3,
    )
    got, want = both(case, sm_scale=0.125)
    assert_close(got, want)


@pytest.mark.slow
def test_tiled_bf16_queries():
    seqs = mixed_seqs(16)
    case = make_case(
        seqs,
        num_kv_heads=2,
        group=8,
        head_dim=128,
        page_size=16,
        dtype=jnp.bfloat16,
        num_tokens=padded_tokens(seqs),
        width=4,
        seed=5,
    )
    got, want = both(case, sm_scale=128**-0.5)
    assert_close(got, want, tol=1e-2)


def test_tiled_all_sequences_padded():
    case = make_case(
        [(2, 3)], num_kv_heads=1, group=2, head_dim=64, page_size=16, num_tokens=8, max_seqs=3
    )
    case = type(case)(
        **{
            **case.__dict__,
            "num_seqs": jnp.asarray(0, jnp.int32),
            "cu_q_lens": jnp.zeros_like(case.cu_q_lens),
            "kv_lens": jnp.zeros_like(case.kv_lens),
            "block_tables": jnp.zeros_like(case.block_tables),
        }
    )
    out = tiled_jit(*case.args(), sm_scale=0.125)
    assert np.all(np.asarray(out) == 0)


@pytest.mark.slow
def test_tiled_padding_gathers_nothing():
    """Keys nobody owns never reach the output: NaN in the null page and in every page outside
    the live tables (padded table entries, padded sequences) changes nothing."""
    seqs = [(20, 50), (1, 17)]
    case = make_case(
        seqs, num_kv_heads=2, group=4, head_dim=64, page_size=16, num_tokens=64, max_seqs=4,
        width=8, num_pages=20, seed=9,
    )  # fmt: skip
    got = np.asarray(tiled_jit(*case.args(), sm_scale=0.125))
    owned = set(np.asarray(case.block_tables)[: len(seqs)].ravel().tolist()) - {0}
    poison = np.asarray(case.k_pages).copy()
    for p in range(poison.shape[0]):
        if p not in owned:
            poison[p] = np.nan
    poisoned = type(case)(**{**case.__dict__, "k_pages": jnp.asarray(poison)})
    got2 = np.asarray(tiled_jit(*poisoned.args(), sm_scale=0.125))
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_array_equal(got[21:], 0)


def test_dispatch_auto_picks_tiled_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks the tiled path on CPU only; this backend is not CPU")
    assert dispatch.resolve(dispatch.AttentionImpl.AUTO) is dispatch.AttentionImpl.TILED
    assert dispatch.AttentionImpl.parse("tiled") is dispatch.AttentionImpl.TILED


# --- the engine through the tiled path ----------------------------------------------------------

ENGINE_PROMPTS = [[5, 6, 7], list(range(30, 110)), list(range(100, 121)), [9] * 17]


def engine_greedy(impl: str, **overrides) -> list[list[int]]:
    from pijax import LLM, SamplingParams

    llm = LLM(
        "tiny-random",
        attention_impl=impl,
        num_pages=48,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_model_len=128,
        page_size=16,
        **overrides,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [o.token_ids for o in llm.generate(ENGINE_PROMPTS, params)]


@pytest.mark.slow
def test_engine_greedy_tiled_equals_reference():
    """Greedy decoding is a sharp check: one wrong attention row in a prefill chunk or a decode
    step changes a later argmax. The 64-token budget forces chunked prefill beside decodes."""
    tiled_out = engine_greedy("tiled")
    assert tiled_out == engine_greedy("reference")
    assert all(len(t) == 8 for t in tiled_out)


@pytest.mark.slow
def test_engine_greedy_tiled_equals_reference_int8_pool():
    assert engine_greedy("tiled", kv_cache_dtype="int8", skip_kv_quant_gate=True) == engine_greedy(
        "reference", kv_cache_dtype="int8", skip_kv_quant_gate=True
    )


SHARDED = """
import json
import jax
from pijax import LLM, SamplingParams
from pijax.kernels import dispatch

calls = []
wrap = dispatch._shard_over_kv_heads
dispatch._shard_over_kv_heads = lambda *a: calls.append(1) or wrap(*a)
prompts = [[5, 6, 7], list(range(40)), list(range(100, 121))]
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
out = {}
for impl, mesh in [("reference", (1, 1)), ("tiled", (1, 4))]:
    llm = LLM("tiny-random-4kv", mesh_shape=mesh, attention_impl=impl, num_pages=64,
              max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
    out[impl] = [o.token_ids for o in llm.generate(prompts, params)]
out["sharded_calls"] = len(calls)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_engine_tiled_on_1x4_mesh_matches_reference():
    result = run_on_cpu_devices(SHARDED, 4)
    assert result["tiled"] == result["reference"]
    assert result["sharded_calls"] > 0, "the tiled path was not wrapped in shard_map"
