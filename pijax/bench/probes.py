"""Controlled measurements beside the workload run.

* `measure_ceilings`: the machine's copy bandwidth (a large elementwise pass: one read and one
  write per element) and matmul rate (a large square matmul per dtype), best of a few repeats,
  in this process, on this device. They set the decode roofline floor.
* `long_arrival_probe`: D requests decoding steadily, then one long prompt arrives. Gives the
  steady decode step time (for the roofline) and the inter-token latency of the running decodes
  before the arrival and while the long prompt is prefilled (chunked or not).
* `unloaded_ttft`: one request at a time (scaffold + a claim), so TTFT is pure prefill time,
  with or without the scaffold's KV reused.
* `prefix_burst`: many scaffold + claim requests arriving together on a warm engine (the
  scaffold prefilled once before), so TTFT includes queueing behind the others' prefills.
* `decode_roofline`: floor = max(bytes moved / bandwidth, FLOPs / matmul rate) for a decode
  step of D sequences at their context lengths; bytes moved = weights read once + KV read.
* `overlap_idle_probe`: the same steady decode batch with overlapped scheduling on and off; per
  step the dispatch and ready times (`StepTimer`), and the share of wall time the device sat
  idle between a step's result and the next step's dispatch.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pijax.engine import Engine
from pijax.kernels import dispatch
from pijax.kernels.impl import AttentionImpl
from pijax.kernels.paged_attention import tiled
from pijax.kv_pool import bytes_per_token
from pijax.request import PromptSegment, SamplingParams, Scope
from pijax.workload import POLICY_ZONE, Workload


def _best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + first touch
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def measure_ceilings(
    copy_mib: int = 256,
    matmul_n: int = 1024,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    repeats: int = 5,
) -> dict:
    x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
    scale = jax.jit(lambda a: a * 1.0001)  # not a no-op, so nothing is elided
    t = _best_time(scale, x, repeats=repeats)
    out = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "copy_bytes": 2 * x.nbytes,
        "copy_bandwidth_gbs": 2 * x.nbytes / t / 1e9,
        "matmul_n": matmul_n,
        "matmul_tflops": {},
    }
    del x
    mm = jax.jit(lambda a, b: a @ b)
    for name in dtypes:
        a = jnp.ones((matmul_n, matmul_n), name)
        t = _best_time(mm, a, a, repeats=repeats)
        out["matmul_tflops"][name] = 2 * matmul_n**3 / t / 1e12
    return out


# --- the decode roofline --------------------------------------------------------------------------


def model_info(model) -> dict:
    cfg = model.config
    leaves = jax.tree_util.tree_leaves(model.params)
    return {
        "parameters": sum(int(x.size) for x in leaves),
        "parameter_bytes": sum(int(x.nbytes) for x in leaves),
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size,
    }


def model_costs(engine: Engine) -> dict:
    """Bytes and FLOPs that do not depend on the batch: weights read per step, matmul params."""
    cfg = engine.model_config
    leaves = jax.tree_util.tree_leaves(engine.model.params)
    total_bytes = sum(int(x.nbytes) for x in leaves)
    total_params = sum(int(x.size) for x in leaves)
    itemsize = engine.config.dtype.jnp(0).dtype.itemsize
    embed_params = cfg.vocab_size * cfg.hidden_size
    # An untied embedding table is only gathered (one row per token), not read whole.
    untied_embed = 0 if cfg.tie_word_embeddings else embed_params
    return {
        "weight_bytes": total_bytes - untied_embed * itemsize,
        "matmul_params": total_params - untied_embed,
        "kv_bytes_per_token": bytes_per_token(
            cfg, engine.config.cache.kv_cache_dtype, engine.config.dtype.jnp
        ),
    }


def decode_roofline(engine: Engine, ceilings: dict, contexts: list[int], step_s: float) -> dict:
    cfg = engine.model_config
    costs = model_costs(engine)
    d = len(contexts)
    kv_bytes = sum(contexts) * costs["kv_bytes_per_token"]
    bytes_moved = costs["weight_bytes"] + d * cfg.hidden_size * 4 + kv_bytes
    flops = (
        2 * d * costs["matmul_params"]
        + 4 * sum(contexts) * cfg.num_heads * cfg.head_dim * cfg.num_layers
    )
    bw = ceilings["copy_bandwidth_gbs"] * 1e9
    rate = ceilings["matmul_tflops"][engine.config.dtype.value] * 1e12
    floor = max(bytes_moved / bw, flops / rate)
    # What the step actually computes: the batch is padded to its bucket (tokens T, block-table
    # width W). The reference attention gathers the W*page_size context rows for every token; the
    # tiled path gathers each sequence's own pages once, rounded up to its context chunk.
    page = engine.blocks.page_size
    T, S, W = engine.buckets.pick(d, d, -(-max(contexts) // page))
    impl = dispatch.resolve(engine.config.attention_impl)
    if impl is AttentionImpl.TILED:
        chunk = max(1, min(tiled.KV_CHUNK // page, W)) * page
        gathered = sum(-(-c // chunk) * chunk for c in contexts)
    else:
        gathered = T * W * page
    return {
        "sequences": d,
        "mean_context": float(np.mean(contexts)),
        "weight_bytes": costs["weight_bytes"],
        "kv_bytes_read": kv_bytes,
        "bytes_moved": bytes_moved,
        "flops": flops,
        "memory_floor_s": bytes_moved / bw,
        "compute_floor_s": flops / rate,
        "floor_s": floor,
        "bound": "memory" if bytes_moved / bw >= flops / rate else "compute",
        "measured_step_s": step_s,
        "floor_over_measured": floor / step_s,
        "bucket": {"tokens": T, "seqs": S, "width": W},
        "attention": impl.value,
        "kv_bytes_gathered": gathered * costs["kv_bytes_per_token"],
    }


# --- long arrival ---------------------------------------------------------------------------


def long_arrival_probe(
    engine: Engine,
    *,
    decodes: int,
    context: int,
    steady_steps: int,
    long_prompt: int,
    seed: int = 7,
) -> dict:
    """Steady decode of `decodes` private prompts of `context` tokens, then a `long_prompt`-token
    private prompt arrives. Leaves the engine empty."""
    rng = np.random.default_rng(seed)
    vocab = min(256, engine.model_config.vocab_size)
    room = engine.max_model_len - context
    ids = [f"probe-d{i}" for i in range(decodes)]
    for rid in ids:
        engine.add_request(
            rid,
            rng.integers(0, vocab, context).tolist(),
            SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True),
        )
    times: dict[str, list[float]] = {rid: [] for rid in ids}

    def step() -> list:
        outs = engine.step()
        for o in outs:
            if o.request_id in times:
                times[o.request_id].append(o.timings.token_times[-1])
        return outs

    while min(len(v) for v in times.values()) == 0:  # every prefill done
        step()
    step_s, contexts = [], []
    for _ in range(steady_steps):
        t = time.monotonic()
        step()
        step_s.append(time.monotonic() - t)
        contexts.append([context + len(v) for v in times.values()])
    arrival = time.monotonic()
    engine.add_request(
        "probe-long",
        rng.integers(0, vocab, long_prompt).tolist(),
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
    )
    first = None
    steps_in_window = 0
    while first is None:
        outs = step()
        steps_in_window += 1
        for o in outs:
            if o.request_id == "probe-long":
                first = o.timings.token_times[0]
    for rid in [*ids, "probe-long"]:
        engine.abort(rid)
    before, during = [], []
    for v in times.values():
        for a, b in zip(v, v[1:], strict=False):
            if b <= arrival:
                before.append(b - a)
            elif b <= first:
                during.append(b - a)
    # Only the steady part counts as "before": drop gaps that straddle the end of the prefills.
    before = before[-decodes * (steady_steps - 1) :]
    p99_before = float(np.percentile(before, 99)) if before else None
    p99_during = float(np.percentile(during, 99)) if during else None
    return {
        "decodes": decodes,
        "context": context,
        "long_prompt_tokens": long_prompt,
        "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
        "chunked": engine.config.scheduler.enable_chunked_prefill,
        "steady_step_s": float(np.median(step_s)),
        "steady_contexts": contexts[len(contexts) // 2],
        "itl_p99_before_s": p99_before,
        "itl_p99_during_s": p99_during,
        "itl_max_during_s": max(during, default=None),
        "p99_during_over_before": (p99_during / p99_before if p99_before and p99_during else None),
        "long_prompt_ttft_s": first - arrival,
        # Model steps: with overlapped scheduling a step's token is read one step() call later.
        "steps_while_prefilling": steps_in_window - int(engine.config.scheduler.overlap_scheduling),
    }


# --- unloaded TTFT ---------------------------------------------------------------------------


def unloaded_ttft(engine: Engine, workload: Workload, n: int) -> dict:
    """TTFT of `n` scaffold + claim requests run one at a time (after one unmeasured request,
    so a reusing engine has the scaffold cached as it would in steady state)."""
    convs = workload.conversations
    picks = [convs[-1]] + list(convs[:n])  # the first is the primer
    ttfts = []
    for i, conv in enumerate(picks):
        prompt = [
            PromptSegment(workload.policy, Scope.parse(f"shared:{POLICY_ZONE}")),
            PromptSegment(conv.turns[0].new_tokens, Scope()),
        ]
        rid = f"ttft-{i}"
        engine.add_request(
            rid,
            prompt,
            SamplingParams(temperature=0.0, max_tokens=1),
            tenant=conv.tenant,
            permitted_zones=frozenset({POLICY_ZONE}),
        )
        done = None
        while done is None:
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    done = o
        if i > 0:
            ttfts.append(done.timings.ttft)
    return {
        "requests": n,
        "ttft_p50_s": float(np.median(ttfts)),
        "ttft_mean_s": float(np.mean(ttfts)),
    }


# --- a burst on a shared prefix ------------------------------------------------------------------


def prefix_burst(
    engine: Engine,
    policy: list[int],
    claims: list[list[int]],
    warmup_claim: list[int],
    *,
    output_tokens: int,
    tag: str,
    zone: str = POLICY_ZONE,
) -> dict:
    """One request per claim, each `shared:zone` policy + private claim, all added before the
    first step. A warm-up request (`warmup_claim` after the policy) prefills the policy first (a
    warm server), so with prefix reuse on, every burst request finds it cached. Leaves the engine empty."""
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    shared = PromptSegment(tuple(policy), Scope.parse(f"shared:{zone}"))
    zones = frozenset({zone})

    def run(requests: dict[str, list[int]]) -> dict:
        for rid, claim in requests.items():
            engine.add_request(
                rid, [shared, PromptSegment(tuple(claim))], params, permitted_zones=zones
            )
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        return done

    run({f"{tag}-warm": warmup_claim})
    compiles = engine.compile_count
    start = time.perf_counter()
    outs = list(run({f"{tag}-{i}": c for i, c in enumerate(claims)}).values())
    return {
        "ttft_s": [o.timings.ttft for o in outs],
        "cached_tokens": sum(o.num_cached_tokens for o in outs),
        "prompt_tokens": sum(o.num_prompt_tokens for o in outs),
        "compilations": engine.compile_count - compiles,
        "seconds": time.perf_counter() - start,
    }


# --- prefill FLOP rate ------------------------------------------------------------------------


def prefill_flops_probe(
    engine: Engine, ceilings: dict, prompt_tokens: int, repeats: int = 2, seed: int = 11
) -> dict:
    """Achieved FLOP/s of prefill-only steps beside the matmul rate measured in this run.

    Prompts fill the engine's token budget (each at most `prompt_tokens`, private and random, so
    nothing is reused) and every step is prefill only; the time is from the first step to the
    first token of the last prompt, best of `repeats` on the warm engine. FLOPs count what the
    model must do, not what the padded shapes cost: 2 x (non-embedding matmul params) per token,
    the LM head once per prompt, and causal attention (4 x heads x head_dim per query-key pair
    within a prompt, per layer). Leaves the engine empty.
    """
    cfg = engine.model_config
    costs = model_costs(engine)
    lm_head = cfg.vocab_size * cfg.hidden_size
    budget = engine.config.scheduler.max_num_batched_tokens
    n = max(1, budget // prompt_tokens)
    lengths = [min(prompt_tokens, engine.max_model_len - 1)] * n
    rng = np.random.default_rng(seed)
    vocab = min(256, cfg.vocab_size)
    best, steps = math.inf, 0
    for rep in range(repeats):
        ids = [f"prefill-{rep}-{i}" for i in range(n)]
        for rid, k in zip(ids, lengths, strict=True):
            engine.add_request(
                rid,
                rng.integers(0, vocab, k).tolist(),
                SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
            )
        left, steps = set(ids), 0
        t = time.perf_counter()
        while left:
            for o in engine.step():
                left.discard(o.request_id)
            steps += 1
        best = min(best, time.perf_counter() - t)
    tokens = sum(lengths)
    pairs = sum(k * (k + 1) // 2 for k in lengths)
    flops = (
        2 * (costs["matmul_params"] - lm_head) * tokens
        + 2 * lm_head * n
        + 4 * pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers
    )
    rate = ceilings["matmul_tflops"][engine.config.dtype.value] * 1e12
    achieved = flops / best
    return {
        "prompts": n,
        "prompt_tokens": lengths[0],
        "max_num_batched_tokens": budget,
        "steps": steps,
        "seconds": best,
        "flops": flops,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": rate / 1e12,
        "achieved_over_matmul_rate": achieved / rate,
    }


# --- overlapped scheduling: device idle between steps -----------------------------------------


class StepTimer:
    """Dispatch and ready times of each step, for `Engine.on_dispatch`.

    The engine calls it with a step's device result right after the dispatch returns (stamped
    as `dispatch`). A waiter thread blocks on each result in turn and stamps when it is ready;
    nothing else waits for it, so the engine's loop and outputs are those of an unmeasured run.
    `ready` is late by the waiter's wake-up (it needs the GIL: `overlap_idle_probe` shortens
    the switch interval while it measures), so idle gaps read short by about that much; the
    dispatch stamp comes after the call returns, so they read long by the call's own time.
    `ready_at_dispatch[i]`: step i-1's result was already ready when step i was dispatched (the
    device had run dry), checked without waiting.
    """

    def __init__(self):
        self.dispatch: list[float] = []
        self.ready: list[float] = []
        self.ready_at_dispatch: list[bool] = []
        self._last: jax.Array | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._wait, name="step-timer", daemon=True)
        self._thread.start()

    def __call__(self, packed: jax.Array) -> None:
        self.dispatch.append(time.perf_counter())
        if self._last is not None:
            self.ready_at_dispatch.append(self._last.is_ready())
        self._last = packed
        self._queue.put(packed)

    def _wait(self) -> None:
        while (packed := self._queue.get()) is not None:
            packed.block_until_ready()
            self.ready.append(time.perf_counter())

    def close(self) -> None:
        """Waits for every dispatched step's result."""
        self._queue.put(None)
        self._thread.join()
        self._last = None

    def summary(self) -> dict:
        """idle = sum over consecutive steps of max(0, dispatch[N+1] - ready[N]); wall = first
        dispatch to last ready; idle_share = idle / wall."""
        d, r = self.dispatch, self.ready
        gaps = [max(0.0, d[i + 1] - r[i]) for i in range(len(d) - 1)]
        wall = r[-1] - d[0]
        return {
            "steps": len(d),
            "wall_s": wall,
            "idle_s": sum(gaps),
            "idle_share": min(1.0, sum(gaps) / wall) if wall > 0 else 0.0,
            "period_s_median": float(np.median(np.diff(r))) if len(r) > 1 else None,
            "idle_gap_s_median": float(np.median(gaps)) if gaps else None,
            "ran_dry_share": (
                float(np.mean(self.ready_at_dispatch)) if self.ready_at_dispatch else 0.0
            ),
        }


