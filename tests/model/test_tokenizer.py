"""Tokenizers and the incremental detokenizer (no model, no JAX)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pijax.model.tokenizer import (
    REPLACEMENT_CHAR,
    ByteTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerLike,
)
from pijax.testing import make_tokenizer_json

MIXED_TEXTS = [
    "Claim 4471: CPT 99215-25, $412.50",
    "Montant facturé: 1 250,00 € — pièce jointe manquante",
    "审核结果：重复计费 🏥✅",
    "a",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    return make_tokenizer_json(tmp_path_factory.mktemp("tok"), vocab_size=320, add_bos=True)


@pytest.fixture(scope="module")
def bpe(bpe_path):
    return Tokenizer.from_file(bpe_path, bos_token_id=0, eos_token_ids=(1,))


def test_both_implement_the_protocol(bpe):
    assert isinstance(bpe, TokenizerLike)
    assert isinstance(ByteTokenizer(), TokenizerLike)


# --- ByteTokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (256, (257,), 258)
    assert tok.encode("é", add_bos=False) == [0xC3, 0xA9]
    assert tok.encode("é") == [256, 0xC3, 0xA9]  # BOS by default
    assert tok.decode([256, 0xC3, 0xA9, 257]) == "é"
    assert tok.decode([256, 104, 105, 257, 258], skip_special_tokens=False) == "<bos>hi<eos><pad>"
    assert tok.decode([104, 300, 105]) == "hi"  # padding rows of a larger model vocab: nothing
    with pytest.raises(ValueError, match="token id"):
        tok.decode([-1])


@given(st.text(max_size=40))
@settings(max_examples=100, deadline=None)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text, add_bos=True)) == text


# --- Tokenizer (tokenizer.json) ------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text, add_bos=False)
    assert ids and 0 not in ids
    assert bpe.decode(ids) == text
    assert bpe.encode(text, add_bos=True) == [0, *ids]


def test_bpe_metadata(bpe):
    assert bpe.vocab_size == 320
    assert bpe.bos_token_id == 0 and bpe.eos_token_ids == (1,)
    # The file's post-processor prepends <s>, so BOS is added by default.
    assert bpe.add_bos_default and bpe.encode("a")[0] == 0
    assert bpe.decode([0, *bpe.encode("hi", add_bos=False), 1]) == "hi"
    assert bpe.decode([0, 1], skip_special_tokens=False) == "<s></s>"


def test_bpe_add_bos_default_follows_file(tmp_path):
    path = make_tokenizer_json(tmp_path / "plain", add_bos=False)
    tok = Tokenizer.from_file(path, bos_token_id=0)
    assert not tok.add_bos_default and tok.encode("hi")[0] != 0
    # tokenizer_config.json wins over the post-processor, and names the BOS token.
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<s>"})
    )
    tok = Tokenizer.from_file(path)
    assert tok.bos_token_id == 0 and tok.add_bos_default and tok.encode("hi")[0] == 0


def test_bpe_without_bos_refuses_add_bos(tmp_path):
    tok = Tokenizer.from_file(make_tokenizer_json(tmp_path, add_bos=False))
    assert tok.bos_token_id is None and not tok.add_bos_default
    with pytest.raises(ValueError, match="bos_token_id"):
        tok.encode("hi", add_bos=True)


def test_tokenizer_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(bad)


# --- IncrementalDetokenizer ----------------------------------------------------------------------


def _stream(tok, ids, chunk_sizes=None):
    detok = IncrementalDetokenizer(tok)
    deltas, i = [], 0
    rng = random.Random(len(ids))
    while i < len(ids):
        n = 1 if chunk_sizes is None else rng.choice(chunk_sizes)
        deltas.append(detok.step(ids[i : i + n] if n > 1 else ids[i]))
        i += n
    tail = detok.flush()
    return deltas, tail, detok


@pytest.mark.parametrize("text", MIXED_TEXTS)
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_detokenizer_never_splits_a_character(kind, text, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    ids = tok.encode(text, add_bos=True)
    deltas, tail, detok = _stream(tok, ids)
    # Valid text in, so no delta may carry a replacement character (half a character).
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == text and tail == ""
    assert detok.text == text and detok.token_ids == ids


def test_detokenizer_holds_back_until_bytes_complete():
    detok = IncrementalDetokenizer(ByteTokenizer())
    euro = list("€".encode())  # 3 bytes
    assert detok.step(ord("a")) == "a"
    assert detok.step(euro[0]) == ""
    assert detok.step(euro[1]) == ""
    assert detok.step(euro[2]) == "€"
    assert detok.step(257) == ""  # EOS: special, skipped
    assert detok.flush() == ""


def test_detokenizer_flush_releases_a_truncated_character():
    tok = ByteTokenizer()
    ids = [ord("x"), *list("€".encode())[:2]]
    deltas, tail, detok = _stream(tok, ids)
    assert "".join(deltas) == "x"
    assert "".join(deltas) + tail == tok.decode(ids)
    assert tail.endswith(REPLACEMENT_CHAR)


@given(st.lists(st.integers(0, 258), max_size=60), st.sampled_from([None, (1, 2, 3)]))
@settings(max_examples=150, deadline=None)
def test_detokenizer_deltas_concatenate_to_decode_bytes(ids, chunks):
    tok = ByteTokenizer()
    deltas, tail, _ = _stream(tok, ids, chunks)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_detokenizer_deltas_concatenate_to_decode_bpe(bpe):
    rng = random.Random(0)
    for trial in range(200):
        # Random ids (not from text): byte-level tokens that split UTF-8 sequences arbitrarily.
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, tail, _ = _stream(bpe, ids, None if trial % 2 else (1, 2, 5))
        assert "".join(deltas) + tail == bpe.decode(ids), ids


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """Llama-2 / Mistral style: `▁` for spaces, byte fallback, a leading space stripped."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    from pijax.testing import CORPUS

    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return Tokenizer(tok, bos_token_id=1, eos_token_ids=(2,))


def test_detokenizer_with_sentencepiece_style_decoder():
    tok = _sentencepiece_style_tokenizer()
    for text in MIXED_TEXTS:
        ids = tok.encode(text, add_bos=True)
        deltas, tail, _ = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        deltas, tail, _ = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids), ids
