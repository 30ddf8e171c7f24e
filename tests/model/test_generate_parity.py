"""Token-level parity of the paged engine with HF transformers `generate`.

For random Llama (llama3 rope scaling, GQA 4:1), Qwen2 (qkv bias, tied embeddings) and Mistral
checkpoints written by transformers, greedy continuations of prompts of several lengths — across
page boundaries, through chunked prefill — are token-identical, and the engine's per-token
log-probabilities (the paged path's logits) match HF's within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip(
    "transformers", reason="needs the reference extra: pip install -e .[reference]"
)
torch = pytest.importorskip(
    "torch", reason="needs the reference extra: pip install -e .[reference]"
)

from pijax import LLM, SamplingParams  # noqa: E402
from pijax.testing import HF_ARCHS, make_hf_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference

PAGE = 16
NEW_TOKENS = 10
PROMPT_LENGTHS = [3, 16, 17, 45]  # inside a page, exactly a page, one past, several pages


@pytest.mark.slow
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_greedy_tokens_and_logprobs_match_transformers(arch, tmp_path):
    path = make_hf_checkpoint(tmp_path, arch, seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rng = np.random.default_rng(0)
    vocab = hf.config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]

    # A small token budget forces the longer prompts through chunked prefill.
    llm = LLM(
        str(path),
        page_size=PAGE,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=256,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    outs = llm.generate(prompts, params)

    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=2,
            )
            expected = gen[0, len(prompt) :].tolist()
            logits = hf(gen[:, :-1]).logits[0, len(prompt) - 1 :]
            ref_lp = torch.log_softmax(logits, -1)[
                torch.arange(NEW_TOKENS), gen[0, len(prompt) :]
            ].numpy()
        assert out.token_ids == expected, f"{arch}, prompt of {len(prompt)} tokens"
        np.testing.assert_allclose(out.logprobs, ref_lp, rtol=1e-4, atol=1e-5)
