"""The workload over gRPC against a running server (`scripts/bench.py --target=host:port`).

What a client of `scripts/serve.py` sees, measured at the client: the same request list and the
same arrival driver as in-process, each turn one streaming `Generate` call on a thread of its
own. The policy scaffold is sent as a `shared:policy` segment of token ids and registered as a
trusted prefix first (`RegisterTrustedPrefix`, admin only: with a non-admin key the server's own
trusted prefixes apply, and the results say the registration was refused). Session turns use the
server's sessions (`start_session` on the first turn, `EndSession` after the last).

Differences from the in-process run, stated in the results:
  * a turn's `max_tokens` is its drawn output length (no stop-after-n constraint crosses the
    wire), so a server that reserves for `max_tokens` reserves only what is used;
  * every request carries the API key's tenant, not the workload's tenants;
  * token times are when a streamed message arrived (a message may carry several tokens);
    queue time is the server's (`timings.queue_seconds`);
  * no pool, compilation or preemption figures: those are on the server's metrics endpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import queue
import secrets
import time

import grpc

from pijax.bench.driver import ArrivalDriver, ArrivalSpec, PendingTurn
from pijax.bench.metrics import DEFINITIONS, summarize
from pijax.bench.presets import BenchPreset
from pijax.bench.runner import ProgressBar, RunResult, TurnRecord, turn_kind
from pijax.serving.client import InferenceClient, pb
from pijax.workload import POLICY_ZONE, Workload, generate_workload

REMOTE = "remote"
RPC_TIMEOUT_S = 600.0


@dataclasses.dataclass
class _Done:
    pending: PendingTurn
    record: TurnRecord | None  # None: refused or failed
    output_ids: list[int]
    error: str = ""
    overloaded: bool = False


def _segments(p: PendingTurn) -> list[pb.PromptSegment]:
    return [
        pb.PromptSegment(
            token_ids=pb.TokenIds(ids=list(seg.content)),
            scope="session" if seg.scope.kind.value == "session" else str(seg.scope),
        )
        for seg in p.prompt
    ]


def turn_request(p: PendingTurn, run_id: str, session_id: str | None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=f"bench{run_id}-{p.request_id}",
        prompt=_segments(p),
        sampling=pb.SamplingParams(temperature=0.0),
        max_tokens=p.output_len,
        ignore_eos=True,
        session_id=session_id or "",
        start_session=session_id is not None and p.turn == 0,
    )


def register_policy(client: InferenceClient, tokens) -> str:
    """'registered', or why not (a non-admin key may not register)."""
    try:
        client.register_trusted_prefix(POLICY_ZONE, token_ids=list(tokens))
    except grpc.RpcError as e:
        return f"refused: {e.code().name}: {e.details()}"
    return "registered"


def run_turn(client: InferenceClient, p: PendingTurn, run_id: str, session_id: str | None) -> _Done:
    try:
        return _run_turn(client, p, run_id, session_id)
    except Exception as e:  # noqa: BLE001 - reported as a failed turn; the run goes on
        return _Done(p, None, [], f"{type(e).__name__}: {e}")


def _run_turn(
    client: InferenceClient, p: PendingTurn, run_id: str, session_id: str | None
) -> _Done:
    try:
        c = client.generate(turn_request(p, run_id, session_id))
    except grpc.RpcError as e:
        code = e.code()
        return _Done(
            p,
            None,
            [],
            f"{code.name}: {e.details()}",
            overloaded=code == grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if not c.token_times:
        return _Done(p, None, [], "no tokens streamed")
    rec = TurnRecord(
        request_id=p.request_id,
        conversation=p.conv.index,
        turn=p.turn,
        kind=turn_kind(p),
        claim_kind=p.conv.kind,
        arrival=p.arrival,
        first_scheduled=c.sent + c.last.timings.queue_seconds,
        token_times=c.token_times,
        finish=c.done,
        prompt_tokens=c.last.usage.prompt_tokens,
        cached_tokens=c.last.usage.cached_prompt_tokens,
    )
    if session_id is not None and p.turn == len(p.conv.turns) - 1:
        try:
            client.end_session(session_id)
        except grpc.RpcError:
            pass  # already gone (e.g. evicted): nothing left to release
    return _Done(p, rec, c.token_ids)


def run_workload(
    client: InferenceClient,
    workload: Workload,
    arrival: ArrivalSpec,
    *,
    name: str = REMOTE,
    bar: ProgressBar | None = None,
) -> tuple[RunResult, list]:
    """Drive the workload through the server; returns the run and the errors seen."""
    nonce = secrets.token_hex(3)  # session ids unique to this run: a rerun opens fresh ones
    done: queue.Queue[_Done] = queue.Queue()
    turns: list[TurnRecord] = []
    errors: list[str] = []
    start = time.monotonic()
    driver = ArrivalDriver(workload, arrival, start)
    workers = max(1, min(256, len(workload.conversations)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bench-client") as pool:
        inflight = 0
        while not driver.done:
            for p in driver.due(time.monotonic()):
                sid = f"bench{nonce}-{p.conv.session_id}" if p.conv.session_id else None
                pool.submit(lambda p=p, sid=sid: done.put(run_turn(client, p, nonce, sid)))
                inflight += 1
            nxt = driver.next_time()
            wait = 0.5 if nxt is None else max(0.0, min(0.5, nxt - time.monotonic()))
            if inflight == 0 and nxt is None:
                break
            try:
                d = done.get(timeout=wait)
            except queue.Empty:
                continue
            inflight -= 1
            if d.record is None:
                errors.append(f"{d.pending.request_id}: {d.error}")
                driver.dropped(d.pending, time.monotonic())
                continue
            turns.append(d.record)
            driver.finished(d.pending, d.record.finish, d.output_ids)
            if bar is not None:
                bar.update(1)
    end = time.monotonic()
    run = RunResult(
        name=name,
        start=start,
        end=end,
        turns=turns,
        steps=[],
        conversations_done=driver.num_done,
        conversations_dropped=driver.num_dropped,
        compiles_during_run=None,
        preemptions=None,
        prefix=None,
    )
    return run, errors


def run_remote(
    preset: BenchPreset, target: str, *, api_key: str | None, progress: bool | None, note: str = ""
) -> tuple[dict, dict[str, RunResult]]:
    """The preset's workload against the server at `target`; results shaped like a suite run's
    (`mode: remote`; no baselines, probes or ceilings)."""
    from pijax.bench.runner import show_progress
    from pijax.bench.suite import environment

    client = InferenceClient(target, api_key, timeout_s=RPC_TIMEOUT_S)
    try:
        info = client.model_info()
        lo, hi = preset.workload.token_range
        if hi > info.vocab_size:
            raise ValueError(
                f"the workload draws token ids in [{lo}, {hi}); the server's model "
                f"has vocab_size={info.vocab_size}"
            )
        workload = generate_workload(preset.workload)
        registration = register_policy(client, workload.policy)
        t0 = time.monotonic()
        bar = ProgressBar(show_progress(progress), workload.num_requests, REMOTE)
        try:
            run, errors = run_workload(client, workload, preset.arrival, bar=bar)
        finally:
            bar.close()
    finally:
        client.close()
    summary = summarize(run)
    results = {
        "schema_version": 1,
        "mode": REMOTE,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "preset": preset.to_dict(),
        "engine_overrides": {},
        "environment": {**environment(), "client_only": True},
        "caveat": (
            "Client-side figures over gRPC; the server's device is not known to the "
            f"client (name it with --note). {note}"
        ).strip(),
        "server": {
            "target": target,
            "model": info.model,
            "architecture": info.architecture,
            "context_length": info.context_length,
            "page_size": info.page_size,
            "kv_cache_dtype": info.kv_cache_dtype,
            "num_pages": info.num_pages,
            "max_num_seqs": info.max_num_seqs,
            "mesh_shape": list(info.mesh_shape),
            "tenant": info.tenant,
            "policy_registration": registration,
        },
        "workload": workload.summary(),
        "arrival": preset.arrival.describe(),
        "definitions": {**DEFINITIONS, "remote": __doc__.split("Differences", 1)[1].strip()},
        "configs": {
            REMOTE: {
                "engine": {},
                "summary": summary,
                "errors": errors[:20],
                "num_errors": len(errors),
            }
        },
        "ratios": {},
        "goals": [],
        "wall_s": time.monotonic() - t0,
    }
    return results, {REMOTE: run}
