"""Byte-level BPE tokenizer for the claim-review format, trained on the synthetic corpus.

Byte-level, so any text encodes (no unknown token) and decodes back exactly; the prompt format's special tokens come first
(ids 0..6, `prompt.SPECIAL_TOKENS`) and are matched whole in raw text, so a rendered prompt
encodes to exactly the ids the model was trained on. No post-processor: `<bos>` is part of the
rendered prompt, never added behind the caller's back.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pijax.claims.corpus import Example
from pijax.claims.prompt import (
    SPECIAL_TOKENS,
    policy_scaffold,
    render_claim_segment,
    render_policy_segment,
    render_target,
)

# Pre-tokens, tried in order:
#   * a word of letters with its leading space (" claim", " bundled"), unless the letters run on
#     into a code (CLM-483920, J18.9, PI-DX-04);
#   * a code: letters, digits, underscores with inner dots and hyphens (99213, S93.401A,
#     2024-03-13, claim_id), never with a leading space, so a code is the same tokens in the claim
#     table (" | 99213") as in the answer ('"description":"99213 is ...'); copying it is then a
#     plain token copy, which a tiny model learns far sooner than a respelling;
#   * a run of punctuation with at most one space either side (" | ", '":"'); or whitespace.
# Then every digit is its own pre-token (`Digits(individual_digits=True)`), so no merge ever spans
# two digits or a digit and a letter: a claim id, a code, a date or an amount is the same tokens
# wherever it appears (claim table, policy text, answer), one token per digit and per code
# character, and copying it into the answer is a token-by-token copy that an induction head does
# instead of a respelling of arbitrary BPE pieces (the cause of earlier models answering one
# memorized claim id for every claim).
_WORDS = (
    r"\s?[A-Za-z]+(?![A-Za-z0-9_]|[.\-][A-Za-z0-9])"
    r"|[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"
    r"|\s?[^\sA-Za-z0-9_]+\s?"
    r"|\s+"
)


def training_texts(examples: Iterable[Example], policy_every: int = 10) -> Iterable[str]:
    """Rendered prompts and answers, with the policy segment once every `policy_every` examples.

    The policy text is in every real prompt, so its words deserve merges; once per example would
    let its pair counts crowd out the claims' codes and numbers.
    """
    for i, ex in enumerate(examples):
        if i % policy_every == 0:
            yield render_policy_segment(policy_scaffold())
        yield render_claim_segment(ex.claim)
        yield render_target(ex.findings, ex.narrative)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the prompt format's special tokens {missing}")
    return ids
