"""A payment-integrity review agent: a gRPC client of `scripts/serve.py`.

    python scripts/serve.py --insecure_dev_mode                 # terminal 1
    python scripts/review_claims.py --num_claims 3              # terminal 2

For each claim (synthetic, from the `pijax.claims` generator, or `--claims FILE`, a JSON list of
{"claim_id", "text"}), the agent

1. asks for structured findings: the policy scaffold as a `shared:policy` segment (computed once
   and reused across claims and tenants permitted the zone), the claim as a `private` segment,
   constrained by the findings JSON schema;
2. opens a session and runs a tool-calling investigation (`pijax.claims.agent`, the turns the
   default model is trained on): the model calls tools (`policy(FLAG_TYPE)`, `fee(CODE)`), the
   agent runs the calls it parsed as FAKE lookups (clearly labelled: synthetic tables, no real
   data), and the model writes the investigator's narrative; the second turn reuses the first
   turn's KV (see "cached" in the summary);
3. prints the findings, the narrative and a latency summary; for generated claims (whose truth
   is the rules' answer), the review figures too: claim id exact, flags match, per-flag precision
   and recall, action accuracy, exact match, the narrative citing each flagged line's policy.

On the random-weight preset the text is noise (the findings still parse when they finish: that is
the schema constraint at work); the embedded default model writes readable reviews.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import jsonschema
from absl import app, flags

from pijax.claims import agent, evaluate
from pijax.claims.corpus import Example, generate_examples
from pijax.claims.prompt import policy_scaffold, render_claim_segment, render_policy_segment
from pijax.serving.client import Completion, InferenceClient, pb

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the pijax server.")
flags.DEFINE_string("api_key", None, "API key (default: $PIJAX_API_KEY; unused in dev mode).")
flags.DEFINE_string(
    "claims",
    None,
    "JSON file: a list of {claim_id, text}. Default: synthetic claims from pijax.claims.",
)
flags.DEFINE_string(
    "policy",
    None,
    "Text file with the policy scaffold (default: the one of pijax.claims).",
)
flags.DEFINE_integer("num_claims", 3, "How many claims to review.")
flags.DEFINE_integer("seed", 7, "Seed of the synthetic claims.")
flags.DEFINE_string(
    "schema",
    None,
    "Findings JSON schema file (default: the packaged configs/schemas/findings.schema.json).",
)
flags.DEFINE_integer("max_tokens", 768, "Token budget of the findings answer.")
flags.DEFINE_integer("tool_call_tokens", 64, "Token budget of the model's tool-call turn.")
flags.DEFINE_integer("narrative_tokens", 160, "Token budget of the narrative turn.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("concurrency", 1, "Claims reviewed at the same time.")
flags.DEFINE_float("timeout_s", 300.0, "Deadline of each RPC.")

POLICY_ZONE = "policy"


@dataclasses.dataclass(frozen=True)
class Options:
    target: str
    api_key: str | None = None
    claims_file: str | None = None
    policy_file: str | None = None
    num_claims: int = 3
    seed: int = 7
    schema_file: str | None = None
    max_tokens: int = 768
    tool_call_tokens: int = 64
    narrative_tokens: int = 160
    temperature: float = 0.0
    concurrency: int = 1
    timeout_s: float = 300.0


@dataclasses.dataclass(frozen=True)
class Case:
    claim_id: str
    policy_text: str  # the shared scaffold, identical for every claim
    claim_text: str
    truth: dict | None = None  # rule-derived findings, when the corpus generator made the claim
    example: Example | None = None  # the generated claim and its truth (for the figures)


class CallKind(enum.StrEnum):
    REVIEW = "review"  # the schema-constrained findings
    TOOL_CALL = "tool_call"  # session turn one: the model asks for lookups
    NARRATIVE = "narrative"  # session turn two: the investigator's narrative


@dataclasses.dataclass
class CallStats:
    kind: CallKind
    client_ttft_s: float
    client_total_s: float
    server_ttft_s: float
    server_total_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish: str


@dataclasses.dataclass
class Result:
    case: Case
    findings_text: str = ""
    findings: dict | None = None
    schema_valid: bool | None = None
    findings_token_ids: list[int] = dataclasses.field(default_factory=list)
    narrative: str = ""
    tool_calls: str = ""
    tool_output: str = ""
    session_id: str = ""
    calls: list[CallStats] = dataclasses.field(default_factory=list)
    error: str = ""


# --- inputs ---------------------------------------------------------------------------------------


def load_cases(opts: Options) -> list[Case]:
    cases = _cases(opts)
    if opts.policy_file:
        policy = Path(opts.policy_file).read_text()
        cases = [dataclasses.replace(c, policy_text=policy) for c in cases]
    return cases


def _cases(opts: Options) -> list[Case]:
    policy = render_policy_segment(policy_scaffold())
    if opts.claims_file:
        items = json.loads(Path(opts.claims_file).read_text())
        return [
            Case(c["claim_id"], policy, _file_claim_segment(c["text"]))
            for c in items[: opts.num_claims]
        ]
    return [
        Case(e.claim.claim_id, policy, render_claim_segment(e.claim), e.findings_json(), e)
        for e in generate_examples(opts.seed, opts.num_claims, split="demo")
    ]


def _file_claim_segment(text: str) -> str:
    return f"\nClaim to review:\n{text}\nFindings JSON:\n"


def load_schema(path: str | None) -> tuple[str, dict] | None:
    if path:
        text = Path(path).read_text()
    else:
        from importlib import resources

        file = resources.files("pijax.configs") / "schemas" / "findings.schema.json"
        if not file.is_file():
            return None
        text = file.read_text()
    return text, json.loads(text)


# --- the client -----------------------------------------------------------------------------------


def call_stats(kind: CallKind, c: Completion) -> CallStats:
    return CallStats(
        kind=kind,
        client_ttft_s=c.ttft_s,
        client_total_s=c.total_s,
        server_ttft_s=c.last.timings.time_to_first_token_seconds,
        server_total_s=c.last.timings.total_seconds,
        prompt_tokens=c.last.usage.prompt_tokens,
        cached_tokens=c.last.usage.cached_prompt_tokens,
        completion_tokens=c.last.usage.completion_tokens,
        finish=c.finish,
    )


def policy_scope(client: InferenceClient, policy_text: str, out) -> str:
    """`shared:policy` when the server knows the zone and the key may use it (an admin key
    registers the scaffold itself), else `private` (correct, just not reused)."""
    info = client.model_info()
    print(
        f"server: model {info.model or '?'} ({info.architecture}), context "
        f"{info.context_length} tokens, KV pages of {info.page_size}; tenant {info.tenant}, "
        f"zones {list(info.permitted_zones)}",
        file=out,
    )
    if POLICY_ZONE in info.permitted_zones:
        return f"shared:{POLICY_ZONE}"
    if info.admin:
        client.register_trusted_prefix(POLICY_ZONE, text=policy_text)
        print(
            f"registered the policy scaffold as a trusted prefix of shared:{POLICY_ZONE}", file=out
        )
        return f"shared:{POLICY_ZONE}"
    print(
        f"zone {POLICY_ZONE!r} not available to this key: sending the policy as private", file=out
    )
    return "private"


def sampling(opts: Options, seed: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=opts.temperature, seed=seed)


# --- one claim ------------------------------------------------------------------------------------


def review_claim(
    client: InferenceClient,
    case: Case,
    scope: str,
    schema: tuple[str, dict] | None,
    opts: Options,
    index: int,
) -> Result:
    res = Result(case)
    try:
        _findings(client, case, scope, schema, opts, index, res)
        _investigate(client, case, scope, opts, index, res)
    except grpc.RpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    return res


def _findings(client, case, scope, schema, opts, index, res: Result) -> None:
    request = pb.GenerateRequest(
        request_id=f"review-{index}-{_safe(case.claim_id)}",
        prompt=[
            pb.PromptSegment(text=case.policy_text, scope=scope),
            pb.PromptSegment(text=case.claim_text, scope="private"),
        ],
        max_tokens=opts.max_tokens,
        sampling=sampling(opts, index),
        json_schema=schema[0] if schema else "",
    )
    c = client.generate(request)
    res.calls.append(call_stats(CallKind.REVIEW, c))
    res.findings_text = c.text
    res.findings_token_ids = list(c.token_ids)
    try:
        res.findings = json.loads(c.text)
    except json.JSONDecodeError:
        res.findings = None
    if schema and res.findings is not None:
        res.schema_valid = jsonschema.Draft202012Validator(schema[1]).is_valid(res.findings)


def _investigate(client, case, scope, opts, index, res: Result) -> None:
    """Two session turns (`pijax.claims.agent`): the model calls tools, the agent runs the calls
    it parsed as FAKE lookups, the model writes the narrative. Everything after the policy is in
    the session's scope, so turn two prefills only what turn one did not already compute."""
    findings = (
        pb.PromptSegment(token_ids=pb.TokenIds(ids=res.findings_token_ids), scope="session")
        if res.findings_token_ids
        else pb.PromptSegment(text="(no findings)", scope="session")
    )
    history = [
        pb.PromptSegment(text=case.policy_text, scope=scope),
        pb.PromptSegment(text=case.claim_text, scope="session"),
        findings,
        pb.PromptSegment(text=agent.TOOL_REQUEST, scope="session"),
    ]
    turn1 = pb.GenerateRequest(
        request_id=f"tools-{index}-{_safe(case.claim_id)}",
        prompt=history,
        start_session=True,
        max_tokens=opts.tool_call_tokens,
        sampling=sampling(opts, index),
    )
    c = client.generate(turn1)
    res.calls.append(call_stats(CallKind.TOOL_CALL, c))
    res.session_id = c.last.session_id
    res.tool_calls = c.text
    calls = agent.parse_tool_calls(c.text)
    res.tool_output = agent.tool_output(calls)
    history = [
        *history,
        pb.PromptSegment(token_ids=pb.TokenIds(ids=c.token_ids), scope="session"),
        pb.PromptSegment(text=agent.tool_output_segment(calls), scope="session"),
    ]
    turn2 = pb.GenerateRequest(
        request_id=f"narrative-{index}-{_safe(case.claim_id)}",
        prompt=history,
        session_id=res.session_id,
        max_tokens=opts.narrative_tokens,
        sampling=sampling(opts, index),
    )
    try:
        c = client.generate(turn2)
        res.narrative = c.text
        res.calls.append(call_stats(CallKind.NARRATIVE, c))
    finally:
        client.end_session(res.session_id)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)[:64]


