"""The engine: requests in, streamed deltas out. `LLM` is the offline API on top.

    engine.add_request("r1", "text", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text)

One `step()` = schedule on the host (an immutable `StepPlan`), build the fixed-shape batch from
it, dispatch the jitted step (one host->device transfer), fold the sampled tokens back in, and emit
deltas. With `overlap_scheduling` (the default) the results read back in a `step()` are those of
the step dispatched by the call before, so the host prepares step N+1 while the device runs step
N (see `Engine.step`); outputs are the same either way. Structured output (`SamplingParams
.json_schema`, `regex`, `grammar`) is compiled here too. All validation happens in `add_request`,
before anything is queued: a bad request raises `InvalidRequestError` (a `ValueError`) naming the
field, and nothing already accepted is disturbed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np

from pijax.audit import AuditLog
from pijax.batch import Buckets, StepInput, build_step_input, result_columns
from pijax.block_manager import BlockManager
from pijax.config import EngineConfig, resolve_compilation_cache_dir
from pijax.distributed import wrap_step
from pijax.kernels import dispatch
from pijax.kernels.impl import AttentionImpl
from pijax.kernels.support import AttentionShape
from pijax.kv_cache_manager import DataShardedKV, KVCacheManager, ShardedBlocks
from pijax.kv_pool import KVPool, allocate_pool, num_pages_for_budget, pool_sharding, scale_sharding
from pijax.model.loader import LoadedModel, load_model
from pijax.model.tokenizer import IncrementalDetokenizer
from pijax.request import (
    FinishReason,
    InvalidRequestError,
    OutputText,
    OverloadedError,
    PromptSegment,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    Scope,
    ScopeKind,
    TokenConstraint,
)
from pijax.scheduler import Scheduler, StepPlan
from pijax.sharding import make_mesh
from pijax.step import StepFunction
from pijax.structured import (
    GrammarKind,
    SchemaCompiler,
    SchemaError,
    UnsupportedTokenizerError,
)

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class StepProbe(Protocol):
    """Runs one step through a variant of `StepFunction` (e.g. `compare_pools`) and records
    what it measures; returns what the plain step returns: (packed results, new pool)."""

    def __call__(
        self, step: StepFunction, plan: StepPlan, params, kv_pool: KVPool, batch: StepInput
    ) -> tuple[jax.Array, KVPool]: ...


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched step whose results have not been read yet."""

    plan: StepPlan
    packed: jax.Array  # the device result (StepFunction.unpack reads it)
    columns: list[int]  # each plan sequence's column in `packed` (`batch.result_columns`)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    pool_usage: float  # used pages / usable pages
    num_free_pages: int
    num_preemptions: int
    compile_count: int
    pages_held_by_prefix_cache: int  # unreferenced cached pages, evictable
    pages_held_by_sessions: int
    waste: float  # allocated but unwritten slots / allocated slots, over running requests
    prefix_queries_by_zone: dict[str, int]
    prefix_hits_by_zone: dict[str, int]
    prefix_tokens_saved: int


