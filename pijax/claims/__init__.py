"""Synthetic payment-integrity claims: the corpus, the review prompt format, and evaluation.

SYNTHETIC DATA ONLY: every claim is generated from small invented code tables; no real patient,
provider or payer data is used or produced.

  codes      the made-up code tables and the five policies (duplicates, unbundling, unit limits,
             diagnosis support, modifiers)
  claim      Claim / ServiceLine / Findings records
  rules      the rule functions that decide a claim's findings (the ground truth)
  corpus     the seeded claim generator (`generate_examples`)
  prompt     the prompt format, the policy scaffold (the shared cache zone) and the answer format
  schema     the findings JSON schema (`configs/schemas/findings.schema.json`) and its checks
  bpe        the byte-level BPE tokenizer trained on the corpus
  train      the training loop of the embedded default model
  evaluate   held-out evaluation (claim id, flags and per-flag precision/recall, action,
             narrative citations, exact match; the goals) and a reference decoder
  samples    a ready-made sample review prompt
"""