# --- output ---------------------------------------------------------------------------------------


def print_result(res: Result, n: int, total: int, out) -> None:
    case = res.case
    print(f"\n=== claim {case.claim_id} ({n}/{total}) ===", file=out)
    if res.error:
        print(f"error: {res.error}", file=out)
    review = next((c for c in res.calls if c.kind is CallKind.REVIEW), None)
    if review is not None:
        state = {
            True: "valid against the schema",
            False: "INVALID against the schema",
            None: "not validated",
        }[res.schema_valid]
        if res.findings is None:
            state = f"not parseable JSON (finish: {review.finish})"
        print(f"findings ({state}):", file=out)
        print(
            json.dumps(res.findings, indent=2) if res.findings is not None else res.findings_text,
            file=out,
        )
        if case.truth is not None and res.findings is not None:
            got = {
                (f.get("code"), f.get("line"))
                for f in res.findings.get("flags", [])
                if isinstance(f, dict)
            }
            want = {(f["code"], f["line"]) for f in case.truth["flags"]}
            print(
                f"flags match the rule-derived truth: {'yes' if got == want else 'no'} "
                f"(truth: {sorted(want) or 'no flags'})",
                file=out,
            )
    if res.session_id:
        print(f"investigation (session {res.session_id}):", file=out)
        print(f"tool calls: {res.tool_calls.strip() or '(none)'}", file=out)
        print(res.tool_output, file=out)
        print(f"narrative: {res.narrative.strip() or '(empty)'}", file=out)


