"""Structured output: a JSON schema, a regex or a Lark grammar becomes a per-request token
constraint (llguidance). An engine feature: `SamplingParams(json_schema=...)` (or `regex=`,
`grammar=`) is compiled by `Engine.add_request`, and the server compiles through the same engine's
compiler off its event loop.

    compiler = SchemaCompiler.for_tokenizer(tokenizer, vocab_size=320, eos_token_ids=(257,))
    compiled = compiler.compile(schema_text)          # SchemaError names what is wrong
    engine.add_request(..., constraint=compiled.new_constraint())

`SchemaCompiler` builds llguidance's `LLTokenizer` once from the engine's tokenizer (the byte
tokenizer of the random presets, or a `tokenizer.json` one), checks schemas (JSON, the JSON
Schema meta-schema, then what llguidance can compile) and caches one compiled matcher per distinct
(kind, text); each request gets a deep copy, which is far cheaper than compiling again.

`JsonSchemaConstraint` is the engine's `TokenConstraint`: the engine calls `fill_bitmask` on its
own thread for each sampling step (the numpy interface writes the mask straight into the engine's
int32 row: no torch, no copy) and `accept` with each sampled token. Once the value is complete
the matcher is stopped and the engine finishes the request with `STOP`, so a finished completion
always parses and validates. A completion cut by `max_tokens` does not.

Hostile schemas are bounded before and during compilation (`pijax.structured_limits`): size,
nesting depth, node and `$ref` counts and finiteness before compiling, then a first compile in a
killable worker process with a time and memory budget; `compile(..., cancel=event)` kills it
when the caller goes away.

JSON is compiled without flexible whitespace by default (a random or weak model would otherwise
fill the budget with blanks); a schema may opt back in with `"x-guidance": {"whitespace_flexible":
true}`.
"""

from __future__ import annotations

import collections
import enum
import json
import threading
from collections.abc import Sequence

import jsonschema
import llguidance
import numpy as np

from pijax.structured_limits import (
    CompileSandbox,
    SchemaLimitError,
    SchemaLimits,
    check_schema_text,
    check_schema_tree,
    tokenizer_spec,
)

DEFAULT_COMPILE_OPTIONS = {"whitespace_flexible": False}


class GrammarKind(enum.Enum):
    """What a constraint's text is; the values are the `SamplingParams` field names."""

    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    GRAMMAR = "grammar"  # Lark, llguidance's dialect


class SchemaError(ValueError):
    """The schema is not usable for structured output; the message says why (no field prefix)."""


class UnsupportedTokenizerError(RuntimeError):
    """The engine's tokenizer cannot be described to llguidance."""


