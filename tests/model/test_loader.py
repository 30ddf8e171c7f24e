"""HF checkpoint loading and writing, presets, and every bad input (no torch needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pijax.config import DType
from pijax.model import loader
from pijax.model.hf_io import (
    CheckpointError,
    hf_tensor_name,
    normalize_hf_config,
    save_hf_checkpoint,
)
from pijax.model.llama import LOGICAL_AXES
from pijax.model.loader import abstract_model, load_model
from pijax.model.tokenizer import ByteTokenizer, Tokenizer
from pijax.sharding import param_shardings
from pijax.testing import (
    assert_trees_equal,
    dense_logits,
    make_random_checkpoint,
    make_tokenizer_json,
    random_params,
    tiny_model_config,
)

CFG = tiny_model_config()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 11))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint dir, the params written) for the tiny config, float32, one file."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = make_tokenizer_json(root / "tok", vocab_size=320, add_bos=True)
    params = random_params(CFG, seed=3)
    path = save_hf_checkpoint(CFG, params, tok, root / "hf", DType.FLOAT32)
    return path, params


def _logits(params, tokens, cfg=CFG):
    graphdef, _ = abstract_model(cfg, DType.FLOAT32)
    return dense_logits(graphdef, params, tokens)


# --- names -------------------------------------------------------------------------------------


def test_hf_tensor_names():
    assert hf_tensor_name(("embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert hf_tensor_name(("layers", 1, "self_attn", "q_proj", "kernel")) == (
        "model.layers.1.self_attn.q_proj.weight",
        True,
    )
    assert hf_tensor_name(("layers", 0, "self_attn", "k_proj", "bias")) == (
        "model.layers.0.self_attn.k_proj.bias",
        False,
    )
    assert hf_tensor_name(("layers", 0, "input_layernorm", "weight")) == (
        "model.layers.0.input_layernorm.weight",
        False,
    )
    assert hf_tensor_name(("norm", "weight")) == ("model.norm.weight", False)
    assert hf_tensor_name(("lm_head", "kernel")) == ("lm_head.weight", True)


def test_normalize_transformers5_rope_parameters():
    cfg = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    assert normalize_hf_config(cfg) == {
        **cfg,
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    }
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert normalize_hf_config(plain) == {**plain, "rope_theta": 1e6}
    legacy = {"rope_theta": 10.0, "rope_scaling": None}
    assert normalize_hf_config(legacy) is legacy


# --- round trips -------------------------------------------------------------------------------


def test_save_writes_hf_layout(saved):
    path, params = saved
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    tensors = load_file(path / "model.safetensors")
    q = np.asarray(params["layers"][0]["self_attn"]["q_proj"]["kernel"][...])
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"], q.T)
    assert tensors["lm_head.weight"].shape == (CFG.vocab_size, CFG.hidden_size)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 1


def test_round_trip_float32(saved, mesh1, tokens):
    path, params = saved
    lm = load_model(path, dtype="float32", mesh=mesh1)
    assert lm.config == CFG
    assert lm.eos_token_ids == (1,)
    assert isinstance(lm.tokenizer, Tokenizer) and lm.tokenizer.bos_token_id == 0
    assert_trees_equal(lm.params, params)
    np.testing.assert_array_equal(
        dense_logits(lm.graphdef, lm.params, tokens), _logits(params, tokens)
    )


def test_params_carry_their_sharding(saved, mesh1):
    lm = load_model(saved[0], dtype="float32", mesh=mesh1)
    for x, s in zip(
        jax.tree.leaves(lm.params),
        jax.tree.leaves(param_shardings(lm.params, mesh1, LOGICAL_AXES)),
        strict=True,
    ):
        assert x.sharding == s


def test_load_bfloat16(saved, mesh1, tokens):
    path, params = saved
    lm = load_model(path, dtype=DType.BFLOAT16, mesh=mesh1)
    assert_trees_equal(lm.params, params, dtype=jnp.bfloat16)
    got = dense_logits(lm.graphdef, lm.params, tokens)
    want = _logits(params, tokens)
    assert got.dtype == np.float32
    # bf16 weights and activations: close to the float32 logits, not equal.
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_bfloat16_checkpoint_loads_as_float32(tmp_path, saved, mesh1):
    _, params = saved
    path = save_hf_checkpoint(CFG, params, None, tmp_path / "bf16", "bfloat16")
    assert load_file(path / "model.safetensors")["model.norm.weight"].dtype == jnp.bfloat16
    lm = load_model(path, dtype="float32", mesh=mesh1)
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
    assert_trees_equal(lm.params, want)


def test_sharded_safetensors_with_index(tmp_path, saved, mesh1):
    _, params = saved
    path = save_hf_checkpoint(
        CFG, params, None, tmp_path / "sharded", "float32", max_shard_bytes=60_000
    )
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    lm = load_model(path, dtype="float32", mesh=mesh1)
    assert_trees_equal(lm.params, params)


@pytest.mark.slow
def test_tied_embeddings_and_qkv_bias(tmp_path, mesh1, tokens):
    cfg = tiny_model_config(
        tie_word_embeddings=True, attention_bias=True, architecture="Qwen2ForCausalLM"
    )
    params = random_params(cfg, seed=5)
    path = save_hf_checkpoint(cfg, params, None, tmp_path / "tied")
    names = set(load_file(path / "model.safetensors"))
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.bias" in names
    lm = load_model(path, dtype="float32", mesh=mesh1)
    assert lm.config.tie_word_embeddings and lm.config.attention_bias
    assert_trees_equal(lm.params, params)
    np.testing.assert_array_equal(
        dense_logits(lm.graphdef, lm.params, tokens), _logits(params, tokens, cfg)
    )


def test_unused_tensors_are_skipped(tmp_path, saved, mesh1):
    path = Path(shutil.copytree(saved[0], tmp_path / "extra"))
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    tensors["some.other.tensor"] = np.ones(3, np.float32)
    save_file(tensors, path / "model.safetensors")
    assert_trees_equal(load_model(path, dtype="float32", mesh=mesh1).params, saved[1])


def test_eos_from_generation_config_first(tmp_path, saved, mesh1):
    path = Path(shutil.copytree(saved[0], tmp_path / "eos"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    lm = load_model(path, dtype="float32", mesh=mesh1)
    assert lm.eos_token_ids == (1, 7) and lm.config.eos_token_ids == (1, 7)
    assert lm.tokenizer.eos_token_ids == (1, 7)
    (path / "generation_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 5}))
    assert load_model(path, dtype="float32", mesh=mesh1).eos_token_ids == (5,)


def test_byte_tokenizer_checkpoint(tmp_path, mesh1):
    path = make_random_checkpoint(tmp_path / "byte", with_tokenizer=False)
    assert not (path / "tokenizer.json").exists()
    lm = load_model(path, dtype="float32", mesh=mesh1)
    assert isinstance(lm.tokenizer, ByteTokenizer)


# --- presets -----------------------------------------------------------------------------------


def test_preset_random_init(mesh1, tokens):
    lm = load_model("tiny-random", dtype="float32", mesh=mesh1, seed=0)
    assert isinstance(lm.tokenizer, ByteTokenizer)
    assert lm.eos_token_ids == (257,) and lm.config.bos_token_id == 256
    for x, s in zip(
        jax.tree.leaves(lm.params),
        jax.tree.leaves(param_shardings(lm.params, mesh1, LOGICAL_AXES)),
        strict=True,
    ):
        assert x.sharding == s and x.dtype == jnp.float32
    assert np.isfinite(dense_logits(lm.graphdef, lm.params, tokens)).all()


def _fake_preset(monkeypatch, preset: dict):
    monkeypatch.setattr(loader, "preset_names", lambda: ["fake"])
    monkeypatch.setattr(loader, "load_preset", lambda name: preset)


def test_preset_seed_and_default_bos_eos(monkeypatch, mesh1):
    model = {k: v for k, v in CFG.to_hf_dict().items() if k not in ("bos_token_id", "eos_token_id")}
    _fake_preset(monkeypatch, {"model": model, "tokenizer": "byte"})
    lm = load_model("fake", dtype="float32", mesh=mesh1, seed=0)
    # Without bos/eos in the preset, the byte tokenizer's are used.
    assert lm.eos_token_ids == (257,) and lm.config.bos_token_id == 256
    again = load_model("fake", dtype="float32", mesh=mesh1, seed=0)
    assert_trees_equal(again.params, lm.params)
    other = load_model("fake", dtype="float32", mesh=mesh1, seed=1)
    emb = lambda m: np.asarray(m.params["embed_tokens"]["embedding"][...])  # noqa: E731
    assert not np.array_equal(emb(other), emb(lm))


@pytest.mark.parametrize(
    "preset, match",
    [
        ({"tokenizer": "byte"}, "preset 'fake': field 'model'"),
        ({"model": CFG.to_hf_dict(), "tokenizer": "sentencepiece"}, "preset 'fake': tokenizer="),
        ({"model": {**CFG.to_hf_dict(), "vocab_size": 100}}, "preset 'fake': vocab_size=100"),
        ({"model": {**CFG.to_hf_dict(), "num_hidden_layers": 0}}, "preset 'fake'.*num_layers"),
    ],
)
def test_bad_presets(monkeypatch, mesh1, preset, match):
    _fake_preset(monkeypatch, preset)
    with pytest.raises(CheckpointError, match=match):
        load_model("fake", dtype="float32", mesh=mesh1)


# --- bad input ---------------------------------------------------------------------------------


def _edit_json(name):
    def edit(path: Path, fn):
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(fn(data)))

    return edit


_config = _edit_json("config.json")


def _rewrite_tensors(path: Path, fn):
    tensors = load_file(path / "model.safetensors")
    save_file(fn(tensors), path / "model.safetensors", metadata={"format": "pt"})


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


UP1 = "model.layers.1.mlp.up_proj.weight"

# (name, edit of a good single-file checkpoint dir, regex the error must match). Each regex names
# the file and the field or tensor at fault.
BAD_CHECKPOINTS = [
    ("missing_config", lambda p: (p / "config.json").unlink(), r"config\.json: file not found"),
    (
        "config_not_json",
        lambda p: (p / "config.json").write_text("{oops"),
        r"config\.json: not valid JSON",
    ),
    (
        "config_not_object",
        lambda p: (p / "config.json").write_text("[1, 2]"),
        r"config\.json: expected a JSON object",
    ),
    (
        "unsupported_architecture",
        lambda p: _config(p, lambda c: {**c, "architectures": ["GPT2LMHeadModel"]}),
        r"config\.json.*architectures=\['GPT2LMHeadModel'\] is not supported",
    ),
    (
        "missing_field",
        lambda p: _config(p, lambda c: _drop(c, "hidden_size")),
        r"config\.json.*'hidden_size' is missing",
    ),
    (
        "bad_field_value",
        lambda p: _config(p, lambda c: {**c, "vocab_size": -3}),
        r"config\.json.*vocab_size must be a positive integer",
    ),
    (
        "rope_scaling_missing_key",
        lambda p: _config(p, lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8}}),
        r"config\.json.*low_freq_factor",
    ),
    (
        "rope_type_unsupported",
        lambda p: _config(p, lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4}}),
        r"config\.json.*rope_type='yarn' is not supported",
    ),
    (
        "mistral_bad_sliding_window",  # a window is supported (test_sliding_window.py)
        lambda p: _config(
            p, lambda c: {**c, "architectures": ["MistralForCausalLM"], "sliding_window": -16}
        ),
        r"config\.json.*sliding_window must be null or a positive integer; got -16",
    ),
    (
        "missing_weights",
        lambda p: (p / "model.safetensors").unlink(),
        r"no weights found; expected model\.safetensors",
    ),
    (
        "corrupt_safetensors",
        lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage" * 9),
        r"model\.safetensors: not a readable safetensors file",
    ),
    (
        "truncated_safetensors",
        lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:-64]
        ),
        r"model\.safetensors: not a readable safetensors file",
    ),
    (
        "missing_tensor",
        lambda p: _rewrite_tensors(p, lambda t: _drop(t, UP1)),
        rf"tensor '{UP1}' is missing",
    ),
    (
        "wrong_shape",
        lambda p: _rewrite_tensors(
            p, lambda t: {**t, "model.norm.weight": np.ones(63, np.float32)}
        ),
        r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[63\]; expected \[64\]",
    ),
    (
        "config_does_not_match_weights",
        lambda p: _config(p, lambda c: {**c, "intermediate_size": 256}),
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
        r"\[64, 128\]; expected \[64, 256\]",
    ),
    (
        "integer_tensor",
        lambda p: _rewrite_tensors(p, lambda t: {**t, "model.norm.weight": np.ones(64, np.int32)}),
        r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32",
    ),
    (
        "missing_tokenizer",
        lambda p: (p / "tokenizer.json").unlink(),
        r"tokenizer\.json: file not found",
    ),
    (
        "corrupt_tokenizer",
        lambda p: (p / "tokenizer.json").write_text("{}"),
        r"tokenizer\.json: cannot read tokenizer",
    ),
    (
        "bad_tokenizer_kind",
        lambda p: _config(p, lambda c: {**c, "pijax_tokenizer": "spm"}),
        r"config\.json: pijax_tokenizer='spm' is not supported",
    ),
    (
        "bad_generation_config",
        lambda p: _edit_json("generation_config.json")(p, lambda g: {**g, "eos_token_id": "x"}),
        r"generation_config\.json: eos_token_id must be",
    ),
    (
        "generation_config_not_json",
        lambda p: (p / "generation_config.json").write_text("{"),
        r"generation_config\.json: not valid JSON",
    ),
]


@pytest.mark.parametrize(
    "edit, match", [c[1:] for c in BAD_CHECKPOINTS], ids=[c[0] for c in BAD_CHECKPOINTS]
)
def test_bad_checkpoint_names_file_and_field(tmp_path, saved, mesh1, edit, match):
    path = Path(shutil.copytree(saved[0], tmp_path / "bad"))
    edit(path)
    with pytest.raises(CheckpointError, match=match):
        load_model(path, dtype="float32", mesh=mesh1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, saved):
    root = tmp_path_factory.mktemp("sharded")
    return save_hf_checkpoint(CFG, saved[1], None, root / "hf", "float32", max_shard_bytes=60_000)


def _index(edit):
    return lambda p: _edit_json("model.safetensors.index.json")(p, edit)


BAD_SHARDED = [
    (
        "missing_shard",
        lambda p: (p / "model-00002-of-00010.safetensors").unlink(),
        r"model-00002-of-00010\.safetensors: file not found \(listed in .*index\.json\)",
    ),
    (
        "index_not_json",
        lambda p: (p / "model.safetensors.index.json").write_text("nope"),
        r"model\.safetensors\.index\.json: not valid JSON",
    ),
    (
        "index_without_weight_map",
        _index(lambda i: _drop(i, "weight_map")),
        r"model\.safetensors\.index\.json: field 'weight_map'",
    ),
    (
        "index_missing_tensor",
        _index(lambda i: {**i, "weight_map": _drop(i["weight_map"], UP1)}),
        rf"model\.safetensors\.index\.json: tensor '{UP1}' is missing",
    ),
]


@pytest.mark.parametrize(
    "edit, match", [c[1:] for c in BAD_SHARDED], ids=[c[0] for c in BAD_SHARDED]
)
def test_bad_sharded_checkpoint(tmp_path, sharded, mesh1, edit, match):
    assert len(list(sharded.glob("*.safetensors"))) == 10
    path = Path(shutil.copytree(sharded, tmp_path / "bad"))
    edit(path)
    with pytest.raises(CheckpointError, match=match):
        load_model(path, dtype="float32", mesh=mesh1)


def test_bad_sources(tmp_path, mesh1):
    with pytest.raises(
        CheckpointError,
        match=r"nope/ckpt: no such checkpoint directory, and not "
        r"a preset; presets: \[.*'tiny-random'",
    ):
        load_model(tmp_path / "nope" / "ckpt", dtype="float32", mesh=mesh1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file: not a directory"):
        load_model(tmp_path / "file", dtype="float32", mesh=mesh1)
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random", dtype="float16", mesh=mesh1)


def test_save_rejects_missing_tokenizer_file(tmp_path, saved):
    with pytest.raises(CheckpointError, match=r"nope\.json: file not found"):
        save_hf_checkpoint(CFG, saved[1], tmp_path / "nope.json", tmp_path / "out")
