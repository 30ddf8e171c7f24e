"""Structured-output admission control (`pijax.structured_limits`): limits before parsing, after
parsing, and the killable compile sandbox."""

from __future__ import annotations

import json
import threading

import pytest

from pijax.model.tokenizer import ByteTokenizer
from pijax.structured import SchemaCompiler, SchemaError
from pijax.structured_limits import (
    CompileCancelled,
    SchemaLimitError,
    SchemaLimits,
    check_finite,
    check_schema_text,
    check_schema_tree,
)

LIMITS = SchemaLimits()


def nested(keyword: str, depth: int) -> str:
    inner = "{}"
    for _ in range(depth):
        inner = {
            "properties": '{"type": "object", "properties": {"a": %s}}',
            "items": '{"type": "array", "items": %s}',
            "anyOf": '{"anyOf": [%s]}',
            "raw": "[%s]",
        }[keyword] % inner
    return inner


@pytest.mark.parametrize("keyword", ["properties", "items", "anyOf", "raw"])
def test_deep_nesting_is_refused_before_parsing(keyword):
    with pytest.raises(SchemaLimitError, match="nest at most 32"):
        check_schema_text(nested(keyword, 1000), LIMITS)
    check_schema_text(nested(keyword, 10), LIMITS)


def test_brackets_inside_strings_do_not_count():
    check_schema_text(json.dumps({"description": "[{" * 100, "type": "string"}), LIMITS)


def test_node_and_ref_counts_are_bounded():
    many = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(SchemaLimitError, match="at most 4096"):
        check_schema_tree(many, LIMITS)
    refs = {"$defs": {f"d{i}": {"type": "string"} for i in range(300)}}
    refs["anyOf"] = [{"$ref": f"#/$defs/d{i}"} for i in range(300)]
    with pytest.raises(SchemaLimitError, match="distinct \\$ref"):
        check_schema_tree(refs, LIMITS)


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},
        {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
        {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
        {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}},
    ],
)
def test_schemas_with_no_finite_value_are_refused(schema):
    with pytest.raises(SchemaLimitError, match="no finite JSON value"):
        check_finite(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"$ref": "#"}}},  # `a` may be left out
        {"type": "array", "items": {"$ref": "#"}},  # [] ends it
        {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"n": {"$ref": "#"}}}]},
        {
            "$defs": {
                "tree": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                    "required": ["kids"],
                }
            },
            "$ref": "#/$defs/tree",
        },
        {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: a string will do
    ],
)
def test_recursive_schemas_with_a_base_case_are_accepted(schema):
    check_finite(schema)


@pytest.fixture(scope="module")
def compiler():
    c = SchemaCompiler.for_tokenizer(
        ByteTokenizer(),
        vocab_size=320,
        eos_token_ids=(257,),
        limits=SchemaLimits(compile_timeout_s=2.0, compile_memory_mib=192),
    )
    yield c
    c.sandbox.close()


def test_compiler_turns_limits_into_schema_errors_without_a_worker():
    c = SchemaCompiler.for_tokenizer(
        ByteTokenizer(), vocab_size=320, eos_token_ids=(257,), sandbox=None
    )
    for text, needle in [
        (nested("properties", 1000), "nest at most"),
        (json.dumps({"$ref": "#"}), "no finite JSON value"),
    ]:
        with pytest.raises(SchemaError, match=needle):
            c.compile(text)


def hostile(tag: str, n: int = 50) -> str:
    # allOf over search patterns: llguidance's emptiness check of the intersection grows without
    # bound in time and memory (its own LLParserLimits do not stop it).
    return json.dumps({"type": "string", "allOf": [{"pattern": f"{tag}{{{i}}}"} for i in range(n)]})


@pytest.mark.slow
def test_runaway_compile_is_killed_and_remembered(compiler):
    good = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert compiler.compile(good).new_constraint() is not None
    with pytest.raises(SchemaError, match="compile (time|memory) budget"):
        compiler.compile(hostile("x"))
    killed = compiler.sandbox.num_killed
    assert killed >= 1
    with pytest.raises(SchemaError, match="compile (time|memory) budget"):
        compiler.compile(hostile("x"))  # refused from the cache: no worker runs
    assert compiler.sandbox.num_killed == killed
    assert compiler.compile(good) is compiler.compile(good)  # the server still compiles


@pytest.mark.slow
def test_memory_budget_kills_the_worker():
    c = SchemaCompiler.for_tokenizer(
        ByteTokenizer(),
        vocab_size=320,
        eos_token_ids=(257,),
        limits=SchemaLimits(compile_timeout_s=300.0, compile_memory_mib=96),
    )
    try:
        with pytest.raises(SchemaError, match="compile memory budget"):
            c.compile(hostile("y"))
    finally:
        c.sandbox.close()


@pytest.mark.slow
def test_cancel_kills_the_compilation(compiler):
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with pytest.raises(CompileCancelled):
        compiler.compile(hostile("z"), cancel=cancel)
    timer.cancel()