class JsonSchemaConstraint:
    """One request's grammar state. Used only from the engine thread once queued."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill_bitmask(self, out: np.ndarray) -> None:
        if out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError("bitmask row must be a contiguous int32 array")
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(int(token_id))

    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        """Non-empty if the matcher entered an error state (a token outside the mask)."""
        return self._matcher.get_error() if self._matcher.is_error() else ""


class CompiledSchema:
    """A compiled constraint template; `schema` is the JSON Schema (None for a regex or grammar)."""

    def __init__(self, schema: dict | None, template: llguidance.LLMatcher):
        self.schema = schema
        self._template = template

    def new_constraint(self) -> JsonSchemaConstraint:
        return JsonSchemaConstraint(self._template.deep_copy())


class SchemaCompiler:
    """Validates and compiles JSON schemas for one tokenizer; thread-safe, with an LRU cache."""

    def __init__(
        self,
        ll_tokenizer: llguidance.LLTokenizer,
        *,
        max_schema_bytes: int = 65536,
        cache_size: int = 64,
        limits: SchemaLimits | None = None,
        sandbox: CompileSandbox | None = None,
    ):
        self.ll_tokenizer = ll_tokenizer
        self.max_schema_bytes = max_schema_bytes
        self.limits = limits or SchemaLimits(max_schema_bytes=max_schema_bytes)
        self.sandbox = sandbox
        self._cache: collections.OrderedDict[tuple[GrammarKind, str], CompiledSchema] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(
        cls, tokenizer, *, vocab_size: int, eos_token_ids: Sequence[int], **kwargs
    ) -> SchemaCompiler:
        """With a `CompileSandbox` unless `sandbox=None` is passed explicitly."""
        ll_tokenizer = ll_tokenizer_for(tokenizer, vocab_size, eos_token_ids)
        if "sandbox" not in kwargs:
            spec = tokenizer_spec(tokenizer, vocab_size, eos_token_ids)
            limits = kwargs.get("limits") or SchemaLimits(
                max_schema_bytes=kwargs.get("max_schema_bytes", 65536)
            )
            kwargs["limits"] = limits
            kwargs["sandbox"] = None if spec is None else CompileSandbox(spec, limits)
        return cls(ll_tokenizer, **kwargs)

    def compile(self, schema_text: str, cancel: threading.Event | None = None) -> CompiledSchema:
        """A JSON schema's constraint template (cached). Setting `cancel` abandons the
        compilation (`CompileCancelled`)."""
        return self.compile_grammar(GrammarKind.JSON_SCHEMA, schema_text, cancel=cancel)

    def compile_grammar(
        self, kind: GrammarKind, text: str, cancel: threading.Event | None = None
    ) -> CompiledSchema:
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            compiled = self._compile(kind, text, cancel)
        except SchemaLimitError as e:
            raise SchemaError(str(e)) from None
        except RecursionError:
            raise SchemaError("nests too deeply to compile") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: GrammarKind, text: str, cancel=None) -> CompiledSchema:
        size = len(text.encode("utf-8"))
        if size > self.max_schema_bytes:
            what = "of JSON" if kind is GrammarKind.JSON_SCHEMA else "of text"
            raise SchemaError(f"must be at most {self.max_schema_bytes} bytes {what}; got {size}")
        schema = None
        try:
            if kind is GrammarKind.JSON_SCHEMA:
                check_schema_text(text, self.limits)
                schema = _checked_schema(text)
                check_schema_tree(schema, self.limits)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults=DEFAULT_COMPILE_OPTIONS
                )
            elif kind is GrammarKind.REGEX:
                grammar = llguidance.LLMatcher.grammar_from_regex(text)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except ValueError as e:
            if isinstance(e, SchemaError):
                raise
            raise SchemaError(f"cannot be compiled: {e}") from None
        if self.sandbox is not None:  # first where a runaway compile can be killed
            error = self.sandbox.check(grammar, cancel)
            if error:
                raise SchemaError(f"is not supported for structured output: {error}")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.ll_tokenizer
        )
        if is_error:
            raise SchemaError(f"is not supported for structured output: {messages[0]}")
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SchemaError(f"is not supported for structured output: {matcher.get_error()}")
        return CompiledSchema(schema, matcher)


def _checked_schema(schema_text: str) -> dict:
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"must be valid JSON text: {e}") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"must be a JSON object (a JSON Schema); got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaError(f"is not a valid JSON Schema: {e.message}") from None
    return schema


# --- tokenizers -----------------------------------------------------------------------------------


class _ByteVocabulary:
    """What llguidance's `TokenizerWrapper` reads: each id's bytes (special tokens carry the
    0xFF marker byte, which never occurs in UTF-8, so grammars can't produce them as text) and an
    encoder."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        specials = dict(getattr(tokenizer, "SPECIALS", {}))
        num_bytes = getattr(tokenizer, "NUM_BYTES", 256)
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [
            bytes([i]) if i < num_bytes else b"\xff" + specials.get(i, f"<unused_{i}>").encode()
            for i in range(vocab_size)
        ]
        self.special_token_ids = list(range(num_bytes, vocab_size))

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


def ll_tokenizer_for(
    tokenizer, vocab_size: int, eos_token_ids: Sequence[int]
) -> llguidance.LLTokenizer:
    """An `LLTokenizer` whose ids match the model's: `vocab_size` is the model's (embedding rows
    past the tokenizer's own vocabulary are never allowed), EOS ids are the engine's."""
    from pijax.model.tokenizer import ByteTokenizer

    eos = [int(t) for t in eos_token_ids] or list(tokenizer.eos_token_ids)
    if not eos:
        raise UnsupportedTokenizerError("structured output needs at least one EOS token id")
    if isinstance(tokenizer, ByteTokenizer):
        wrapper = llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer, vocab_size, eos))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
    tokenizer_json = _tokenizer_json(tokenizer)
    if tokenizer_json is None:
        raise UnsupportedTokenizerError(
            f"structured output supports the byte tokenizer and tokenizer.json tokenizers; "
            f"got {type(tokenizer).__name__}"
        )
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)


def _tokenizer_json(tokenizer) -> str | None:
    """The `tokenizer.json` text of a `pijax.model.tokenizer.Tokenizer`, else None."""
    to_json = getattr(tokenizer, "to_json_str", None)
    return to_json() if callable(to_json) else None
