"""Per-token host work that does not grow with the output: deltas carry only what is new, stop
strings are searched in a window, token lists are extended in place; and the offline API at any
size, in input order."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pijax import FinishReason, SamplingParams
from pijax.request import OutputText, Request

FREE = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True)


def stream(llm, prompt, params):
    engine = llm.engine
    rid = f"stream-{random.random()}"
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    return outs


def greedy_text(llm, prompt):
    return llm.generate([prompt], FREE)[0].text


def test_deltas_carry_only_what_is_new_and_the_final_output_everything(tiny_llm):
    outs = stream(tiny_llm, "delta", FREE)
    *deltas, last = outs
    assert last.finished and all(not d.finished for d in deltas)
    for d in deltas:
        assert d.token_ids == [] and d.text == ""
        assert len(d.new_token_ids) == 1 and len(d.logprobs) == 1
    ids = [t for o in outs for t in o.new_token_ids]
    assert last.token_ids == ids and len(ids) == FREE.max_tokens
    assert last.text == "".join(o.new_text for o in outs)
    assert last.text == tiny_llm.tokenizer.decode(ids)
    assert last.logprobs == [lp for d in deltas for lp in d.logprobs] + last.logprobs[-1:]
    assert len(last.logprobs) == FREE.max_tokens


@pytest.mark.parametrize("stop_len", [1, 3, 5])
def test_stop_string_spanning_deltas(tiny_llm, stop_len):
    text = greedy_text(tiny_llm, "spanning")
    start = 4
    if len(text) < start + stop_len + 1:
        pytest.skip(f"greedy text too short to cut a stop string from: {text!r}")
    stop = text[start : start + stop_len]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=(stop, "\x00zz"))
    outs = stream(tiny_llm, "spanning", params)
    last = outs[-1]
    want = text[: text.find(stop)]
    assert last.finish_reason is FinishReason.STOP
    assert last.text == want
    streamed = "".join(o.new_text for o in outs)
    assert streamed == want, "the held-back prefix must never be streamed past the stop"
    if stop_len > 1:
        assert any(o.new_text for o in outs[:-1]) or len(want) < stop_len


def test_output_text_window_matches_whole_text_search():
    """OutputText (window search, held-back tail) against searching the whole text each time."""
    rng = random.Random(0)
    for _ in range(300):
        alphabet = "abc"
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        )
        deltas = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(12)
        ]
        ot, whole, streamed, stopped = OutputText(stops), "", [], False
        for d in deltas:
            whole += d
            stopped = ot.add(d)
            streamed.append(ot.take(final=stopped))
            if stopped:
                break
        if not stopped:
            streamed.append(ot.take(final=True))
        hits = [whole.find(s) for s in stops if whole.find(s) >= 0]
        want = whole[: min(hits)] if hits else whole
        assert stopped == bool(hits)
        assert ot.text == want and "".join(streamed) == want


def test_all_token_ids_is_extended_in_place():
    req = Request("r", [1, 2, 3], SamplingParams(), eos_token_ids=(0,), seed=0)
    first = req.all_token_ids
    assert first == [1, 2, 3]
    for t in (7, 8, 9):
        req.output_token_ids.append(t)
        assert req.all_token_ids is first, "no concatenation per token"
        assert req.all_token_ids == req.prompt_token_ids + req.output_token_ids


def test_generate_more_prompts_than_the_waiting_queue_in_input_order(tiny_llm):
    """> 1,024 prompts: more than the engine's bounded waiting queue takes at once."""
    n = 1100
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, size=int(k)).tolist() for k in rng.integers(1, 6, size=n)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(len(o.token_ids) == 1 for o in outs)
    # Order is by input, not by finishing: a few outputs equal the prompt run alone.
    for i in (0, 517, n - 1):
        assert tiny_llm.generate([prompts[i]], params)[0].token_ids == outs[i].token_ids
    assert not tiny_llm.engine.has_unfinished_requests()


def test_generate_refuses_a_too_long_prompt_before_queueing_any(tiny_llm):
    from pijax import InvalidRequestError

    limit = tiny_llm.engine.max_model_len
    prompts = [[5, 6], [7] * limit, [8]]
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        tiny_llm.generate(prompts, SamplingParams(max_tokens=4))
    assert not tiny_llm.engine.has_unfinished_requests()


def test_progress_bar_degrades_without_tqdm(monkeypatch):
    import builtins

    from pijax.engine import progress_bar

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with progress_bar(True, 3, "x") as bar:
        bar.update(1)
    with progress_bar(False, 3, "x") as bar:
        bar.update(1)
