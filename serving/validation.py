"""Request validation: a `GenerateRequest` proto -> engine types, or a `RequestError`.

Every field is checked here, before anything is queued, and each error names the field (with its
index for repeated fields: `prompt[2].scope`, `stop[0]`) and the allowed values, in the engine's
style: "<field> must be <allowed>; got <value>". Trust-zone rules: a `shared:<zone>` segment needs
a zone the server knows and the caller's key permits; both failures get the same answer
(PERMISSION_DENIED, listing only the caller's own zones), so zone names cannot be enumerated. Session existence and JSON-schema compilation need server state and
are checked by the servicer.

Text segments are tokenized here, the first with the tokenizer's default BOS and the rest
without, so a prompt split into segments has the tokens of the unsplit text (for tokenizers
whose merges don't cross the split) and never a BOS in the middle.

Bounded before work: every size is checked before anything costs time. Text is measured in UTF-8
bytes before it is tokenized: a text of `n` bytes has at least `n / max_token_bytes` tokens
(`max_token_bytes`: the longest token of the vocabulary, in bytes of its vocabulary string,
which is never shorter than the bytes it stands for), so text longer than `max_model_len *
max_token_bytes` bytes (`ModelLimits.max_text_bytes`) can never fit and is refused untokenized.
Token-id lists are bounded by `max_model_len` before they are scanned. The gRPC server's
`max_receive_message_length` is derived from the same bound (`max_message_bytes`), so a larger
message is refused by the transport before it is even parsed.
"""

from __future__ import annotations

import dataclasses
import math
import re

import grpc

from pijax.request import InvalidRequestError, SamplingParams, Scope, ScopeKind
from pijax.serving.auth import Principal

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ZONE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_TOKEN_BYTES = 64
OWN_SESSION = ""  # the name of a SESSION scope until the servicer resolves the engine's id


