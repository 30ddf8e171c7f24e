"""The service over models with a `tokenizer.json` tokenizer (the byte tokenizer is covered by
test_service.py): a random checkpoint with a BPE tokenizer, and the shipped default model when
it is in the tree. Structured output must validate; streaming must equal the offline API."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import jsonschema
import pytest
from serving_harness import ENGINE_OVERRIDES, generate, start_server, text_request

import pijax
from pijax import SamplingParams
from pijax.serving.proto.pijax.v1 import inference_pb2 as pb

TEST_SCHEMA = (Path(__file__).parent / "findings_test.schema.json").read_text()
DEFAULT_MODEL = Path(pijax.__path__[0]) / "data" / "default_model"


def random_bpe_checkpoint(tmp_path_factory) -> str:
    from pijax.testing import make_random_checkpoint, tiny_model_config

    path = tmp_path_factory.mktemp("ckpt") / "random-bpe"
    make_random_checkpoint(path, tiny_model_config(max_position_embeddings=1024))
    return str(path)


@pytest.fixture(scope="module", params=["random-bpe", "default-model"])
def model(request, tmp_path_factory):
    from pijax import LLM

    if request.param == "default-model":
        assert (DEFAULT_MODEL / "model.safetensors").is_file(), (
            f"no default model at {DEFAULT_MODEL}"
        )
        source = str(DEFAULT_MODEL)
    else:
        source = random_bpe_checkpoint(tmp_path_factory)
    llm = LLM(source, **ENGINE_OVERRIDES)
    server = start_server(llm.engine, None, model_name=request.param)
    yield request.param, llm, server
    server.stop()


@pytest.mark.slow
def test_streamed_equals_offline(model):
    _, llm, server = model
    prompt = "Claim 4471 billed CPT 99215 with modifier 25."
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    offline = server.on_engine(lambda engine: llm.generate([prompt], params))[0]
    responses = generate(server.stub, text_request(prompt, max_tokens=24, ignore_eos=True))
    assert [t for r in responses for t in r.token_ids] == offline.token_ids
    assert "".join(r.text for r in responses) == offline.text


def review_requests(name: str, llm) -> list[tuple[pb.GenerateRequest, dict]]:
    """20 requests with random seeds, and the schema each answer must validate against."""
    if name == "random-bpe":
        schema = json.loads(TEST_SCHEMA)
        return [
            (
                pb.GenerateRequest(
                    prompt=[pb.PromptSegment(text=f"Review claim C{1000 + i}. JSON:")],
                    max_tokens=440,
                    sampling=pb.SamplingParams(temperature=1.0, seed=i),
                    json_schema=TEST_SCHEMA,
                ),
                schema,
            )
            for i in range(20)
        ]
    from pijax.claims.corpus import generate_examples
    from pijax.claims.prompt import policy_scaffold, render_claim_segment, render_policy_segment
    from pijax.claims.schema import findings_schema

    schema = findings_schema()
    text = json.dumps(schema)
    policy = render_policy_segment(policy_scaffold())
    out = []
    for i, ex in enumerate(generate_examples(seed=0, count=20, split="heldout")):
        claim = render_claim_segment(ex.claim)
        budget = llm.engine.max_model_len - len(llm.tokenizer.encode(policy + claim)) - 8
        out.append(
            (
                pb.GenerateRequest(
                    prompt=[pb.PromptSegment(text=policy), pb.PromptSegment(text=claim)],
                    max_tokens=min(600, budget),
                    sampling=pb.SamplingParams(temperature=1.0, seed=i),
                    json_schema=text,
                ),
                schema,
            )
        )
    return out


def test_structured_output_validates_for_20_seeds(model):
    name, llm, server = model

    def one(item):
        request, schema = item
        responses = generate(server.stub, request)
        return responses[-1].finish_reason, "".join(r.text for r in responses), schema

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, review_requests(name, llm)))
    for i, (reason, text, schema) in enumerate(results):
        assert reason == pb.FINISH_REASON_STOP, (i, text)
        jsonschema.validate(json.loads(text), schema)
