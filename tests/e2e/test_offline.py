"""The offline API end to end on the tiny random preset: batching, pages, sampling, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pijax import LLM, FinishReason, InvalidRequestError, SamplingParams
from pijax.request import PromptSegment, Scope, ScopeKind

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 90, size=n)
    return [rng.integers(0, 256, size=int(k)).tolist() for k in lengths]


def test_generate_accepts_text_and_token_ids(tiny_llm):
    outs = tiny_llm.generate(["claim 1", [1, 2, 3]], GREEDY)
    assert [len(o.token_ids) for o in outs] == [12, 12]
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    assert outs[1].prompt_token_ids == [1, 2, 3]
    assert outs[0].text == tiny_llm.tokenizer.decode(outs[0].token_ids)


def test_bos_starts_the_prompt_not_every_text_segment(tiny_llm):
    tok = tiny_llm.tokenizer
    segs = tiny_llm.engine.prompt_segments(
        [PromptSegment("policy", Scope(ScopeKind.SHARED, "policy")), PromptSegment("claim")]
    )
    assert [ids for ids, _ in segs] == [tok.encode("policy"), tok.encode("claim", add_bos=False)]
    assert segs[0][0][0] == tok.bos_token_id and tok.bos_token_id not in segs[1][0]
    assert segs[0][1] == Scope(ScopeKind.SHARED, "policy") and segs[1][1] == Scope()


@pytest.mark.slow
def test_batch_invariance_alone_vs_batch_of_16(tiny_llm):
    prompts = mixed_prompts(16)
    batched = tiny_llm.generate(prompts, GREEDY)
    for i in (0, 5, 11):
        alone = tiny_llm.generate([prompts[i]], GREEDY)[0]
        assert alone.token_ids == batched[i].token_ids


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [8, 32])
def test_page_size_does_not_change_tokens(tiny_llm, page_size):
    prompts = mixed_prompts(6, seed=1)
    ref = tiny_llm.generate(prompts, GREEDY)
    other = LLM(
        "tiny-random",
        page_size=page_size,
        num_pages=4096 // page_size,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=512,
    )
    assert [o.token_ids for o in other.generate(prompts, GREEDY)] == [o.token_ids for o in ref]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llm):
    p = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True
    )
    a = tiny_llm.generate(["same seed"], p)[0]
    batch = tiny_llm.generate(["other", "same seed", "x" * 40], p)
    assert batch[1].token_ids == a.token_ids
    c = tiny_llm.generate(
        ["same seed"], SamplingParams(temperature=0.9, seed=99, max_tokens=10, ignore_eos=True)
    )[0]
    assert c.token_ids != a.token_ids


def test_stop_token_ids_and_max_tokens(tiny_llm):
    free = tiny_llm.generate(["stop here"], GREEDY)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = tiny_llm.generate(
        ["stop here"],
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,)),
    )[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == free.token_ids[: first + 1]


def test_stop_string_truncates_text(tiny_llm):
    free = tiny_llm.generate(
        ["abc"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )[0]
    text = free.text
    if len(text) < 6:
        pytest.skip(f"greedy text too short to cut a stop string from: {text!r}")
    stop = text[3:5]
    out = tiny_llm.generate(
        ["abc"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,))
    )[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == text[: text.find(stop)]


def test_logprobs_are_log_probabilities(tiny_llm):
    out = tiny_llm.generate(
        ["x"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=True)
    )[0]
    assert len(out.logprobs) == 5
    assert all(lp <= 0.0 and np.isfinite(lp) for lp in out.logprobs)


def test_compile_count_constant_after_warmup():
    llm = LLM(
        "tiny-random", num_pages=128, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128
    )
    rng = np.random.default_rng(7)

    def run(n):
        prompts = mixed_prompts(n, seed=int(rng.integers(1000)))
        params = [
            SamplingParams(
                temperature=float(rng.choice([0.0, 0.8])),
                max_tokens=int(rng.integers(1, 20)),
                ignore_eos=True,
                seed=i,
            )
            for i in range(n)
        ]
        llm.generate(prompts, params)

    llm.engine.warmup()
    after_warmup = llm.engine.compile_count
    run(50)
    assert llm.engine.compile_count == after_warmup


BAD_INPUTS = [
    ("", GREEDY, "prompt"),
    ([], GREEDY, "prompt"),
    ([1, 2, 10**6], GREEDY, "prompt token ids"),
    ([-1], GREEDY, "prompt token ids"),
    ("x" * 500, SamplingParams(max_tokens=100), "max_model_len"),
]


@pytest.mark.parametrize("prompt,params,field", BAD_INPUTS)
def test_bad_prompt_is_refused_and_engine_keeps_serving(tiny_llm, prompt, params, field):
    with pytest.raises(InvalidRequestError, match=field):
        tiny_llm.generate(["fine", prompt], params)
    assert not tiny_llm.engine.has_unfinished_requests()
    assert tiny_llm.generate(["fine"], GREEDY)[0].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unreadable_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
