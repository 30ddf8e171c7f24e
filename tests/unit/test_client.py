"""`pijax.serving.client` without a server: keys, deadlines and argument checks. Calls against a
running server are covered by the review agent (tests/serving/test_scripts.py) and the bench's
remote driver (tests/bench/test_bench_remote.py)."""

import pytest

from pijax.serving.client import API_KEY_ENV, DEV_MODE_KEY, Completion, InferenceClient, pb

TARGET = "127.0.0.1:1"  # channels connect lazily: nothing is dialled here


def test_api_key_argument_then_environment_then_dev_mode(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with InferenceClient(TARGET) as c:
        assert c.metadata == (("authorization", f"Bearer {DEV_MODE_KEY}"),)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    with InferenceClient(TARGET) as c:
        assert c.metadata == (("authorization", "Bearer from-env"),)
    with InferenceClient(TARGET, api_key="given") as c:
        assert c.metadata == (("authorization", "Bearer given"),)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="timeout_s"):
        InferenceClient(TARGET, timeout_s=0)
    with InferenceClient(TARGET) as c:
        with pytest.raises(ValueError, match="exactly one of text or token_ids"):
            c.register_trusted_prefix("policy")
        with pytest.raises(ValueError, match="exactly one of text or token_ids"):
            c.register_trusted_prefix("policy", text="x", token_ids=[1])


def test_completion_figures():
    last = pb.GenerateResponse(finish_reason=pb.FinishReason.Value("FINISH_REASON_LENGTH"))
    c = Completion("ab", [1, 2], [10.5, 10.5], sent=10.0, done=11.0, last=last)
    assert c.ttft_s == 0.5 and c.total_s == 1.0 and c.finish == "length"
    empty = Completion("", [], [], sent=10.0, done=12.0, last=last)
    assert empty.ttft_s == 2.0  # no token: the whole call
