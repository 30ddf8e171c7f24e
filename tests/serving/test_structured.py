"""Structured output without a model: the llguidance constraint over the byte tokenizer and a
`tokenizer.json` tokenizer, walked with random allowed tokens, always yields valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from pijax.model.tokenizer import ByteTokenizer, Tokenizer
from pijax.structured import SchemaCompiler, SchemaError

SCHEMA = json.loads((Path(__file__).parent / "findings_test.schema.json").read_text())


def allowed_ids(constraint, vocab_size: int) -> np.ndarray:
    row = np.zeros(-(-vocab_size // 32), np.int32)
    constraint.fill_bitmask(row)
    bits = (row[:, None].view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
    return np.nonzero(bits.reshape(-1)[:vocab_size])[0]


def random_walk(
    compiler: SchemaCompiler,
    schema_text: str,
    vocab_size: int,
    eos: int,
    seed: int,
    max_steps: int = 2000,
) -> list[int]:
    """Sample uniformly among allowed tokens until the constraint stops (what a random model
    under the mask does)."""
    rng = np.random.default_rng(seed)
    c = compiler.compile(schema_text).new_constraint()
    ids = []
    for _ in range(max_steps):
        allowed = allowed_ids(c, vocab_size)
        assert len(allowed), "the mask allowed nothing"
        t = int(rng.choice(allowed))
        c.accept(t)
        assert not c.error
        if t == eos:
            break
        ids.append(t)
        if c.is_stopped():
            break
    else:
        pytest.fail("constraint never stopped")
    return ids


@pytest.mark.parametrize("seed", range(5))
def test_byte_tokenizer_walk_validates(seed):
    tok = ByteTokenizer()
    compiler = SchemaCompiler.for_tokenizer(tok, vocab_size=320, eos_token_ids=(257,))
    ids = random_walk(compiler, json.dumps(SCHEMA), 320, 257, seed)
    assert all(t < 256 for t in ids)  # no special or padding token ever allowed
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


def small_bpe_tokenizer() -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        json.dumps(
            {
                "claim_id": f"C{1000 + i}",
                "flags": [],
                "risk_category": "low",
                "recommended_action": "approve",
                "narrative": "no issues found",
            }
        )
        for i in range(50)
    ]
    tok.train_from_iterator(corpus, trainer)
    return Tokenizer(
        tok, bos_token_id=tok.token_to_id("<bos>"), eos_token_ids=(tok.token_to_id("<eos>"),)
    )


@pytest.mark.parametrize("seed", range(3))
def test_tokenizer_json_walk_validates(seed):
    tok = small_bpe_tokenizer()
    eos = tok.eos_token_ids[0]
    vocab = tok.vocab_size + 7  # a model may have more embedding rows than the tokenizer
    compiler = SchemaCompiler.for_tokenizer(tok, vocab_size=vocab, eos_token_ids=(eos,))
    ids = random_walk(compiler, json.dumps(SCHEMA), vocab, eos, seed)
    assert all(t < tok.vocab_size for t in ids)
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "strng"}', "not a valid JSON Schema"),
        ('{"type": "object", "properties": {"a": {"minLength": -1}}}', "not a valid JSON Schema"),
        ('{"type": "string", "pattern": "(unclosed"}', "not"),
    ],
)
def test_bad_schemas_are_refused_with_a_reason(text, needle):
    compiler = SchemaCompiler.for_tokenizer(ByteTokenizer(), vocab_size=320, eos_token_ids=(257,))
    with pytest.raises(SchemaError, match=needle):
        compiler.compile(text)


def test_oversized_schema_is_refused():
    compiler = SchemaCompiler.for_tokenizer(
        ByteTokenizer(), vocab_size=320, eos_token_ids=(257,), max_schema_bytes=100
    )
    with pytest.raises(SchemaError, match="at most 100 bytes"):
        compiler.compile(json.dumps(SCHEMA))


def test_compiled_schemas_are_cached_and_constraints_independent():
    compiler = SchemaCompiler.for_tokenizer(ByteTokenizer(), vocab_size=320, eos_token_ids=(257,))
    text = json.dumps(SCHEMA)
    compiled = compiler.compile(text)
    assert compiler.compile(text) is compiled
    a, b = compiled.new_constraint(), compiled.new_constraint()
    a.accept(ord("{"))
    assert list(allowed_ids(b, 320)) == [ord("{")]
    assert ord("{") not in allowed_ids(a, 320)


def packaged_findings_schema() -> str:
    from importlib import resources

    file = resources.files("pijax.configs") / "schemas" / "findings.schema.json"
    assert file.is_file(), "configs/schemas/findings.schema.json is not packaged"
    return file.read_text()


@pytest.mark.parametrize("seed", range(3))
def test_packaged_findings_schema_walk_validates(seed):
    text = packaged_findings_schema()
    tok = ByteTokenizer()
    compiler = SchemaCompiler.for_tokenizer(tok, vocab_size=320, eos_token_ids=(257,))
    ids = random_walk(compiler, text, 320, 257, seed, max_steps=20000)
    jsonschema.validate(json.loads(tok.decode(ids)), json.loads(text))