class RequestError(Exception):
    """A request the server refuses, with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, allowed: str, got) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be {allowed}; got {got!r}")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_segments: int = 64
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 16
    max_schema_bytes: int = 65536
    min_priority: int = -100
    max_priority: int = 100


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES

    @property
    def max_text_bytes(self) -> int:
        """UTF-8 bytes of text that could still fit in `max_model_len` tokens."""
        return self.max_model_len * self.max_token_bytes


def max_token_bytes(tokenizer) -> int:
    """The longest token of `tokenizer`'s vocabulary in bytes (an upper bound on the bytes one
    token stands for). The byte tokenizer: 1. A `tokenizer.json` tokenizer: the longest
    vocabulary string in UTF-8 (byte-level and SentencePiece spellings are never shorter than the
    text they encode). Anything else: `DEFAULT_MAX_TOKEN_BYTES`."""
    if getattr(tokenizer, "NUM_BYTES", None) == 256:  # ByteTokenizer: one byte per token
        return 1
    tok = getattr(tokenizer, "_tok", None)
    get_vocab = getattr(tok, "get_vocab", None)
    if not callable(get_vocab):
        return DEFAULT_MAX_TOKEN_BYTES
    vocab = get_vocab(with_added_tokens=True)
    longest = max((len(t.encode("utf-8")) for t in vocab), default=DEFAULT_MAX_TOKEN_BYTES)
    # A normalizer may shrink text before it is split (NFKC, stripped accents): allow for a
    # 4x shrink (the widest UTF-8 character) so only texts that can never fit are refused.
    return longest * 4 if getattr(tok, "normalizer", None) is not None else longest


def max_message_bytes(model: ModelLimits, limits: RequestLimits) -> int:
    """The largest request message a valid call can need: the prompt as text or as token ids
    (at most 5 bytes per packed varint), a schema, stop strings, and 64 KiB for everything else
    (ids, names, framing)."""
    prompt = max(model.max_text_bytes, 5 * model.max_model_len)
    stops = limits.max_stop * limits.max_stop_chars * 4
    return prompt + limits.max_schema_bytes + stops + (64 << 10)


@dataclasses.dataclass(frozen=True)
class ValidGenerate:
    request_id: str  # the client's, possibly empty
    segments: list[tuple[tuple[int, ...], Scope]]  # SESSION scopes still named OWN_SESSION
    params: SamplingParams
    priority: int
    session_id: str  # the client's, possibly empty
    start_session: bool
    json_schema: str  # empty: unconstrained

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.segments)

    @property
    def uses_session(self) -> bool:
        return bool(self.session_id) or self.start_session


def validate_generate(
    req,
    principal: Principal,
    known_zones: frozenset[str],
    tokenizer,
    model: ModelLimits,
    limits: RequestLimits,
) -> ValidGenerate:
    if req.request_id and not REQUEST_ID_RE.match(req.request_id):
        raise invalid("request_id", "empty or 1-128 of [A-Za-z0-9_.:-]", req.request_id)
    if not limits.min_priority <= req.priority <= limits.max_priority:
        raise invalid(
            "priority",
            f"in [{limits.min_priority}, {limits.max_priority}] (lower is more urgent)",
            req.priority,
        )
    if req.priority < principal.min_priority:
        raise invalid(
            "priority",
            f"in [{max(limits.min_priority, principal.min_priority)}, {limits.max_priority}] "
            "for this API key (its min_priority; lower is more urgent)",
            req.priority,
        )
    if req.session_id and not SESSION_ID_RE.match(req.session_id):
        raise invalid("session_id", "empty or 1-128 of [A-Za-z0-9_.-]", req.session_id)
    schema_bytes = len(req.json_schema.encode("utf-8"))
    if schema_bytes > limits.max_schema_bytes:
        raise invalid(
            "json_schema",
            f"at most {limits.max_schema_bytes} bytes of JSON",
            f"{schema_bytes} bytes",
        )
    params = _sampling_params(req, model, limits)
    prompt = _segments(req, limits)
    check_prompt_size(prompt, model)
    session = req.session_id or req.start_session
    segments = [
        _segment(
            i, seg, principal, known_zones, session, req.session_id, tokenizer, model, first=i == 0
        )
        for i, seg in enumerate(prompt)
    ]
    n = sum(len(ids) for ids, _ in segments)
    if n + params.max_tokens > model.max_model_len:
        raise invalid(
            "prompt",
            f"at most {model.max_model_len - params.max_tokens} tokens "
            f"(max_model_len={model.max_model_len} minus max_tokens="
            f"{params.max_tokens})",
            f"{n} tokens",
        )
    return ValidGenerate(
        request_id=req.request_id,
        segments=segments,
        params=params,
        priority=req.priority,
        session_id=req.session_id,
        start_session=req.start_session,
        json_schema=req.json_schema,
    )


def check_prompt_size(segments, model: ModelLimits) -> None:
    """Refuse, before any tokenizing, a prompt that cannot fit `max_model_len` tokens: its text
    (all segments together) over `max_text_bytes` UTF-8 bytes, or over `max_model_len` token
    ids."""
    text_bytes = num_ids = 0
    for i, seg in enumerate(segments):
        kind = seg.WhichOneof("content")
        if kind == "text":
            n = utf8_len(seg.text)
            if n > model.max_text_bytes:
                raise invalid(
                    f"prompt[{i}].text",
                    f"at most {model.max_text_bytes} bytes of UTF-8 (max_model_len="
                    f"{model.max_model_len} tokens of at most {model.max_token_bytes} bytes)",
                    f"{n} bytes",
                )
            text_bytes += n
        elif kind == "token_ids":
            num_ids += len(seg.token_ids.ids)
    if text_bytes > model.max_text_bytes:
        raise invalid(
            "prompt", f"at most {model.max_text_bytes} bytes of text in all", f"{text_bytes} bytes"
        )
    if num_ids > model.max_model_len:
        raise invalid(
            "prompt",
            f"at most max_model_len={model.max_model_len} token ids",
            f"{num_ids} token ids",
        )


def check_text_size(field: str, text: str, model: ModelLimits) -> None:
    n = utf8_len(text)
    if n > model.max_text_bytes:
        raise invalid(field, f"at most {model.max_text_bytes} bytes of UTF-8", f"{n} bytes")


def utf8_len(text: str) -> int:
    # Characters bound the bytes from below (and from above by 4x), so most long texts are
    # refused without encoding them.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _segments(req, limits: RequestLimits):
    n = len(req.prompt)
    if not 1 <= n <= limits.max_segments:
        raise invalid("prompt", f"1-{limits.max_segments} segments", f"{n} segments")
    return req.prompt


def _segment(
    i: int,
    seg,
    principal: Principal,
    known_zones: frozenset[str],
    session: bool,
    session_id: str,
    tokenizer,
    model: ModelLimits,
    first: bool,
):
    field = f"prompt[{i}]"
    scope = parse_scope(f"{field}.scope", seg.scope, principal, known_zones, session, session_id)
    kind = seg.WhichOneof("content")
    if kind is None:
        raise invalid(field, "a segment with text or token_ids set", "neither")
    if kind == "text":
        if not seg.text:
            raise invalid(f"{field}.text", "non-empty", seg.text)
        ids = tokenizer.encode(seg.text, add_bos=None if first else False)
    else:
        ids = list(seg.token_ids.ids)
        if not ids:
            raise invalid(f"{field}.token_ids", "non-empty", ids)
        bad = [t for t in ids if t >= model.vocab_size]
        if bad:
            raise invalid(f"{field}.token_ids", f"token ids in [0, {model.vocab_size})", bad[:5])
    return tuple(ids), scope


def parse_scope(
    field: str,
    text: str,
    principal: Principal,
    known_zones: frozenset[str],
    session: bool,
    session_id: str,
) -> Scope:
    kind, _, name = text.partition(":")
    if kind == ScopeKind.SESSION.value:
        if not session:
            raise invalid(
                field, "a session scope only on requests with session_id or start_session", text
            )
        if name and name != session_id:
            raise invalid(field, "'session' or 'session:<the request's session_id>'", text)
        return Scope(ScopeKind.SESSION, OWN_SESSION)
    try:
        scope = Scope.parse(text)
    except InvalidRequestError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {e}") from None
    if scope.kind is ScopeKind.SHARED:
        zone = scope.name
        # One answer for "no such zone" and "not yours", so no tenant can learn which zones
        # other tenants have by probing names.
        if zone not in known_zones or not principal.may_use_zone(zone):
            permitted = sorted(principal.permitted_zones(known_zones))
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{field} must be 'shared:<zone>' with a zone this API key may use "
                f"(yours: {permitted}); got {text!r}",
            )
    return scope


def _sampling_params(req, model: ModelLimits, limits: RequestLimits) -> SamplingParams:
    s = req.sampling
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise invalid("sampling.temperature", "a finite number >= 0 (0 = greedy)", temperature)
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid("sampling.top_p", "in (0, 1]", top_p)
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k > model.vocab_size:
        raise invalid("sampling.top_k", f"in [0, {model.vocab_size}] (0 = off)", top_k)
    seed = s.seed if s.HasField("seed") else None
    if seed is not None and seed >= 2**32:
        raise invalid("sampling.seed", "in [0, 2**32)", seed)
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if not 1 <= max_tokens < model.max_model_len:
        raise invalid("max_tokens", f"in [1, {model.max_model_len - 1}]", max_tokens)
    if len(req.stop) > limits.max_stop:
        raise invalid("stop", f"at most {limits.max_stop} strings", f"{len(req.stop)} strings")
    for i, stop in enumerate(req.stop):
        if not 1 <= len(stop) <= limits.max_stop_chars:
            raise invalid(f"stop[{i}]", f"1-{limits.max_stop_chars} characters", stop[:40])
    if len(req.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid(
            "stop_token_ids",
            f"at most {limits.max_stop_token_ids} ids",
            f"{len(req.stop_token_ids)} ids",
        )
    for i, t in enumerate(req.stop_token_ids):
        if t >= model.vocab_size:
            raise invalid(f"stop_token_ids[{i}]", f"in [0, {model.vocab_size})", t)
    try:
        return SamplingParams(
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            seed=seed,
            max_tokens=int(max_tokens),
            stop=tuple(req.stop),
            stop_token_ids=tuple(int(t) for t in req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
        )
    except InvalidRequestError as e:  # the engine's own checks, should ours ever be looser
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from None


def validate_zone(field: str, zone: str) -> str:
    if not ZONE_RE.match(zone):
        raise invalid(field, "1-128 of [A-Za-z0-9_.-]", zone)
    return zone
