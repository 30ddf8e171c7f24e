"""Generate with pijax. With no flags: the embedded default model reviews a sample claim.

    python scripts/generate.py                                   # review a synthetic sample claim
    python scripts/generate.py --claim_index 4                   # another sample claim
    python scripts/generate.py --prompt "Claim 123: ..." --max_tokens 64
    python scripts/generate.py --model path/to/hf_checkpoint --prompt a --prompt b --temperature 0.7

The review renders the claim in the prompt format the default model was trained on
(`pijax.claims.prompt`: policy scaffold, claim, `<|review|>`), decodes the findings JSON under the
findings schema (`configs/schemas/findings.schema.json`) as a token constraint, and prints the
claim, the findings, the investigator narrative and whether the flags match the rules' answer.
The claims are synthetic (`pijax.claims`); no real patient data is involved.
"""

from __future__ import annotations

import json
import logging
import time

from absl import app, flags

from pijax import LLM, SamplingParams, distributed
from pijax import flags as engine_flags
from pijax.claims import evaluate
from pijax.claims.prompt import answer_text, policy_scaffold, render_claim, render_prompt
from pijax.claims.samples import SAMPLE_INDEX, sample_example
from pijax.claims.schema import is_valid_findings

FLAGS = flags.FLAGS
engine_flags.define_engine_flags(exclude=["seed"])  # --seed here is the sampling seed
distributed.define_flags()  # multi-host: --coordinator_address, --num_processes, --process_id
flags.DEFINE_multi_string(
    "prompt", None, "Prompt text (repeatable). Default: review a sample claim."
)
flags.DEFINE_integer("claim_index", SAMPLE_INDEX, "Which synthetic sample claim to review.")
flags.DEFINE_bool("structured", True, "Constrain the review to the findings JSON schema.")
flags.DEFINE_integer(
    "max_tokens",
    None,
    "Tokens to generate per prompt (default: 64 for --prompt, 512 for a review).",
)
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_integer("seed", None, "Sampling seed (same seed, same output).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence.")


def sampling_params(default_max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
        max_tokens=FLAGS.max_tokens or default_max_tokens,
        ignore_eos=FLAGS.ignore_eos,
    )


def format_findings(obj: dict) -> str:
    """The findings without the narrative, one flag per line."""
    flag_lines = [f"    {json.dumps(f)}" for f in obj.get("flags", [])]
    rows = [
        "{",
        f'  "claim_id": {json.dumps(obj.get("claim_id"))},',
        '  "flags": [' + ("\n" + ",\n".join(flag_lines) + "\n  ]," if flag_lines else "],"),
    ]
    rows += [f'  "{k}": {json.dumps(obj.get(k))},' for k in ("risk_category", "recommended_action")]
    rows[-1] = rows[-1].rstrip(",")
    return "\n".join(rows + ["}"])


def review_sample(llm: LLM, source: str) -> None:
    example = sample_example(FLAGS.claim_index)
    prompt = render_prompt(policy_scaffold(), example.claim)
    start = time.perf_counter()
    text = evaluate.engine_texts(
        llm,
        [prompt],
        FLAGS.max_tokens or 512,
        constrained=FLAGS.structured,  # the findings schema as structured output
        params=sampling_params(512),
    )[0]
    elapsed = time.perf_counter() - start
    print(f"model: {source}")
    print("\n=== claim (synthetic) ===")
    print(render_claim(example.claim))
    mode = "schema-constrained" if FLAGS.structured else "unconstrained"
    print(f"\n=== findings ({mode}, {elapsed:.1f} s incl. compilation) ===")
    try:
        obj = json.loads(answer_text(text))
    except json.JSONDecodeError:
        print(text)
        print("\n(not valid JSON: the answer ran out of tokens or the model is not a reviewer)")
        return
    print(format_findings(obj) if isinstance(obj, dict) else text)
    if isinstance(obj, dict) and "narrative" in obj:
        print(f"\n=== narrative ===\n{obj['narrative']}")
    truth = sorted(example.findings.flag_keys(), key=lambda k: k[1])
    score = evaluate.score_answer(text, example)
    verdict = "match" if score.flags_match else "do NOT match"
    shown = ", ".join(f"{code} on line {line}" for code, line in truth) or "no flags"
    print(
        f"\nschema-valid: {'yes' if is_valid_findings(obj) else 'no'}; the flags {verdict} "
        f"the rules' answer ({shown})."
    )


def complete_prompts(llm: LLM, prompts: list[str]) -> None:
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling_params(64))
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"=== prompt ({len(out.prompt_token_ids)} tokens) ===\n{prompt}")
        print(f"=== completion ({len(out.token_ids)} tokens, {out.finish_reason.value}) ===")
        print(out.text)
    n = sum(len(o.token_ids) for o in outs)
    print(
        f"--- {n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s incl. compilation; "
        f"{llm.engine.compile_count} compilations)"
    )


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    try:  # before anything touches a device
        cluster = distributed.initialize_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    llm = LLM(engine_flags.model_source(), **engine_flags.engine_overrides())
    if cluster is not None and not cluster.is_leader:  # run process 0's steps, print nothing
        distributed.run_worker(llm.engine)
        return
    if FLAGS.prompt:
        complete_prompts(llm, FLAGS.prompt)
    else:
        review_sample(llm, FLAGS.model or "the embedded default model (pijax/data/default_model)")


if __name__ == "__main__":
    app.run(main)
