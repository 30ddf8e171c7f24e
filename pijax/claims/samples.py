"""A ready-made review prompt for demos and first runs (a synthetic claim; no real data)."""

from __future__ import annotations

from pijax.claims.corpus import Example, generate_example
from pijax.claims.prompt import policy_scaffold, render_prompt

SAMPLE_SEED = 2024
SAMPLE_INDEX = 1  # a claim with flags, so the first review shows what the reviewer looks for


def sample_example(index: int = SAMPLE_INDEX) -> Example:
    return generate_example(SAMPLE_SEED, index, split="demo")


def sample_review_prompt(index: int = SAMPLE_INDEX) -> str:
    """The full prompt (policy scaffold + claim, up to `<|review|>`) for one synthetic claim."""
    return render_prompt(policy_scaffold(), sample_example(index).claim)