def _check_attention_supported(config: EngineConfig, mcfg, mesh, kv_pool) -> None:
    """An explicit kernel impl refuses an unsupported shape here, at start-up, with the message
    the first step would give (shape and supported set); `auto` falls back per shape instead."""
    impl = AttentionImpl.parse(config.attention_impl)
    if impl not in (AttentionImpl.PALLAS, AttentionImpl.PALLAS_INTERPRET):
        return
    kv_shards = mesh.shape["model"]
    shape = AttentionShape(
        num_heads=mcfg.num_heads // kv_shards,
        num_kv_heads=mcfg.num_kv_heads // kv_shards,
        head_dim=mcfg.head_dim,
        page_size=config.cache.page_size,
        q_dtype=np.dtype(config.dtype.jnp).name,
        kv_dtype=kv_pool[0].k.dtype.name,
        sliding_window=mcfg.sliding_window is not None,
    )
    dispatch.check_supported(config.attention_impl, shape)


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig, mesh: jax.sharding.Mesh):
        self.config = config
        self.model = model
        self.model_config = model.config
        self.tokenizer = model.tokenizer
        self.mesh = mesh
        self.max_model_len = min(
            config.scheduler.max_model_len, model.config.max_position_embeddings
        )
        cache = config.cache
        # Data-parallel attention: each of the `data` axis's shards owns `num_pages` pages (the
        # per-device budget buys them on every shard), its own block manager, prefix cache and
        # sessions; the scheduler places each request on one (`DataShardedKV`).
        self.num_data_shards = mesh.shape["data"]
        num_pages = num_pages_for_budget(
            model.mesh_config, cache, config.dtype.jnp, None, kv_shards=mesh.shape["model"]
        )
        # mesh_config: kv heads as the mesh runs them (replicated when fewer than the model axis).
        self.kv_pool = allocate_pool(
            model.mesh_config, cache, num_pages * self.num_data_shards, config.dtype.jnp, mesh
        )
        _check_attention_supported(config, model.mesh_config, mesh, self.kv_pool)
        audit = AuditLog(cache.audit_log_path)
        shards = []
        for _ in range(self.num_data_shards):
            blocks = BlockManager(num_pages, cache.page_size)
            shards.append(
                KVCacheManager(
                    blocks,
                    enable_prefix_reuse=cache.enable_prefix_reuse,
                    audit=audit,
                    session_ttl_s=cache.session_ttl_s,
                    session_max_pages=int(
                        blocks.num_usable_pages * cache.session_max_pages_fraction
                    ),
                )
            )
        self.kv: KVCacheManager | DataShardedKV
        if self.num_data_shards == 1:
            self.kv, self.blocks = shards[0], shards[0].blocks
        else:
            self.kv = DataShardedKV(shards)
            self.blocks = ShardedBlocks([s.blocks for s in shards])  # totals, read-only
        self._shard_blocks = shards[0].blocks  # every shard's size (`check_fits`)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.buckets = Buckets.for_limits(
            config.scheduler.max_num_batched_tokens,
            config.scheduler.max_num_seqs,
            self.max_model_len,
            cache.page_size,
            # Only the reference attention's cost grows with the padded table width.
            width_ladder=dispatch.resolve(config.attention_impl) is not AttentionImpl.TILED,
        )
        quantized = self.kv_pool[0].k_scale is not None
        layer_sh = type(self.kv_pool[0])(
            pool_sharding(mesh),
            pool_sharding(mesh),
            scale_sharding(mesh) if quantized else None,
            scale_sharding(mesh) if quantized else None,
        )
        self._step = wrap_step(  # multi-host: the leader sends each step's input to the workers
            StepFunction(
                model.graphdef,
                mesh,
                tuple(layer_sh for _ in self.kv_pool),
                max_seqs=self.buckets.max_seqs * self.num_data_shards,
            )
        )
        self._inflight: _InFlight | None = None  # the dispatched step not yet read back
        # Timing hook (the bench's overlap probe): called with each step's device result right
        # after its dispatch returns. None (the default) costs one attribute check per step.
        self.on_dispatch: Callable[[jax.Array], None] | None = None
        # Overlap needs the step to read the previous result on the device: single-host only.
        self._overlap = config.scheduler.overlap_scheduling and isinstance(self._step, StepFunction)
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._texts: dict[str, OutputText] = {}  # output text, for stop strings and deltas
        self._arrivals = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)
        self._compiler_lock = threading.Lock()
        self._schema_compiler: SchemaCompiler | None = None
        self._no_structured: str | None = None  # why structured output is unavailable
        log.info(
            "engine ready: %d data shard(s) of %d pages of %d tokens, max_model_len=%d, mesh=%s",
            self.num_data_shards,
            num_pages,
            cache.page_size,
            self.max_model_len,
            dict(mesh.shape),
        )

    @classmethod
    def from_source(cls, source: str, config: EngineConfig | None = None) -> Engine:
        """Build from an HF checkpoint dir, a converted orbax checkpoint dir, or a preset name.
        A quantized KV cache needs a passing gate report for `source` (`quant_gate`), or
        `skip_kv_quant_gate=True` (logged): `LLM`, `serve.py` and every other caller come here."""
        from pijax.quant_gate import enforce_gate

        config = config or EngineConfig()
        cache = config.cache
        enforce_gate(
            cache.kv_cache_dtype, source, cache.kv_quant_gate_report, cache.skip_kv_quant_gate
        )
        use_compilation_cache(resolve_compilation_cache_dir(config.compilation_cache_dir))
        mesh = make_mesh(config.mesh_shape)
        model = load_model(
            source,
            dtype=config.dtype,
            mesh=mesh,
            attention_impl=config.attention_impl,
            seed=config.seed,
        )
        make_mesh(config.mesh_shape, model.config)  # validates the model axis against kv heads
        return cls(model, config, mesh)

    # --- requests -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt | Sequence[PromptSegment]) -> list[int]:
        """Token ids of a prompt: text, token ids, or a list of scoped segments (concatenated)."""
        return [t for ids, _ in self.prompt_segments(prompt) for t in ids]

    def prompt_segments(
        self, prompt: Prompt | Sequence[PromptSegment], session_id: str | None = None
    ) -> list[tuple[list[int], Scope]]:
        """Validated (token ids, scope) segments. A plain prompt is one segment: private, or
        `session:<session_id>` when the request belongs to a session."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], PromptSegment):
            # BOS (where the tokenizer adds one) starts the prompt, not every text segment.
            segs = [
                (self._token_ids(s.content, "prompt segment", bos=i == 0), s.scope)
                for i, s in enumerate(prompt)
            ]
            if not all(ids for ids, _ in segs):
                raise InvalidRequestError("prompt segments must each be non-empty")
            return segs
        scope = Scope(ScopeKind.SESSION, session_id) if session_id else Scope()
        return [(self._token_ids(prompt, "prompt"), scope)]

    def _token_ids(self, content: Prompt, field: str, bos: bool = True) -> list[int]:
        if isinstance(content, str):
            if not content:
                raise InvalidRequestError(
                    f"{field} must be a non-empty string or token list; got ''"
                )
            return self.tokenizer.encode(content, add_bos=None if bos else False)
        ids = list(content)
        if not ids:
            raise InvalidRequestError(f"{field} must be a non-empty string or token list; got []")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"{field} token ids must be integers in [0, {vocab}); got {bad[:5]!r}"
            )
        return [int(t) for t in ids]

    def add_request(
        self,
        request_id: str,
        prompt: Prompt | Sequence[PromptSegment],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        tenant: str = "default",
        session_id: str | None = None,
        permitted_zones: frozenset[str] = frozenset(),
        constraint: TokenConstraint | None = None,
    ) -> None:
        """Queue a request, or raise `InvalidRequestError`/`OverloadedError` and queue nothing.

        `prompt` is text, token ids, or scoped `PromptSegment`s. `tenant` is the authenticated
        tenant (the caller vouches for it); `constraint` masks tokens (structured output): when
        None, the one `params` asks for (`json_schema`, `regex`, `grammar`) is compiled here.
        Segment scopes, the tenant and the session decide which blocks prefix reuse may share
        (`prefix_cache`).
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams; got {type(params).__name__}")
        if not request_id or request_id in self._requests:
            raise InvalidRequestError(
                f"request_id must be non-empty and not in use; got {request_id!r}"
            )
        segments = self.prompt_segments(prompt, session_id)
        ids = [t for seg, _ in segments for t in seg]
        self.check_fits(len(ids), params)
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise OverloadedError(
                f"waiting queue is full ({self.config.scheduler.max_waiting} requests)"
            )
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        if constraint is None:
            constraint = self.compile_constraint(params)
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            eos_token_ids=self.model.eos_token_ids,
            seed=seed,
            priority=priority,
            arrival_order=next(self._arrivals),
            tenant=tenant,
            session_id=session_id,
            constraint=constraint,
        )
        self.kv.register(req, segments, frozenset(permitted_zones))  # may refuse a bad scope
        self._requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer)
        self._texts[request_id] = OutputText(req.params.stop)
        self.scheduler.add(req)

    @property
    def schema_compiler(self) -> SchemaCompiler | None:
        """The structured-output compiler for this model's tokenizer (thread-safe, with a cache
        of compiled grammars), built on first use; None when the tokenizer cannot be described
        to llguidance. The server compiles through it too, off its event loop."""
        with self._compiler_lock:
            if self._schema_compiler is None and self._no_structured is None:
                try:
                    self._schema_compiler = SchemaCompiler.for_tokenizer(
                        self.tokenizer,
                        vocab_size=self.model_config.vocab_size,
                        eos_token_ids=self.model.eos_token_ids,
                    )
                except UnsupportedTokenizerError as e:
                    self._no_structured = str(e)
            return self._schema_compiler

    @property
    def structured_unavailable_reason(self) -> str | None:
        return None if self.schema_compiler is not None else self._no_structured

    def compile_constraint(self, params: SamplingParams) -> TokenConstraint | None:
        """The token constraint `params` asks for (`json_schema`, `regex` or `grammar`), or None.
        Raises `InvalidRequestError` naming the field. Thread-safe: callers may compile off the
        engine's thread and pass the result to `add_request(constraint=...)`."""
        spec = params.structured
        if spec is None:
            return None
        field, text = spec
        compiler = self.schema_compiler
        if compiler is None:
            why = self._no_structured
            raise InvalidRequestError(
                f"{field}: structured output is not available for this model ({why})"
            )
        try:
            return compiler.compile_grammar(GrammarKind(field), text).new_constraint()
        except SchemaError as e:
            raise InvalidRequestError(f"{field} {e}") from None

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise `InvalidRequestError` unless prompt + max_tokens fits the context and the pool."""
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt tokens ({num_prompt_tokens}) + max_tokens ({params.max_tokens}) must be "
                f"<= max_model_len={self.max_model_len}; got {total}"
            )
        shard = self._shard_blocks  # a request lives on one data shard
        if shard.pages_needed("", total) > shard.num_usable_pages:
            where = " of a data shard" if self.num_data_shards > 1 else ""
            raise InvalidRequestError(
                f"prompt + max_tokens = {total} tokens exceeds the KV pool{where} "
                f"({shard.num_usable_pages * shard.page_size} tokens)"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Free everything the request holds, at any stage. Unknown ids are ignored."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return self._output(req, [], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    # --- the loop -------------------------------------------------------------------------------

    def step(self, probe: StepProbe | None = None) -> list[RequestOutput]:
        """One step: schedule, build, dispatch; then read the results of the step before.

        Synchronous (`overlap_scheduling` off, or a probe): a step's results are read right
        after its dispatch. Overlapped: they are read after the NEXT step has been dispatched,
        so the host schedules and builds step N+1 while the device runs step N; N+1's decodes
        take their input token from N's result on the device (`prev_index`), and stop checks
        run one step late: a token computed past a stop is dropped (`_undo_in_flight`), so the
        outputs are the synchronous loop's. A step after one that sampled a constrained token
        waits for it (its mask needs that token). A `probe` runs the step through a variant of
        the step function (e.g. the quantization gate's pool comparison)."""
        self.kv.housekeeping()
        outputs = []
        if self._inflight is not None and (probe is not None or not self._may_overlap()):
            outputs += self._read_results()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs + self._read_results()
        prev = self._inflight
        batch = build_step_input(
            plan,
            self.blocks.page_size,
            self.buckets,
            self.model_config.vocab_size,
            self._bitmasks(plan),
            None
            if prev is None
            else {s.request_id: c for s, c in zip(prev.plan.seqs, prev.columns, strict=True)},
            self.num_data_shards,
        )
        columns = result_columns(
            plan, self.num_data_shards, batch.logits_indices.shape[0] // self.num_data_shards
        )
        if probe is None:
            # `prev` only when overlapping (a multi-host leader's step takes three arguments).
            args = () if prev is None else (prev.packed,)
            packed, self.kv_pool = self._step(self.model.params, self.kv_pool, batch, *args)
        else:
            packed, self.kv_pool = probe(self._step, plan, self.model.params, self.kv_pool, batch)
        if self.on_dispatch is not None:
            self.on_dispatch(packed)
        self.scheduler.advance(plan)
        self._inflight = _InFlight(plan, packed, columns)
        if prev is not None:
            outputs += self._resolve(prev)  # step N's results, read while step N+1 runs
        if probe is not None or not self._overlap:
            outputs += self._read_results()
        return outputs

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled before the in-flight one's results are read."""
        if not self._overlap:
            return False
        for s in self._inflight.plan.seqs:
            req = self._requests.get(s.request_id)
            if s.samples and req is not None and req.constraint is not None:
                return False
        return True

    def _read_results(self) -> list[RequestOutput]:
        done, self._inflight = self._inflight, None
        return [] if done is None else self._resolve(done)

    def _resolve(self, done: _InFlight) -> list[RequestOutput]:
        sampled = StepFunction.unpack(np.asarray(done.packed), done.columns)
        return [self._emit(req, i) for req, i in self.scheduler.resolve(done.plan, sampled)]

    def _undo_in_flight(self, req: Request) -> None:
        """A request finishing (a stop found one step late, or an abort) while the in-flight step
        computes for it: undo that step's `advance` for it. Its token is discarded (the
        scheduler skips removed requests), and its pages are freed only after everything queued
        on the device before them, so the next owner's writes land after the discarded ones."""
        if self._inflight is None:
            return
        for s in self._inflight.plan.seqs:
            if s.request_id == req.request_id and s.arrival_order == req.arrival_order:
                req.num_computed_tokens -= s.num_new_tokens
                if s.samples:
                    req.drop_pending_tokens(1)

    def warmup(self, on_shape: Callable[[int, int, int], None] | None = None) -> int:
        """Compile the step for every bucket shape the batch builder can produce, so serving
        never compiles. Returns the number of shapes. The warm-up batches are all padding: they
        write only into the null page. `on_shape(T, S, W)` is called after each shape (progress
        bars)."""
        from pijax.batch import empty_step_input

        words = -(-self.model_config.vocab_size // 32)
        shapes = list(self.buckets.grid())
        packed = None
        for T, S, W in shapes:
            packed, self.kv_pool = self._step(
                self.model.params,
                self.kv_pool,
                empty_step_input(T, S, W, words, self.num_data_shards),
            )
            if on_shape is not None:
                on_shape(T, S, W)  # compilation happens at dispatch, so this tracks it
        jax.block_until_ready(packed)
        log.info("warm-up compiled %d step shapes", len(shapes))
        return len(shapes)

    def _bitmasks(self, plan) -> dict[str, np.ndarray] | None:
        words = -(-self.model_config.vocab_size // 32)
        out = {}
        for s in plan.seqs:
            c = self._requests[s.request_id].constraint
            if c is not None and s.samples:
                row = np.zeros(words, np.int32)
                c.fill_bitmask(row)
                out[s.request_id] = row
        return out or None

    def _emit(self, req: Request, index: int) -> RequestOutput:
        """Stop checks and the streamed delta for output token `index` (later slots may be
        pending on the device: they do not count here)."""
        now = time.monotonic()
        if req.timings.first_token is None:
            req.timings.first_token = now
        req.timings.token_times.append(now)
        token = req.output_token_ids[index]
        p = req.params
        if req.constraint is not None:
            req.constraint.accept(token)
        is_eos = token in req.eos_token_ids and not p.ignore_eos
        text = self._texts[req.request_id]
        reason = cut = None
        if is_eos or token in p.stop_token_ids:
            reason = FinishReason.STOP
        else:
            # The stop-string search looks at the pending window only (see OutputText).
            cut = text.add(self._detok[req.request_id].step(token)) or None
            if cut:
                reason = FinishReason.STOP
            elif req.constraint is not None and req.constraint.is_stopped():
                reason = FinishReason.STOP
            elif (
                index + 1 >= p.max_tokens
                or len(req.prompt_token_ids) + index + 1 >= self.max_model_len
            ):
                reason = FinishReason.LENGTH
        if reason is not None and cut is None:
            text.add(self._detok[req.request_id].flush(), check_stops=False)
        new_text = text.take(final=reason is not None)  # holds back a possible stop prefix
        if reason is not None:
            self._finish(req, reason)
        return self._output(req, [token], new_text, index)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        self._undo_in_flight(req)
        self.scheduler.remove(req, keep_session=reason is not FinishReason.ABORT)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.timings.finish = time.monotonic()
        del self._requests[req.request_id]
        self._detok.pop(req.request_id, None)
        text = self._texts.pop(req.request_id, None)
        if text is not None:
            req.output_text = text.text  # the whole text, once, for the final output

    def _output(
        self, req: Request, new_ids: list[int], new_text: str, index: int | None = None
    ) -> RequestOutput:
        """A delta carries only what is new; the final output everything (see RequestOutput).
        `index`: the output slot of the delta's token (later ones may be pending)."""
        done = req.is_finished
        logprobs = None
        if req.params.logprobs:
            lp = req.output_logprobs
            if done:
                logprobs = list(lp)
            else:
                logprobs = lp[index : index + 1] if index is not None else lp[len(lp) :]
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            token_ids=list(req.output_token_ids) if done else [],
            text=req.output_text if done else "",
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=req.num_cached_prompt_tokens,
            logprobs=logprobs,
            timings=req.timings,
        )

    # --- trust zones, sessions, audit ----------------------------------------------------------

    def register_trusted_prefix(
        self, zone: str, prefix: str | Sequence[int], source: str = "api"
    ) -> int:
        """Declare `prefix` trusted for `shared:<zone>`: only registered prefixes are cached
        under a shared zone. Returns its token count."""
        Scope.parse(f"shared:{zone}")  # validates the zone name
        ids = self._token_ids(prefix, "prefix")
        self.kv.register_trusted_prefix(zone, ids, source)
        return len(ids)

    def end_session(self, tenant: str, session_id: str) -> bool:
        """Release a session's pinned KV. False if the tenant has no such session."""
        return self.kv.end_session(tenant, session_id)

    def has_session(self, tenant: str, session_id: str) -> bool:
        return self.kv.has_session(tenant, session_id)

    def read_audit_log(self, **filters) -> list[dict]:
        """Audit records (reuse, registration, session events); filters as `AuditLog.read`."""
        return self.kv.audit.read(**filters)

    def clear_prefix_cache(self) -> int:
        return self.kv.clear()

    # --- introspection --------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of context the pool holds, over every data shard (the null pages excluded)."""
        return self.blocks.num_usable_pages * self.blocks.page_size

    @property
    def compile_count(self) -> int:
        return self._step.compile_count

    def stats(self) -> EngineStats:
        pc = self.kv.prefix_stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            pool_usage=self.blocks.usage(),
            num_free_pages=self.blocks.num_free_pages(),
            num_preemptions=self.scheduler.num_preemptions,
            compile_count=self.compile_count,
            pages_held_by_prefix_cache=self.blocks.num_held_pages(),
            pages_held_by_sessions=self.kv.num_session_pages(),
            waste=self._waste(),
            prefix_queries_by_zone=dict(pc.queries_by_zone),
            prefix_hits_by_zone=dict(pc.hits_by_zone),
            prefix_tokens_saved=pc.tokens_saved,
        )

    def _waste(self) -> float:
        ps = self.blocks.page_size
        allocated = written = 0
        for req in self.scheduler.running:
            if self.blocks.has_seq(req.request_id):
                allocated += len(self.blocks.block_table(req.request_id)) * ps
                written += req.num_computed_tokens
        return 0.0 if allocated == 0 else (allocated - written) / allocated


def use_compilation_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at `path` (None: leave JAX's setting alone).

    JAX decides whether a process uses the cache at its first compilation, so this must run
    before anything is jitted; `Engine.from_source` calls it first. JAX caches only compilations
    slower than a second by default; a small model's step compiles faster than that on CPU and
    is still worth keeping, so the threshold drops to 0.2 s unless someone has set it.
    """
    if not path:
        return
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@dataclasses.dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = None


class LLM:
    """Offline API: `LLM(source).generate(prompts, SamplingParams(...))`.

    `source` is an HF checkpoint directory, a converted orbax checkpoint, or a preset name
    (`None` = the embedded default). Keyword overrides: page_size, num_pages, memory_fraction,
    kv_cache_dtype, max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill,
    mesh_shape, dtype, attention_impl, seed, compilation_cache_dir ("off" disables the persistent
    cache, on by default). `warmup=True` compiles every step shape before returning (a progress
    bar on a terminal; `use_tqdm` as in `generate`), so no call to `generate` compiles.
    """

    def __init__(
        self,
        source: str | None = None,
        *,
        warmup: bool = False,
        use_tqdm: bool | None = None,
        **overrides,
    ):
        from pijax.config import DEFAULT_MODEL, engine_config_from_overrides

        self.engine = Engine.from_source(
            source or DEFAULT_MODEL, engine_config_from_overrides(**overrides)
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self.warmup_seconds: float | None = None
        if warmup:
            t0 = time.perf_counter()
            with progress_bar(use_tqdm, len(list(self.engine.buckets.grid())), "warm-up") as bar:
                self.engine.warmup(on_shape=lambda *_: bar.update(1))
            self.warmup_seconds = time.perf_counter() - t0

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[CompletionOutput]:
        """Runs the prompts, any number of them; returns one output per prompt, in input order.

        Prompts are fed to the engine as its queue drains (the waiting queue stays short, so its
        bound never refuses an offline batch). Every prompt is encoded and checked against the
        context and pool limits before any is queued; a request that still fails (a schema that
        does not compile) aborts the ones already queued and raises. `use_tqdm`: a progress bar
        of finished prompts (None: only when stderr is a terminal; none if tqdm is missing).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        params_list = (
            list(params)
            if isinstance(params, Sequence)
            else [params or SamplingParams()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise InvalidRequestError(
                f"params must be one SamplingParams or one per prompt ({len(prompts)}); "
                f"got {len(params_list)}"
            )
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        for p, sp in zip(encoded, params_list, strict=True):
            if not isinstance(sp, SamplingParams):
                raise InvalidRequestError(f"params must be SamplingParams; got {type(sp).__name__}")
            self.engine.check_fits(len(p), sp)
        sched = self.engine.config.scheduler
        backlog = min(sched.max_waiting, max(64, 2 * sched.max_num_seqs))
        pending = iter(zip(ids, encoded, params_list, strict=True))
        queued: list[str] = []
        final: dict[str, RequestOutput] = {}
        with progress_bar(use_tqdm, len(prompts), "generate") as bar:
            try:
                while True:
                    while len(self.engine.scheduler.waiting) < backlog:
                        nxt = next(pending, None)
                        if nxt is None:
                            break
                        self.engine.add_request(*nxt)
                        queued.append(nxt[0])
                    if not self.engine.has_unfinished_requests():
                        break
                    for out in self.engine.step():
                        if out.finished:
                            final[out.request_id] = out
                            bar.update(1)
            except BaseException:
                for rid in queued:
                    if rid not in final:
                        self.engine.abort(rid)
                raise
        return [
            CompletionOutput(
                rid,
                p,
                final[rid].token_ids,
                final[rid].text,
                final[rid].finish_reason,
                final[rid].logprobs,
            )
            for rid, p in zip(ids, encoded, strict=True)
        ]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(use_tqdm: bool | None, total: int, desc: str):
    """A tqdm bar when asked for (None: when stderr is a terminal) and tqdm is installed; else a
    no-op with the same `update`. tqdm is imported only here, when a bar is wanted."""
    import sys

    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty()
    if not use_tqdm:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True)
