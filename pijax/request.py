"""Host-side request records: what a caller asks for, and what the engine streams back.

`SamplingParams` validates itself at construction, so a bad value is refused before anything is
queued. `Request` is the engine's mutable per-request state; callers see only `RequestOutput`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from typing import Protocol

import numpy as np

PENDING_TOKEN = -1  # an output slot whose token is still on the device (overlapped scheduling)


class InvalidRequestError(ValueError):
    """A request field is outside its allowed values. The message names the field."""


class OverloadedError(RuntimeError):
    """The waiting queue is full; the caller should back off (gRPC: RESOURCE_EXHAUSTED)."""


def _check(cond: bool, field: str, allowed: str, got) -> None:
    if not cond:
        raise InvalidRequestError(f"{field} must be {allowed}; got {got!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `temperature == 0` is greedy; `top_k == 0` disables top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    # Structured output (at most one): the completion is constrained token by token so that it
    # matches. `json_schema` is a JSON Schema (text or dict), `regex` a regular expression,
    # `grammar` a Lark grammar (llguidance's dialect). See `pijax.structured`.
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self):
        _check(
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            "temperature",
            "a finite number >= 0",
            self.temperature,
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            "top_p",
            "in (0, 1]",
            self.top_p,
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k",
            "an integer >= 0 (0 disables top-k)",
            self.top_k,
        )
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            "an integer >= 1",
            self.max_tokens,
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32),
            "seed",
            "None or an integer in [0, 2**32)",
            self.seed,
        )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "stop", "non-empty strings", self.stop)
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        _check(
            all(isinstance(t, int) and t >= 0 for t in ids),
            "stop_token_ids",
            "non-negative integers",
            self.stop_token_ids,
        )
        object.__setattr__(self, "stop_token_ids", ids)
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        for name in STRUCTURED_FIELDS:
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v), name, "None or non-empty text", v)
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        _check(len(given) <= 1, "json_schema/regex/grammar", "at most one of them", given)

    @property
    def structured(self) -> tuple[str, str] | None:
        """(field name, text) of the structured-output constraint asked for, or None."""
        for name in STRUCTURED_FIELDS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None


STRUCTURED_FIELDS = ("json_schema", "regex", "grammar")


class ScopeKind(enum.Enum):
    PRIVATE = "private"
    TENANT = "tenant"
    SESSION = "session"
    SHARED = "shared"


_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclasses.dataclass(frozen=True)
class Scope:
    """A prompt segment's cache scope: `private` (default), `tenant`, `session:<id>`,
    `shared:<zone>`. See DESIGN.md, trust zones. `name` is the session id or zone name."""

    kind: ScopeKind = ScopeKind.PRIVATE
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Scope:
        allowed = (
            "'private', 'tenant', 'session:<id>' or 'shared:<zone>' (names: letters, "
            "digits, '_', '-', '.'; 1-128 chars)"
        )
        kind, _, name = (text or "private").partition(":")
        try:
            k = ScopeKind(kind)
        except ValueError:
            raise InvalidRequestError(f"scope must be {allowed}; got {text!r}") from None
        needs_name = k in (ScopeKind.SESSION, ScopeKind.SHARED)
        if needs_name != bool(name) or (name and (len(name) > 128 or set(name) - _NAME_OK)):
            raise InvalidRequestError(f"scope must be {allowed}; got {text!r}")
        return cls(k, name)

    def __str__(self) -> str:
        return self.kind.value + (f":{self.name}" if self.name else "")


@dataclasses.dataclass(frozen=True)
class PromptSegment:
    """A piece of a prompt with its cache scope. `content` is text or token ids."""

    content: str | tuple[int, ...]
    scope: Scope = Scope()


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestTimings:
    """Wall-clock marks (time.monotonic seconds). TPOT is `(finish - first_token) / (n - 1)`:
    the mean gap between output tokens after the first, the usual definition."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        if n < 2 or self.finish is None or self.first_token is None:
            return None
        return (self.finish - self.first_token) / (n - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


class TokenConstraint(Protocol):
    """Constrained decoding (e.g. a JSON schema). The engine asks for the allowed-token bitmask
    before each sampling step and reports each sampled token back."""

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed tokens as bits into `out` (int32, shape [ceil(vocab / 32)])."""

    def accept(self, token_id: int) -> None: ...

    def is_stopped(self) -> bool:
        """True once the constraint allows nothing further (the grammar is complete)."""


@dataclasses.dataclass
class Request:
    """Engine-side state of one request.

    Invariant: `num_computed_tokens <= len(all_token_ids)`. The tokens still to run through the
    model are `all_token_ids[num_computed_tokens:]`: the prompt (possibly in chunks), then each
    sampled token once. Prefill, chunked prefill, decode and recompute after preemption are the
    same path: a step computes some of those tokens, and samples when it reaches the end.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    seed: int
    priority: int = 0
    arrival_order: int = 0
    tenant: str = "default"
    session_id: str | None = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    output_text: str = ""
    constraint: TokenConstraint | None = None
    timings: RequestTimings = dataclasses.field(
        default_factory=lambda: RequestTimings(arrival=time.monotonic())
    )

    _all_token_ids: list[int] = dataclasses.field(default_factory=list, init=False, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output ids, as one list the caller must not modify.

        Invariant: `prompt_token_ids` and `output_token_ids` are append-only, so this list is
        extended with what is new since the last read instead of concatenated: O(new tokens)
        per step, not O(length).
        """
        ids = self._all_token_ids
        if not ids:
            ids.extend(self.prompt_token_ids)
        done = len(ids) - len(self.prompt_token_ids)
        if done < len(self.output_token_ids):
            ids.extend(self.output_token_ids[done:])
        return ids

    def set_output_token(self, index: int, token: int, logprob: float) -> None:
        """Fill output slot `index` (a `PENDING_TOKEN` placeholder of overlapped scheduling)."""
        self.output_token_ids[index] = token
        self.output_logprobs[index] = logprob
        at = len(self.prompt_token_ids) + index
        if at < len(self._all_token_ids):
            self._all_token_ids[at] = token

    def drop_pending_tokens(self, n: int) -> None:
        """Remove the last `n` output slots (placeholders past a stop, or of an abort)."""
        if n:
            del self.output_token_ids[-n:]
            del self.output_logprobs[-n:]
            keep = len(self.prompt_token_ids) + len(self.output_token_ids)
            del self._all_token_ids[keep:]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclasses.dataclass
class RequestOutput:
    """One streamed delta: `new_token_ids`/`new_text` are this step's.

    A delta carries only what is new, so streaming costs O(1) per token: until the request
    finishes, `token_ids` is empty, `text` is "" and `logprobs` (when requested) holds this
    step's log-probs. The final output (`finished`) has everything: all output ids, the whole
    text and all log-probs.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[float] | None = None
    timings: RequestTimings | None = None


class OutputText:
    """A request's output text, built delta by delta in O(delta + longest stop string) per token.

    Text is either emitted (final, in `_parts`) or pending (`_pending`: the newest characters).
    Invariant: between tokens, at most `hold = max(len(stop)) - 1` characters are pending, so a
    stop string that ends in the next delta starts inside `_pending + delta`: searching that
    window finds every occurrence the whole text would, and an earlier one would already have
    stopped the request.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._hold = max((len(s) - 1 for s in stops), default=0)
        self._parts: list[str] = []
        self._pending = ""

    def add(self, delta: str, check_stops: bool = True) -> bool:
        """Append `delta`; True if a stop string now occurs (the text is cut where it starts)."""
        self._pending += delta
        if not (check_stops and self._stops and delta):
            return False
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if not hits:
            return False
        self._pending = self._pending[: min(hits)]
        return True

    def take(self, final: bool) -> str:
        """The text that can be streamed now: all of it when `final`, else all but the last
        `hold` characters (a possible stop-string prefix, held until it is decided)."""
        n = len(self._pending) if final else max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:n], self._pending[n:]
        if out:
            self._parts.append(out)
        return out

    @property
    def text(self) -> str:
        """Everything so far, emitted and pending (O(length): for the final output only)."""
        return "".join(self._parts) + self._pending