def summary(results: Sequence[Result], wall_s: float) -> str:
    calls = [c for r in results for c in r.calls]
    out = [f"\n--- latency: {len(results)} claims, {len(calls)} calls in {wall_s:.2f}s ---"]
    for kind in CallKind:
        cs = [c for c in calls if c.kind is kind]
        if not cs:
            continue
        toks = sum(c.completion_tokens for c in cs)
        busy = sum(c.client_total_s for c in cs)
        out.append(
            f"{kind:<10} n={len(cs):<3} TTFT p50 {_pct(cs, 'client_ttft_s', 50):.3f}s "
            f"p90 {_pct(cs, 'client_ttft_s', 90):.3f}s | e2e p50 "
            f"{_pct(cs, 'client_total_s', 50):.3f}s p90 {_pct(cs, 'client_total_s', 90):.3f}s | "
            f"server TTFT p50 {_pct(cs, 'server_ttft_s', 50):.3f}s | "
            f"{toks / busy if busy else 0:.1f} tok/s per stream"
        )
    prompt = sum(c.prompt_tokens for c in calls)
    cached = sum(c.cached_tokens for c in calls)
    out.append(
        f"prompt tokens {prompt}, of which reused from cache {cached} "
        f"({100 * cached / prompt if prompt else 0:.0f}%): shared policy scaffold and "
        "session turns"
    )
    done = sum(1 for r in results if not r.error)
    if wall_s > 0:
        out.append(f"reviewed claims/hour at this concurrency: {3600 * done / wall_s:.0f}")
    return "\n".join(out)


