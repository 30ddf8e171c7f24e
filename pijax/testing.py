"""Helpers for tests: tiny checkpoints written to disk, and tokenizers to go with them.

`make_hf_checkpoint` builds a random Llama / Qwen2 / Mistral with HF transformers (the `reference`
extra; imported only when called) and saves it as HF would publish it, with a byte-level BPE
`tokenizer.json`. `make_random_checkpoint` needs no torch: it initializes `LlamaModel` and writes
it with `save_hf_checkpoint`.

Weights are random at every scale that matters (norm weights, biases, embeddings), so a loader
that drops or transposes one of them changes the logits.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pijax.config import DType, ModelConfig
from pijax.model.hf_io import path_names

# A short corpus in the domain's register, with multi-byte characters so that BPE learns merges
# that split UTF-8 sequences (what the incremental detokenizer must handle).
CORPUS = [
    "Claim 4471 billed CPT 99215 with modifier 25 on the same day as a minor procedure.",
    "The provider's note does not support the level of service billed; recommend downcode.",
    "Policy 12.3: observation hours over 48 require a physician order and medical necessity.",
    "Institutional claim with revenue code 0450 (emergency room) and 0762 (observation).",
    "Paciente con diagnóstico de neumonía; reclamación número 5521 — revisión pendiente.",
    "Montant facturé: 1 250,00 € pour séjour hospitalier; pièce jointe manquante.",
    "审核结果：重复计费，建议拒付。 金额 ¥3,200。",
    "Finding ✅ duplicate line items 3 and 7 🏥; amount at risk $412.50.",
]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def make_tokenizer_json(path: str | Path, vocab_size: int = 320, add_bos: bool = False) -> Path:
    """Train a byte-level BPE on a small fixed corpus and save it as `tokenizer.json`.

    Ids 0, 1, 2 are `<s>`, `</s>`, `<pad>`. With `add_bos`, the post-processor prepends `<s>`
    (as Llama's does). Deterministic: the same arguments give the same file.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


# Small configs of each architecture. Llama: llama3 rope scaling whose three frequency bands are
# all populated at head_dim 16 (theta 5e5, original context 64), GQA 4:1. Qwen2: qkv bias, tied
# embeddings. Mistral: no sliding window.
HF_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
    ),
    "mistral": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
}
HF_ARCHS = tuple(HF_ARCH_DEFAULTS)


def make_hf_checkpoint(
    tmp_path: str | Path,
    arch: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a random float32 HF model of `arch` ("llama", "qwen2", "mistral") with transformers.

    `overrides` replace config fields (e.g. `num_hidden_layers=1`). Returns the checkpoint
    directory (`tmp_path/arch`), holding config.json, model.safetensors (or shards with
    `max_shard_size`, e.g. "40KB"), generation_config.json and tokenizer.json. Token ids:
    `<s>`=0 (bos), `</s>`=1 (eos), `<pad>`=2. Needs the `reference` extra.
    """
    import torch
    import transformers

    if arch not in HF_ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {list(HF_ARCHS)}; got {arch!r}")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    kwargs = {
        **HF_ARCH_DEFAULTS[arch],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        **overrides,
    }
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_torch_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=2
    )
    out = Path(tmp_path) / arch
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    make_tokenizer_json(out, vocab_size=min(320, config.vocab_size), add_bos=arch != "qwen2")
    return out


def randomize_torch_weights(model, seed: int) -> None:
    """Every parameter random: norms around 1, biases small, linears scaled by fan-in."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer Llama-shaped config (GQA 2:1, 4 kv heads so a 4-way model axis divides it)."""
    base = ModelConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_ids=(1,),
    )
    return dataclasses.replace(base, **overrides)


def random_params(cfg: ModelConfig, seed: int = 0, dtype: DType = DType.FLOAT32) -> nnx.State:
    """Random `LlamaModel` parameters with random norm weights (init sets them to 1)."""
    return _random_params(cfg, dtype, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_params(cfg: ModelConfig, dtype: DType, key: jax.Array) -> nnx.State:
    from pijax.model.llama import LlamaModel

    init_key, norm_key = jax.random.split(key)
    state = nnx.state(LlamaModel(cfg, dtype=dtype.jnp, rngs=nnx.Rngs(init_key)))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(norm_key, len(leaves))
    leaves = [
        (1.0 + 0.1 * jax.random.normal(k, x.shape)).astype(x.dtype)
        if path_names(path)[-1] == "weight"
        else x
        for k, (path, x) in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def make_random_checkpoint(
    path: str | Path,
    cfg: ModelConfig | None = None,
    *,
    seed: int = 0,
    dtype: DType | str = DType.FLOAT32,
    with_tokenizer: bool = True,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an HF checkpoint of a random `LlamaModel` (no torch needed).

    With `with_tokenizer`, a BPE `tokenizer.json` is trained and saved beside it (the config's
    vocab must be >= 320); otherwise the checkpoint uses `ByteTokenizer`.
    """
    from pijax.model.hf_io import save_hf_checkpoint

    cfg = cfg if cfg is not None else tiny_model_config()
    path = Path(path)
    tok_json = None
    if with_tokenizer:
        tok_json = make_tokenizer_json(
            path.parent / f"{path.name}-tokenizer", vocab_size=320, add_bos=True
        )
    return save_hf_checkpoint(
        cfg, random_params(cfg, seed), tok_json, path, dtype, max_shard_bytes=max_shard_bytes
    )


def assert_trees_equal(actual, expected, *, dtype=None) -> None:
    """Same parameter names and values, exactly (after casting `expected` to `dtype`)."""
    a = {path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(actual)}
    e = {path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    assert sorted(a, key=str) == sorted(e, key=str), "parameter names differ"
    for name, x in a.items():
        want = np.asarray(e[name]) if dtype is None else np.asarray(e[name]).astype(dtype)
        got = np.asarray(x)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=str(name))


@functools.partial(jax.jit, static_argnums=0)
def _dense_logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params).forward_dense(tokens)


def dense_logits(graphdef: nnx.GraphDef, params: nnx.State, tokens) -> np.ndarray:
    """`forward_dense` logits as numpy. Jitted: one program compiles far faster than the eager
    op-by-op path, and is cached per graphdef and shape."""
    return np.asarray(_dense_logits(graphdef, params, jnp.asarray(tokens)))


def run_on_cpu_devices(
    script: str, num_devices: int, *args: str, timeout: float = 600
) -> dict[str, Any]:
    """Run `script` (Python source) in a fresh interpreter on `num_devices` fake CPU devices and
    return the JSON it printed after `RESULT` (JAX fixes its device count at start-up, so a
    test that needs a mesh runs in a subprocess). Fails the calling test with the script's
    stderr tail if it exits non-zero or prints no result."""
    import json
    import os
    import subprocess
    import sys

    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, f"the script printed no RESULT line; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT") :])