def _settle_steps(decodes: int, prompt_tokens: int, budget: int) -> int:
    """Steps until every prefill of the steady decode batch is done (with a margin)."""
    return -(-decodes * prompt_tokens // budget) + 2


def fit_steady_decode(
    engine: Engine, decodes: int, prompt_tokens: int, steps: int
) -> tuple[int, int, int]:
    """(decodes, prompt_tokens, steps), each at most as asked, that fit the engine: no more
    sequences than `max_num_seqs`, every sequence's prompt and output within `max_model_len`,
    and all of them in the pool at once (so nothing is preempted while timed)."""
    sched = engine.config.scheduler
    page = engine.blocks.page_size
    decodes = max(1, min(decodes, sched.max_num_seqs))
    prompt_tokens = max(1, min(prompt_tokens, engine.max_model_len // 4))
    per_seq = min(engine.max_model_len, engine.blocks.num_usable_pages // decodes * page)
    settle = _settle_steps(decodes, prompt_tokens, sched.max_num_batched_tokens)
    steps = min(steps, per_seq - prompt_tokens - settle - 4)
    if steps < 2:
        raise ValueError(
            f"the engine is too small for a steady decode of {decodes} sequences "
            f"(max_model_len={engine.max_model_len}, {engine.blocks.num_usable_pages} pages)"
        )
    return decodes, prompt_tokens, steps


def steady_decode_timing(
    engine: Engine,
    *,
    decodes: int,
    prompt_tokens: int,
    steps: int,
    seed: int = 13,
    switch_interval_s: float = 1e-4,
) -> tuple[dict, dict[str, list[int]]]:
    """`decodes` private random prompts of `prompt_tokens` tokens, greedy; once every one has its
    first token, the next `steps` engine steps are timed (`StepTimer`); then they run to the end.
    Returns (the timer's summary, each request's output tokens). Leaves the engine empty."""
    rng = np.random.default_rng(seed)
    vocab = min(256, engine.model_config.vocab_size)
    budget = engine.config.scheduler.max_num_batched_tokens
    settle = _settle_steps(decodes, prompt_tokens, budget)
    max_tokens = settle + steps + 4  # nobody finishes inside the timed window
    if decodes > engine.config.scheduler.max_num_seqs:
        raise ValueError(
            f"decodes must be <= max_num_seqs={engine.config.scheduler.max_num_seqs}; got {decodes}"
        )
    ids = [f"overlap-{i}" for i in range(decodes)]
    for rid in ids:
        engine.add_request(
            rid,
            rng.integers(0, vocab, prompt_tokens).tolist(),
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        )
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    finished: set[str] = set()

    def step() -> None:
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            if o.finished:
                finished.add(o.request_id)

    while not all(tokens.values()):
        step()
    timer = StepTimer()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    engine.on_dispatch = timer
    try:
        for _ in range(steps):
            step()
    finally:
        engine.on_dispatch = None
        timer.close()
        sys.setswitchinterval(old_interval)
    in_window = len(finished)
    while engine.has_unfinished_requests():
        step()
    summary = timer.summary()
    summary["finished_in_window"] = in_window
    return summary, tokens


def overlap_idle_probe(
    make_engine: Callable[[bool], Engine],
    *,
    decodes: int = 16,
    prompt_tokens: int = 64,
    steps: int = 64,
    repeats: int = 3,
    seed: int = 13,
) -> dict:
    """The device's idle share of wall time between steps in steady decode, overlapped
    (`overlap_scheduling=True`) and synchronous, on the same requests in one run. The sizes are
    upper bounds: a small engine gets what fits it (`fit_steady_decode`; the result says which).

    `make_engine(overlap)` returns a warm engine (one per mode). The modes alternate, `repeats`
    times, each repeat on new prompts; a mode's `idle_share` pools its repeats (all idle time
    over all timed wall time), and `runs` keeps each repeat's figures. `idle_share` is the
    overlapped figure (the goal: <= 5%), `sync_idle_share` the synchronous loop's;
    `outputs_equal`: both modes produced the same tokens in every repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    engines = {}
    for mode, overlap in (("sync", False), ("overlap", True)):
        engines[mode] = make_engine(overlap)
        if engines[mode].config.scheduler.overlap_scheduling != overlap:
            raise ValueError(f"make_engine({overlap}) returned an engine with the other mode")
    decodes, prompt_tokens, steps = fit_steady_decode(
        engines["sync"], decodes, prompt_tokens, steps
    )
    out: dict = {
        "decodes": decodes,
        "prompt_tokens": prompt_tokens,
        "steps": steps,
        "repeats": repeats,
    }
    runs: dict[str, list[dict]] = {"sync": [], "overlap": []}
    equal = True
    for rep in range(repeats):
        tokens = {}
        for mode, engine in engines.items():
            summary, tokens[mode] = steady_decode_timing(
                engine,
                decodes=decodes,
                prompt_tokens=prompt_tokens,
                steps=steps,
                seed=seed + rep,
            )
            runs[mode].append(summary)
        equal = equal and tokens["overlap"] == tokens["sync"]
    del engines
    for mode, rs in runs.items():
        wall = sum(r["wall_s"] for r in rs)
        idle = sum(r["idle_s"] for r in rs)
        out[mode] = {
            "steps": sum(r["steps"] for r in rs),
            "wall_s": wall,
            "idle_s": idle,
            "idle_share": min(1.0, idle / wall) if wall > 0 else 0.0,
            "period_s_median": float(np.median([r["period_s_median"] for r in rs])),
            "ran_dry_share": float(np.mean([r["ran_dry_share"] for r in rs])),
            "finished_in_window": sum(r["finished_in_window"] for r in rs),
            "runs": rs,
        }
    out["idle_share"] = out["overlap"]["idle_share"]
    out["sync_idle_share"] = out["sync"]["idle_share"]
    out["outputs_equal"] = equal
    return out
