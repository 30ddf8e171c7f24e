"""Sliding-window attention (Mistral, Qwen2) against HF transformers, with a window shorter than
the prompt: dense logits at every position, and greedy tokens through the paged engine (the
kernels' `sliding_window`). Issue 14: Qwen2 with `use_sliding_window` ran with full attention
(wrong output) and Mistral with a window was refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip(
    "transformers", reason="needs the reference extra: pip install -e .[reference]"
)
torch = pytest.importorskip(
    "torch", reason="needs the reference extra: pip install -e .[reference]"
)

from pijax.config import ConfigError, ModelConfig  # noqa: E402
from pijax.model.loader import load_model  # noqa: E402
from pijax.testing import dense_logits, make_hf_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference

WINDOW = 8
RTOL = 1e-4
CASES = {
    "mistral": dict(sliding_window=WINDOW),
    # two layers: layer 0 full attention, layer 1 windowed (HF: layers >= max_window_layers)
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, make_hf_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=3, **CASES[arch])


def hf_logits(path, ids) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_config_reads_the_window(checkpoint, mesh1):
    arch, path = checkpoint
    cfg = load_model(path, dtype="float32", mesh=mesh1).config
    assert cfg.sliding_window == WINDOW
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)] == (
        [WINDOW, WINDOW] if arch == "mistral" else [None, WINDOW]
    )
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert (again.sliding_window, again.max_window_layers) == (
        cfg.sliding_window,
        cfg.max_window_layers,
    )


def test_dense_logits_match_transformers_past_the_window(checkpoint, mesh1):
    arch, path = checkpoint
    lm = load_model(path, dtype="float32", mesh=mesh1)
    ids = np.random.default_rng(1).integers(3, lm.config.vocab_size, size=5 * WINDOW).tolist()
    ours = dense_logits(lm.graphdef, lm.params, np.array([ids]))[0]
    theirs = hf_logits(path, ids)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= RTOL, f"{arch}: max relative error {rel:.2e}"
    # The window matters here: full attention would give other logits past it.
    full = json.loads((path / "config.json").read_text())
    assert full["sliding_window"] == WINDOW


def test_paged_engine_greedy_matches_transformers(checkpoint):
    from pijax import LLM, SamplingParams

    arch, path = checkpoint
    ids = np.random.default_rng(2).integers(3, 300, size=3 * WINDOW).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
    llm = LLM(
        str(path),
        num_pages=24,
        page_size=8,
        max_model_len=64,
        max_num_batched_tokens=16,
        max_num_seqs=2,
        compilation_cache_dir="off",
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    assert out.token_ids == ref, arch


def test_a_layout_we_do_not_run_is_refused():
    cfg = dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=128,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    with pytest.raises(ConfigError, match="layer_types must put every sliding_attention"):
        ModelConfig.from_hf_dict(cfg)