def review_figures(results: Sequence[Result]) -> str:
    """The reviewer's figures over the generated claims (their truth is the rules'): claim id
    exact, flags, per-flag precision and recall, action, exact match, the findings narrative
    citing each flagged line's policy; and whether the agent's narrative after the tool turn
    cites them too. Empty when the claims came from a file (no truth)."""
    scored = [r for r in results if r.case.example is not None and not r.error]
    if not scored:
        return ""
    examples = [r.case.example for r in scored]
    report = evaluate.summarize([r.findings_text for r in scored], examples)
    out = [f"\n--- review figures against the rules' answers ({len(scored)} claims) ---"]
    out.append(evaluate.format_report(report))
    agent = [
        evaluate.narrative_cites(r.narrative, ex) for r, ex in zip(scored, examples, strict=True)
    ]
    agent = [a for a in agent if a is not None]
    if agent:
        out.append(
            f"agent narrative after the tool turn cites every flagged line and its policy: "
            f"{sum(agent)}/{len(agent)} claims with flags"
        )
    return "\n".join(out)


def _pct(calls: Sequence[CallStats], field: str, q: int) -> float:
    values = sorted(getattr(c, field) for c in calls)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- main -----------------------------------------------------------------------------------------


def run(opts: Options, out=sys.stdout) -> list[Result]:
    cases = load_cases(opts)
    schema = load_schema(opts.schema_file)
    client = InferenceClient(opts.target, opts.api_key, opts.timeout_s)
    try:
        scope = policy_scope(client, cases[0].policy_text, out) if cases else "private"
        if schema is None:
            print("no findings schema found: findings are unconstrained", file=out)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, opts.concurrency)) as pool:
            results = list(
                pool.map(
                    lambda ic: review_claim(client, ic[1], scope, schema, opts, ic[0]),
                    enumerate(cases),
                )
            )
        wall = time.perf_counter() - start
    finally:
        client.close()
    for n, res in enumerate(results, 1):
        print_result(res, n, len(results), out)
    figures = review_figures(results)
    if figures:
        print(figures, file=out)
    print(summary(results, wall), file=out)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = Options(
        target=FLAGS.target,
        api_key=FLAGS.api_key,
        claims_file=FLAGS.claims,
        policy_file=FLAGS.policy,
        num_claims=FLAGS.num_claims,
        seed=FLAGS.seed,
        schema_file=FLAGS.schema,
        max_tokens=FLAGS.max_tokens,
        tool_call_tokens=FLAGS.tool_call_tokens,
        narrative_tokens=FLAGS.narrative_tokens,
        temperature=FLAGS.temperature,
        concurrency=FLAGS.concurrency,
        timeout_s=FLAGS.timeout_s,
    )
    try:
        results = run(opts)
    except grpc.RpcError as e:
        sys.exit(f"cannot reach the server at {opts.target}: {e.code().name}: {e.details()}")
    if any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
