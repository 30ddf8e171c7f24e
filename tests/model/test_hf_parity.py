"""Parity with HF transformers: checkpoints that transformers writes load into the same function,
and checkpoints that `save_hf_checkpoint` writes load into transformers.

Random Llama (llama3 rope scaling, GQA 4:1), Qwen2 (qkv bias, tied embeddings) and Mistral (no
sliding window) models in float32; `forward_dense` logits against HF's at every position of
prompts of several lengths (past the llama3 original context of 64), within 1e-4 relative.
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

from pijax.model.hf_io import save_hf_checkpoint  # noqa: E402
from pijax.model.loader import load_model  # noqa: E402
from pijax.model.tokenizer import Tokenizer  # noqa: E402
from pijax.testing import (  # noqa: E402
    HF_ARCHS,
    assert_trees_equal,
    dense_logits,
    make_hf_checkpoint,
)

pytestmark = pytest.mark.reference

RTOL = 1e-4
TEXTS = [
    "Claim 4471 billed CPT 99215 with modifier 25.",
    "Montant facturé: 1 250,00 € — pièce jointe manquante; 审核结果：重复计费 🏥",
    "a",
]
RANDOM_LENGTHS = [1, 17, 64, 65, 150]


@pytest.fixture(scope="module", params=HF_ARCHS)
def arch_checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, make_hf_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=11)


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    texts = [tokenizer.encode(t) for t in TEXTS]
    return texts + [rng.integers(0, vocab_size, size=n).tolist() for n in RANDOM_LENGTHS]


def _ours_batched(lm, prompts) -> list[np.ndarray]:
    """All prompts in one right-padded batch (one compile): causal attention means padding after
    a prompt cannot change its logits."""
    width = max(map(len, prompts))
    rng = np.random.default_rng(6)
    batch = rng.integers(0, lm.config.vocab_size, size=(len(prompts), width))
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    logits = dense_logits(lm.graphdef, lm.params, batch)
    return [logits[i, : len(p)] for i, p in enumerate(prompts)]


def _assert_close(ours, theirs, what):
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= RTOL, f"{what}: max relative error {rel:.2e} > {RTOL}"


def test_logits_match_transformers(arch_checkpoint, mesh1):
    arch, path = arch_checkpoint
    lm = load_model(path, dtype="float32", mesh=mesh1)
    hf_cfg = json.loads((path / "config.json").read_text())
    assert lm.config.architecture == hf_cfg["architectures"][0]
    if arch == "llama":
        assert lm.config.rope_scaling is not None and lm.config.rope_theta == 500000.0
        assert lm.config.num_heads == 4 * lm.config.num_kv_heads
    if arch == "qwen2":
        assert lm.config.tie_word_embeddings and lm.config.attention_bias
        assert lm.config.rope_theta == 1000000.0
    ref = _hf_model(path)
    prompts = _prompts(lm.tokenizer, lm.config.vocab_size)
    assert len({len(p) for p in prompts}) >= 6
    for ids, ours in zip(prompts, _ours_batched(lm, prompts), strict=True):
        theirs = _hf_logits(ref, ids)
        _assert_close(ours, theirs, f"{arch}, prompt of {len(ids)} tokens")
        _assert_close(ours[-1], theirs[-1], f"{arch}, last token of {len(ids)}")


def test_tokenizer_matches_transformers(arch_checkpoint, mesh1):
    arch, path = arch_checkpoint
    ours = load_model(path, dtype="float32", mesh=mesh1).tokenizer
    assert isinstance(ours, Tokenizer)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = theirs(text)["input_ids"]  # with the file's special tokens (BOS for llama/mistral)
        assert ours.encode(text) == ids, (arch, text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_saved_checkpoint_loads_in_transformers(arch_checkpoint, mesh1, tmp_path):
    """`save_hf_checkpoint` (the training script's writer) produces what transformers reads."""
    arch, path = arch_checkpoint
    lm = load_model(path, dtype="float32", mesh=mesh1)
    out = save_hf_checkpoint(
        lm.config, lm.params, path / "tokenizer.json", tmp_path / "out", "float32"
    )
    original, rewritten = _hf_model(path), _hf_model(out)
    ids = np.random.default_rng(9).integers(0, lm.config.vocab_size, size=80).tolist()
    np.testing.assert_array_equal(_hf_logits(rewritten, ids), _hf_logits(original, ids))
    assert_trees_equal(load_model(out, dtype="float32", mesh=mesh1).params, lm.params)


def test_sharded_transformers_checkpoint(tmp_path, mesh1):
    single = make_hf_checkpoint(tmp_path / "single", "llama", seed=3)
    sharded = make_hf_checkpoint(tmp_path / "sharded", "llama", seed=3, max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_trees_equal(
        load_model(sharded, dtype="float32", mesh=mesh1).params,
        load_model(single, dtype="float32", mesh=mesh1).params,
    )
