"""A small synthetic corpus and a BPE tokenizer trained on it, for the training-data tests
(test modules with other needs define their own `examples` and `tokenizer`)."""

from __future__ import annotations

import pytest

from pijax.claims.bpe import train_tokenizer, training_texts
from pijax.claims.corpus import generate_examples


@pytest.fixture(scope="module")
def examples():
    return generate_examples(seed=9, count=40)


@pytest.fixture(scope="module")
def tokenizer(examples):
    return train_tokenizer(training_texts(examples), vocab_size=500)
